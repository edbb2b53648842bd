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
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
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

step ensemble_mace 330 python scripts/bench_ensemble.py --backbone mace-medium-shape --n 512 --batch 64 --device cuda --rounds 2
step ensemble_chgnet 180 python scripts/bench_ensemble.py --backbone chgnet --n 384 --batch 64 --device cuda --rounds 2
step precision_chgnet 60 python scripts/bench_precision.py --backbone chgnet --n 256 --batch 64 --device cuda
LIB="$OUT/library"
step library 60 python -m cathode_ray.cli library generate --from ../shared/data/mp_litmo_summary.jsonl.gz \
    --n 4096 --out "$LIB" --overwrite
step feed 240 python scripts/bench_feed.py --model mace-medium-shape --library "$LIB/candidates-00000.parquet" \
    --n 3072 --device cuda --batch-rows 256 --max-edges 400000 --calls-per-actor 1 2
step chgnet_batch 60 python scripts/bench_chgnet_batch.py --n 64 --device cuda
step chgnet_layers 90 python scripts/bench_chgnet_layers.py --n 128 --per-call 4 32 128 --device cuda --repeats 5
