"""Candidate generation from real parent structures (``cathode-ray library generate``).

Each draw takes a random parent and applies, in this order (at least one of them):

* transition-metal substitution ``A -> B`` on ``k`` of the ``m`` A sites (full when ``k == m``),
  over ``GenerateConfig.transition_metals`` (Ti V Cr Mn Fe Co Ni Cu),
* removal of 1..``max_li_vacancies`` Li sites (at least one Li is kept),
* a small lattice strain (``min_strain``..``max_strain``, isotropic or along one lattice vector).

Draw ``d`` uses ``numpy.random.default_rng([seed, d])``, draws are processed in order, so the output
is the same for the same seed and parents whatever the number of worker processes.

De-duplication uses a cheap fingerprint (:func:`structure_fingerprint`): SHA-1 of the reduced
formula, the lattice lengths (0.01 A) and angles (0.1 deg) with the axes in order of length, and the
species-sorted fractional coordinates (on those axes) rounded to 1e-3. It is not symmetry-aware: two symmetry-equivalent orderings with
different site labels count as distinct (a StructureMatcher pass would be far slower).

Output: Parquet shards ``candidates-00000.parquet`` ... (``shard_size`` rows each) under ``out``
(local directory or ``s3://bucket/prefix``) with columns structure_id, parent_id, transformation,
structure_json, formula, chemsys, nsites.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import resource
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pymatgen.core import Lattice, Structure

from cathode_ray import seedcard
from cathode_ray.data.library import LIBRARY_ROW_GROUP_ROWS
from cathode_ray.data.parse import structure_from_untrusted_dict

log = logging.getLogger(__name__)

CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("structure_id", pa.string(), nullable=False),
        pa.field("parent_id", pa.string(), nullable=False),
        pa.field("transformation", pa.string(), nullable=False),
        pa.field("structure_json", pa.string(), nullable=False),
        pa.field("formula", pa.string(), nullable=False),
        pa.field("chemsys", pa.string(), nullable=False),
        pa.field("nsites", pa.int32(), nullable=False),
    ]
)

#: Candidate tuple as produced by workers: (fingerprint, parent_id, transformation, structure_json,
#: formula, chemsys, nsites).
Candidate = tuple[str, str, str, str, str, str, int]


def structure_fingerprint(structure: Structure) -> str:
    """Cheap de-duplication key (hex SHA-1); see the module docstring for what it ignores.

    The axes are put in order of length, and the angles (each opposite its axis) and the
    fractional coordinates' columns go with them; where lengths tie, the smallest key over the
    tied orders is used, so relabelling axes of equal length gives the same key."""
    lattice = structure.lattice
    lengths = np.round(np.asarray(lattice.abc), 2)  # (3,) Angstrom
    angles = np.round(np.asarray(lattice.angles), 1)  # (3,) degrees; angle i is opposite axis i
    frac = np.round(np.mod(structure.frac_coords, 1.0), 3) % 1.0  # (n_sites, 3)
    symbols = [site.species_string for site in structure]
    formula = structure.composition.reduced_formula
    keys = []
    for order in itertools.permutations(range(3)):
        axes = list(order)
        if not np.all(np.diff(lengths[axes]) >= 0):
            continue
        sites = sorted(zip(symbols, map(tuple, frac[:, axes].tolist()), strict=True))
        keys.append(repr((formula, lengths[axes].tolist(), angles[axes].tolist(), sites)))
    return hashlib.sha1(min(keys).encode("utf-8")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    """Candidate generation settings.

    Attributes:
        source: parents: a snapshot JSON-lines path (MP summary docs; ``snapshot:PATH`` too) or
            any library spec.
        n: number of distinct candidates to write.
        out: output directory or ``s3://bucket/prefix`` for the Parquet shards.
        seed: random seed (same seed + same parents -> same candidates and ids).
        shard_size: rows per Parquet shard.
        workers: worker processes (0: one per CPU core; 1: in-process).
        chunk_size: draws per work item.
        transition_metals: substitution alphabet.
        min_strain / max_strain: absolute lattice strain range (fraction, 0.01 = 1 %).
        max_li_vacancies: most Li sites removed per candidate.
        max_parent_sites: parents with more sites are skipped (keeps inference cheap).
        overwrite: replace existing ``candidates-*.parquet`` in ``out``.
    """

    source: str
    n: int
    out: str
    seed: int = 0
    shard_size: int = 10_000
    workers: int = 0
    chunk_size: int = 500
    transition_metals: tuple[str, ...] = seedcard.TRANSITION_METALS
    min_strain: float = 0.01
    max_strain: float = 0.03
    max_li_vacancies: int = 2
    max_parent_sites: int = 100
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.shard_size < 1 or self.chunk_size < 1:
            raise ValueError("shard_size and chunk_size must be >= 1")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = one per core), got {self.workers}")
        if not 0 <= self.min_strain <= self.max_strain < 0.2:
            raise ValueError("need 0 <= min_strain <= max_strain < 0.2 (fractions)")
        if len(self.transition_metals) < 2:
            raise ValueError("transition_metals needs at least two elements to substitute")
        if self.max_li_vacancies < 0 or self.max_parent_sites < 1:
            raise ValueError("max_li_vacancies must be >= 0 and max_parent_sites >= 1")
        if not self.source or not self.out:
            raise ValueError("source and out are required")


@dataclass(frozen=True, kw_only=True)
class GenerateResult:
    """What :func:`run` wrote and how fast."""

    out: str
    shards: tuple[str, ...]
    n_candidates: int
    n_parents: int
    n_parent_rejects: int
    n_parents_too_large: int
    n_draws: int
    n_duplicates: int
    seconds: float
    structures_per_s: float
    peak_rss_mb: float  # max of this process and its workers, MiB
    parent_rejects: tuple[dict[str, str], ...] = field(default=())


# --------------------------------------------------------------------------- parents
def load_parents(config: GenerateConfig) -> tuple[list[tuple[str, dict]], list[dict], int]:
    """Validated parents ``[(parent_id, Structure.as_dict() without site properties)]``, the
    reject rows, and how many were skipped as larger than ``max_parent_sites``."""
    from cathode_ray.data.library import iter_library
    from cathode_ray.data.validate import ValidationConfig, validate_rows

    # "snapshot:PATH", as ingest's --source takes it, names the same JSON lines as PATH
    valid, rejects = validate_rows(iter_library(config.source.removeprefix("snapshot:")),
                                   ValidationConfig())
    parents: list[tuple[str, dict]] = []
    too_large = 0
    for row in valid:
        if row["nsites"] > config.max_parent_sites:
            too_large += 1
            continue
        structure = Structure.from_str(row["structure_json"], fmt="json")
        bare = Structure(structure.lattice, structure.species, structure.frac_coords)
        parents.append((row["structure_id"], bare.as_dict()))
    return parents, rejects, too_large


# --------------------------------------------------------------------------- drawing
_PARENTS: list[tuple[str, Structure]] = []


def _init_worker(parents: list[tuple[str, dict]]) -> None:
    global _PARENTS
    _PARENTS = [(pid, structure_from_untrusted_dict(d)) for pid, d in parents]


def _substitute(rng: np.random.Generator, s: Structure, config: GenerateConfig) -> str | None:
    symbols = [site.specie.symbol for site in s]
    present = [t for t in config.transition_metals if t in symbols]
    if not present:
        return None
    old = str(rng.choice(present))
    new = str(rng.choice([t for t in config.transition_metals if t != old]))
    sites = [i for i, sym in enumerate(symbols) if sym == old]
    k = int(rng.integers(1, len(sites) + 1))
    for i in sorted(rng.choice(sites, size=k, replace=False).tolist()):
        s.replace(i, new)
    return f"sub {old}->{new} {k}/{len(sites)}"


def _vacancies(rng: np.random.Generator, s: Structure, config: GenerateConfig) -> str | None:
    li = [i for i, site in enumerate(s) if site.specie.symbol == "Li"]
    most = min(config.max_li_vacancies, len(li) - 1)
    if most < 1:
        return None
    k = int(rng.integers(1, most + 1))
    s.remove_sites(sorted(rng.choice(li, size=k, replace=False).tolist()))
    return f"vac Li {k}/{len(li)}"


def _strain(rng: np.random.Generator, s: Structure, config: GenerateConfig) -> str:
    eps = float(rng.uniform(config.min_strain, config.max_strain)) * float(rng.choice([-1, 1]))
    eps = round(eps, 3)
    axis = int(rng.integers(4))  # 0..2: along lattice vector a/b/c, 3: isotropic
    scale = np.full(3, 1 + eps) if axis == 3 else np.where(np.arange(3) == axis, 1 + eps, 1.0)
    s.lattice = Lattice(s.lattice.matrix * scale[:, None])  # (3, 3) Angstrom, rows scaled
    where = "" if axis == 3 else f" {'abc'[axis]}"
    return f"strain{where} {eps * 100:+.1f}%"


def draw_candidate(draw: int, config: GenerateConfig) -> Candidate:
    """Candidate number ``draw`` (deterministic in ``(config.seed, draw)`` and the parents)."""
    rng = np.random.default_rng([config.seed, draw])
    parent_id, parent = _PARENTS[int(rng.integers(len(_PARENTS)))]
    s = parent.copy()
    ops = [
        _substitute(rng, s, config) if rng.random() < 0.8 else None,
        _vacancies(rng, s, config) if rng.random() < 0.3 else None,
    ]
    if rng.random() < 0.6 or not any(ops):
        ops.append(_strain(rng, s, config))
    composition = s.composition
    return (structure_fingerprint(s), parent_id, "; ".join(o for o in ops if o), s.to_json(),
            composition.reduced_formula, composition.chemical_system, len(s))


def _draw_chunk(start: int, stop: int, config: GenerateConfig) -> list[Candidate]:
    return [draw_candidate(d, config) for d in range(start, stop)]


def _chunks(config: GenerateConfig, workers: int) -> Iterator[list[Candidate]]:
    """Chunks of candidates in draw order, forever (the caller stops)."""
    step = config.chunk_size
    if workers <= 1:
        start = 0
        while True:
            yield _draw_chunk(start, start + step, config)
            start += step
    ctx = mp.get_context("spawn")  # safe next to threads (Ray, pyarrow); pays one import per worker
    with ctx.Pool(workers, initializer=_init_worker, initargs=(_parent_payload(),)) as pool:
        pending: deque = deque()
        start = 0
        while True:
            while len(pending) < 2 * workers:
                pending.append(pool.apply_async(_draw_chunk, (start, start + step, config)))
                start += step
            yield pending.popleft().get()


def _parent_payload() -> list[tuple[str, dict]]:
    return [(pid, s.as_dict()) for pid, s in _PARENTS]


# --------------------------------------------------------------------------- writing
class _ShardWriter:
    """Buffers candidate rows and writes ``candidates-NNNNN.parquet`` shards of shard_size rows."""

    def __init__(self, out: str, shard_size: int, overwrite: bool) -> None:
        from cathode_ray.storage import filesystem_for

        self.fs, self.root = filesystem_for(out)
        self.out = out.rstrip("/")
        self.shard_size = shard_size
        self.rows: list[dict[str, Any]] = []
        self.shards: list[str] = []
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        self.fs.create_dir(self.root, recursive=True)
        selector = pafs.FileSelector(self.root, recursive=False)
        old = [i.path for i in self.fs.get_file_info(selector)
               if i.base_name.startswith("candidates-") and i.base_name.endswith(".parquet")]
        if old and not overwrite:
            raise FileExistsError(
                f"{self.out} already holds {len(old)} candidate shards; pick a new --out or "
                "set overwrite"
            )
        for path in old:
            self.fs.delete_file(path)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"candidates-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=CANDIDATE_SCHEMA)
        pq.write_table(table, f"{self.root}/{name}", filesystem=self.fs,
                       row_group_size=LIBRARY_ROW_GROUP_ROWS)
        self.shards.append(f"{self.out}/{name}")
        self.rows = []


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # ru_maxrss is KiB on Linux


def id_prefix(config: GenerateConfig, parent_ids: list[str]) -> str:
    """``cand-<seed>-<digest>``: the digest (8 hex) covers the parents and every setting that
    changes what is drawn, so libraries generated from other parents or settings never share ids
    (screened together, equal ids would reject the later structures as ``duplicate_id``), while
    the same parents, settings and seed give the same ids again."""
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("source", "n", "out", "shard_size", "workers", "chunk_size", "overwrite")}
    blob = json.dumps({"parents": sorted(parent_ids), **settings}, sort_keys=True, default=list)
    return f"cand-{config.seed}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def run(config: GenerateConfig) -> GenerateResult:
    """Generate ``config.n`` distinct candidates from the parents in ``config.source``."""
    t0 = time.perf_counter()
    parents, rejects, too_large = load_parents(config)
    if not parents:
        raise ValueError(
            f"no usable parent structures in {config.source!r} ({len(rejects)} rejected, "
            f"{too_large} larger than max_parent_sites={config.max_parent_sites})"
        )
    _init_worker(parents)
    prefix = id_prefix(config, [pid for pid, _ in parents])
    workers = config.workers or (os.cpu_count() or 1)
    writer = _ShardWriter(config.out, config.shard_size, config.overwrite)
    seen: set[bytes] = set()
    draws = duplicates = written = 0
    max_draws = 50 * config.n + 10_000
    t1 = time.perf_counter()
    chunks = _chunks(config, workers)
    try:
        for chunk in chunks:
            for fingerprint, parent_id, transformation, sjson, formula, chemsys, nsites in chunk:
                draws += 1
                key = bytes.fromhex(fingerprint)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                writer.add({"structure_id": f"{prefix}-{written:07d}",
                            "parent_id": parent_id, "transformation": transformation,
                            "structure_json": sjson, "formula": formula, "chemsys": chemsys,
                            "nsites": nsites})
                written += 1
                if written == config.n:
                    break
            if written == config.n:
                break
            if draws >= max_draws:
                raise RuntimeError(f"only {written} distinct candidates after {draws} draws; "
                                   "use more parents or a smaller n")
    finally:
        chunks.close()
    writer.flush()
    elapsed = time.perf_counter() - t0
    log.info("generated %d candidates in %.1f s (%d duplicates)", written, elapsed, duplicates)
    return GenerateResult(
        out=config.out, shards=tuple(writer.shards), n_candidates=written, n_parents=len(parents),
        n_parent_rejects=len(rejects), n_parents_too_large=too_large, n_draws=draws,
        n_duplicates=duplicates, seconds=elapsed,
        structures_per_s=written / max(time.perf_counter() - t1, 1e-9),
        peak_rss_mb=_peak_rss_mb(), parent_rejects=tuple(rejects),
    )
