#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one call on a CUDA node (6-9 minutes on an H100):
#   1. five members vs naive (compiled trunk and members included), MACE-MP-0-medium shape and CHGNet
#      (scripts/bench_ensemble.py)
#   2. TF32 / bf16 against float32 on real MP structures          (scripts/bench_precision.py)
#   3. does the CPU side keep the GPU fed? end to end vs inference (scripts/bench_feed.py)
#   4. CHGNet graph assembly: chgnet's per-graph loop vs one pass   (scripts/bench_chgnet_batch.py)
#   5. CHGNet convolutions: chgnet's modules vs factored gated MLPs (scripts/bench_chgnet_layers.py)
# Needs cathode_ray's dependencies importable (Ray is not: bench_feed replaces it with a process
# pool) and ../shared/data. Logs go to $OUT (default out/gpu-check), one file per step.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh
#   OUT=/tmp/gpu STEPS="library feed" bash scripts/gpu_check.sh   # only these steps (a second call,
#                                                    when the first ran into the device's 600 s limit)
#   REHEARSE=1 bash scripts/gpu_check.sh   # venv active, before a device call: every step on the CPU, small,
#                                          # with `import ray` failing as on the lent machine (~8 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
REHEARSE=${REHEARSE:-}
DEVICE=cuda
if [[ -n $REHEARSE ]]; then
    DEVICE=cpu
    NORAY=$(mktemp -d)
    trap 'rm -rf "$NORAY"' EXIT
    mkdir "$NORAY/ray" && echo 'raise ImportError("rehearsal: Ray is not installed on the device")' > "$NORAY/ray/__init__.py"
    export PYTHONPATH=$NORAY:$PYTHONPATH
fi
pick() { if [[ -n $REHEARSE ]]; then echo "$2"; else echo "$1"; fi; }  # pick DEVICE_VALUE REHEARSAL_VALUE
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt" 2>&1

STEPS=${STEPS:-ensemble_mace ensemble_chgnet precision_chgnet library feed chgnet_batch chgnet_layers}

step() {  # step NAME TIMEOUT_S CMD...: run, log, keep going on failure; skip steps not in $STEPS
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "== $name" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
    grep -iE "structures/s|meV/atom|fell back|error|ms$|ms/structure" "$OUT/$name.log" | tee -a "$OUT/summary.txt"
}

step ensemble_mace 330 python scripts/bench_ensemble.py --backbone mace-medium-shape --n "$(pick 512 8)" \
    --batch "$(pick 64 4)" --device $DEVICE --rounds "$(pick 2 1)" --repeats "$(pick 2 1)"
step ensemble_chgnet 180 python scripts/bench_ensemble.py --backbone chgnet --n "$(pick 384 16)" --batch "$(pick 64 8)" \
    --device $DEVICE --rounds "$(pick 2 1)" --repeats "$(pick 2 1)"
step precision_chgnet 60 python scripts/bench_precision.py --backbone chgnet --n "$(pick 256 16)" --batch "$(pick 64 8)" \
    --device $DEVICE
LIB="$OUT/library"
step library 60 python -m cathode_ray.cli library generate --from ../shared/data/mp_litmo_summary.jsonl.gz \
    --n "$(pick 4096 256)" --out "$LIB" --overwrite
step feed "$(pick 240 400)" python scripts/bench_feed.py --model mace-medium-shape --library "$LIB/candidates-00000.parquet" \
    --n "$(pick 3072 32)" --device $DEVICE --batch-rows "$(pick 256 16)" --max-edges "$(pick 400000 50000)" --calls-per-actor 1 2
step chgnet_batch 60 python scripts/bench_chgnet_batch.py --n "$(pick 64 8)" --device $DEVICE --repeats "$(pick 10 2)"
step chgnet_layers 90 python scripts/bench_chgnet_layers.py --n "$(pick 128 8)" --per-call $(pick "4 32 128" 4) \
    --device $DEVICE --repeats "$(pick 5 1)"
