"""Seed-card defaults, named once. Every config dataclass takes its defaults from here.

Units: energies in eV/atom, distances in Angstrom.
"""

from __future__ import annotations

#: Ensemble member seeds (one member per seed).
SEEDS: tuple[int, ...] = (42, 43, 44, 45, 46)

#: "Stable" means E_hull below this (eV/atom); "metastable" below the second.
STABLE_EHULL: float = 0.05
METASTABLE_EHULL: float = 0.10

#: Quantiles predicted by every member head.
QUANTILES: tuple[float, float, float] = (0.1, 0.5, 0.9)

#: Conformal target coverage and the Mondrian minimum calibration points per cluster.
TARGET_COVERAGE: float = 0.90
MONDRIAN_MIN_POINTS: int = 50

#: SOAP-LOCO clustering.
SOAP_CLUSTERS: int = 8
SOAP_R_CUT: float = 5.0  # Angstrom
SPLIT_SEED: int = 42

#: Validation limits.
MAX_ATOMS: int = 500
MIN_DISTANCE: float = 0.5  # Angstrom
#: A CIF whose site loop has more rows than this many times ``max_atoms`` is rejected before
#: pymatgen builds it (its cost grows with the square of the sites): even if every few rows
#: shared one site (split disorder), the cell would still be over ``max_atoms``.
CIF_ROWS_PER_ATOM_CAP: int = 4
#: A site whose one element has an occupancy within this of 1 counts as fully occupied: CIFs
#: from structure databases round full sites to 0.9999 or 1.0001.
OCCUPANCY_TOLERANCE: float = 0.01

#: Chemistry scope of the product.
TRANSITION_METALS: tuple[str, ...] = ("Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu")
#: TMs with labelled training data in the offline snapshot; others are out of domain.
TRAINED_TRANSITION_METALS: tuple[str, ...] = ("Mn", "Fe", "Co", "Ni")

#: Reduced-precision inference (tf32 / bf16) must move q50 and energies by at most this much
#: against float32 on the first batch of a screen, else the screen falls back to float32.
PRECISION_MAX_DEVIATION: float = 1e-3  # eV/atom

#: Screening inference batches: rows per inference call, and the directed-edge budget of one
#: sub-batch inside it, for CPU and GPU inference actors. On an H100 (5 MACE-MP-0-medium-shaped
#: members, ~2,900 edges per structure) 256 rows / 400,000 edges ran the inference stage 1.57x
#: faster than 32 / 50,000 (docs/performance.md); lower the edge budget on GPUs under 40 GB. On
#: CPU small sub-batches stay in cache: 12,500 edges ran the inference stage 1.3x (bundled CHGNet
#: ensemble, 1 and 2 threads) and 1.5x (five MACE-MP-0-medium-shaped members) faster than 50,000.
INFERENCE_BATCH_ROWS_CPU: int = 32
INFERENCE_BATCH_ROWS_GPU: int = 256
MAX_EDGES_PER_BATCH_CPU: int = 12_500
MAX_EDGES_PER_BATCH_GPU: int = 400_000
#: glibc malloc in inference processes (``screen.malloc.retain_freed_memory``): blocks up to the
#: mmap threshold come from the heap, and freed heap memory is returned to the system only above
#: the trim threshold. With glibc's adaptive defaults every sub-batch's tensors of a few MB were
#: mapped and unmapped again: ~5,000 page faults per structure, a quarter of the bundled CHGNet
#: ensemble's inference time on CPU (docs/performance.md); these values cost ~45 MB of resident memory.
MALLOC_MMAP_THRESHOLD_BYTES: int = 32 * 2**20  # glibc's largest allowed value on 64-bit
MALLOC_TRIM_THRESHOLD_BYTES: int = 128 * 2**20
#: Concurrent calls per inference actor (Ray Data ``max_concurrent_calls_per_actor``): with 2,
#: the next call's input batch is assembled (blocks fetched, graphs unpickled into a DataFrame)
#: and the last call's output serialised while the model runs; the model itself still runs one
#: call at a time. GPU actors use 2 (Ray's recommendation for CPU batching around GPU work, not
#: yet measured on a GPU here); CPU actors 1, where the threads would only share the same cores.
INFERENCE_CALLS_PER_ACTOR_CPU: int = 1
INFERENCE_CALLS_PER_ACTOR_GPU: int = 2
#: CPU stages per GPU inference actor, when not given: the most graph-building actors (an
#: autoscaling pool that starts at one and grows while blocks queue) and read/validate tasks.
#: One GPU runs five members at ~400-600 structures/s (H100); one graph actor builds ~170-250
#: MACE graphs/s with hull inputs and SOAP, or ~110 CHGNet graphs/s; one validate task ~300/s
#: (docs/performance.md). With CPU inference actors the screen uses one of each (2-core
#: measurements).
GRAPH_ACTORS_PER_GPU: int = 8
LIGHT_TASKS_PER_GPU: int = 2
#: Seconds a screen with GPU actors waits for the cluster to have that many GPUs (an autoscaling
#: GPU pool starts nodes on demand, in minutes) before it fails with a clear error; without the
#: wait, Ray Data would wait for the GPU actors forever. A local Ray started by the screen itself
#: cannot gain GPUs, so it fails at once.
GPU_WAIT_S: float = 900.0

#: Head and optimisation.
HEAD_HIDDEN: int = 128
HEAD_DROPOUT: float = 0.1
LR_HEAD: float = 1e-3
LR_BACKBONE: float = 1e-5
MICRO_BATCH: int = 16
GRAD_ACCUM: int = 4
PATIENCE: int = 12
EARLY_STOP_HOLDOUT: float = 0.15  # of training rows, with ``--early-stopping holdout``
MAX_EPOCHS: int = 200
BCE_WEIGHT: float = 0.05
