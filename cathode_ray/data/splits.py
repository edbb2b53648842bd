"""SOAP-LOCO splits: cluster structures by their averaged SOAP fingerprint, hold one cluster out.

:class:`SoapClusterer` describes each structure by one averaged SOAP vector (dscribe,
``average="inner"``, periodic, cutoff ``r_cut`` in Angstrom), standardises it (scikit-learn
``StandardScaler``) and clusters with ``KMeans`` (k = seedcard.SOAP_CLUSTERS, seed 42). It
serialises to pure JSON (:meth:`SoapClusterer.to_dict`) so a model directory can carry it and the
screening pipeline can assign clusters to new structures.

Species unseen at fit time: SOAP's species list is fixed at fit time, so sites of unseen species
are removed before describing a structure (the remaining framework is what the clusters know);
a structure with no known species at all is described by the zero vector. Both still get the
nearest cluster; :meth:`SoapClusterer.unseen_species` tells the caller which structures were
affected (the OOD gates decide what that means).

:func:`make_splits` returns ``train``/``val``/``test``/``loco`` per row: ``loco`` is one held-out
cluster (plus every row sharing a reduced formula with it, so no composition leaks across); the
rest is split grouped by reduced formula (no formula in two splits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from ase import Atoms
from dscribe.descriptors import SOAP
from pymatgen.core import Structure
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances_argmin
from sklearn.preprocessing import StandardScaler

from cathode_ray import seedcard

SPLITS: tuple[str, ...] = ("train", "val", "test", "loco")
#: Default LOCO rule: hold out the cluster whose (formula-closed) size is nearest this fraction.
LOCO_TARGET_FRACTION: float = 0.10
_FORMAT_VERSION: int = 1


@dataclass(frozen=True, kw_only=True)
class SoapConfig:
    """SOAP + KMeans settings. ``r_cut`` and ``sigma`` in Angstrom."""

    r_cut: float = seedcard.SOAP_R_CUT
    n_max: int = 4
    l_max: int = 3
    sigma: float = 0.5
    n_clusters: int = seedcard.SOAP_CLUSTERS
    seed: int = seedcard.SPLIT_SEED
    n_jobs: int = 1

    def __post_init__(self) -> None:
        if not self.r_cut > 1.0:
            raise ValueError(f"r_cut must be > 1 Angstrom, got {self.r_cut}")
        if self.n_max < 1 or self.l_max < 0:
            raise ValueError(f"need n_max >= 1 and l_max >= 0, got {self.n_max}, {self.l_max}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0 Angstrom, got {self.sigma}")
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if self.n_jobs < 1:
            raise ValueError(f"n_jobs must be >= 1, got {self.n_jobs}")


def _symbols(structure: Structure) -> set[str]:
    return {el.symbol for el in structure.composition.elements}


def _atoms(structure: Structure) -> Atoms:
    """Bare periodic ``ase.Atoms`` (elements, cell and positions in Angstrom: all SOAP reads).

    4x cheaper than ``AseAtomsAdaptor.get_atoms``, which also copies site properties, charges
    and magnetic moments.
    """
    return Atoms(numbers=structure.atomic_numbers, cell=structure.lattice.matrix,
                 positions=structure.cart_coords, pbc=True)


class SoapClusterer:
    """Averaged-SOAP + StandardScaler + KMeans clusterer of periodic structures."""

    def __init__(self, config: SoapConfig | None = None) -> None:
        self.config = config or SoapConfig()
        self.species: list[str] = []
        self.mean: np.ndarray | None = None  # [n_features]
        self.scale: np.ndarray | None = None  # [n_features]
        self.centers: np.ndarray | None = None  # [n_clusters, n_features] (standardised space)
        self._descriptor: tuple[tuple[str, ...], SOAP] | None = None  # (species, SOAP) cache

    # -- descriptors ----------------------------------------------------------------------
    def _soap(self) -> SOAP:
        """The dscribe descriptor for the current species list, built once (0.6 ms each)."""
        species = tuple(self.species)
        if self._descriptor is None or self._descriptor[0] != species:
            c = self.config
            soap = SOAP(species=list(species), r_cut=c.r_cut, n_max=c.n_max, l_max=c.l_max,
                        sigma=c.sigma, periodic=True, average="inner")
            self._descriptor = (species, soap)
        return self._descriptor[1]

    def _known_part(self, structure: Structure) -> Structure | None:
        unseen = _symbols(structure) - set(self.species)
        if not unseen:
            return structure
        keep = [i for i, site in enumerate(structure) if site.specie.symbol not in unseen]
        if not keep:
            return None
        return Structure.from_sites([structure[i] for i in keep])

    def describe(self, structures: Sequence[Structure]) -> np.ndarray:
        """Averaged SOAP vectors [N, n_features] (unseen species removed, see module doc)."""
        soap = self._soap()
        out = np.zeros((len(structures), soap.get_number_of_features()))  # [N, F]
        parts = [self._known_part(s) for s in structures]
        idx = [i for i, p in enumerate(parts) if p is not None]
        if idx:
            atoms = [_atoms(parts[i]) for i in idx]
            feats = soap.create(atoms, n_jobs=self.config.n_jobs)  # [n, F] (or [F] when n == 1)
            out[idx] = np.asarray(feats).reshape(len(idx), -1)
        return out

    # -- fit / assign ---------------------------------------------------------------------
    def fit(self, structures: Sequence[Structure]) -> SoapClusterer:
        """Fit species list, scaler and KMeans on ``structures``; returns self."""
        self.fit_assign(structures)
        return self

    def fit_assign(self, structures: Sequence[Structure]) -> np.ndarray:
        """Fit, and return the cluster id per training structure, int [N] (one SOAP pass)."""
        if len(structures) < self.config.n_clusters:
            raise ValueError(
                f"need at least n_clusters={self.config.n_clusters} structures, got "
                f"{len(structures)}; lower n_clusters"
            )
        self.species = sorted(set().union(*(_symbols(s) for s in structures)))
        features = self.describe(structures)  # [N, F]
        scaler = StandardScaler().fit(features)
        self.mean, self.scale = scaler.mean_, scaler.scale_
        kmeans = KMeans(
            n_clusters=self.config.n_clusters, random_state=self.config.seed, n_init=10
        ).fit(scaler.transform(features))
        self.centers = kmeans.cluster_centers_
        return kmeans.labels_.astype(int)

    def _check_fitted(self) -> None:
        if self.centers is None or self.mean is None or self.scale is None:
            raise RuntimeError("SoapClusterer is not fitted; call fit() or from_dict() first")

    def transform(self, structures: Sequence[Structure]) -> np.ndarray:
        """Standardised SOAP vectors [N, n_features]."""
        self._check_fitted()
        return (self.describe(structures) - self.mean) / self.scale

    def assign(self, structures: Sequence[Structure]) -> np.ndarray:
        """Nearest cluster id per structure, int array [N]."""
        if len(structures) == 0:
            return np.zeros(0, dtype=int)
        self._check_fitted()
        labels = pairwise_distances_argmin(self.transform(structures), self.centers)
        return labels.astype(int)

    def unseen_species(self, structures: Sequence[Structure]) -> list[list[str]]:
        """Per structure, the species (sorted) the clusterer did not see at fit time."""
        return [sorted(_symbols(s) - set(self.species)) for s in structures]

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Pure-JSON state: config, species, scaler mean/scale, KMeans centres."""
        self._check_fitted()
        return {
            "format_version": _FORMAT_VERSION,
            "config": asdict(self.config),
            "species": list(self.species),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "centers": self.centers.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoapClusterer:
        """Inverse of :meth:`to_dict`."""
        if data.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"soap clusterer format {data.get('format_version')!r} is not "
                f"{_FORMAT_VERSION}; re-run ingest to regenerate soap_clusterer.json"
            )
        obj = cls(SoapConfig(**data["config"]))
        obj.species = [str(s) for s in data["species"]]
        obj.mean = np.asarray(data["mean"], dtype=float)
        obj.scale = np.asarray(data["scale"], dtype=float)
        obj.centers = np.asarray(data["centers"], dtype=float)
        return obj


# ------------------------------------------------------------------------------- splits
def _formula_closed(formulas: pd.Series, clusters: np.ndarray, cluster: int) -> np.ndarray:
    """Boolean mask [N]: rows of ``cluster`` plus rows sharing a formula with it."""
    held = set(formulas[clusters == cluster])
    return formulas.isin(held).to_numpy()


def choose_loco_cluster(
    formulas: pd.Series, clusters: np.ndarray, *, target_fraction: float = LOCO_TARGET_FRACTION
) -> int:
    """Cluster whose formula-closed held-out set is nearest ``target_fraction`` of the rows.

    Ties go to the lower cluster id; clusters that would hold out everything are skipped.
    """
    n = len(clusters)
    best: tuple[float, int] | None = None
    for cluster in sorted(set(clusters.tolist())):
        size = int(_formula_closed(formulas, clusters, cluster).sum())
        if size >= n:
            continue
        score = abs(size / n - target_fraction)
        if best is None or score < best[0]:
            best = (score, cluster)
    if best is None:
        raise ValueError("no cluster can be held out without holding out every row")
    return best[1]


def _grouped_split(
    groups: pd.Series, *, seed: int, fractions: tuple[float, float, float]
) -> np.ndarray:
    """train/val/test [N] by whole groups: shuffled groups go to the split furthest below target."""
    sizes = groups.value_counts(sort=False)
    order = np.random.default_rng(seed).permutation(np.asarray(sorted(sizes.index)))
    target = np.asarray(fractions) * len(groups)  # [3] rows
    filled = np.zeros(3)
    assign: dict[str, str] = {}
    for group in order:
        k = int(np.argmax(target - filled))
        assign[group] = SPLITS[k]
        filled[k] += sizes[group]
    return groups.map(assign).to_numpy(dtype=object)


def holdout_rows(groups: Sequence[str], *, fraction: float, seed: int = seedcard.SPLIT_SEED) -> np.ndarray:
    """Bool [N]: about ``fraction`` of the rows, by whole groups (reduced formulas), held out of
    a split, e.g. the training rows that stop training early so that val only calibrates."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = _grouped_split(pd.Series(list(groups), dtype=str), seed=seed,
                            fractions=(1.0 - fraction, fraction, 0.0))
    held = labels == SPLITS[1]
    if held.all() or not held.any():
        raise ValueError(f"cannot hold out {fraction:.0%} of {len(labels)} rows in "
                         f"{len(set(groups))} formula groups and keep some on each side")
    return held


def make_splits(
    df: pd.DataFrame,
    *,
    clusters: np.ndarray,
    seed: int = seedcard.SPLIT_SEED,
    loco_cluster: int | None = None,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    group_col: str = "formula",
) -> np.ndarray:
    """Split labels [N] in {train, val, test, loco}; deterministic for a given seed.

    Args:
        df: one row per material with a reduced-formula column ``group_col``.
        clusters: SOAP cluster id per row, int [N].
        seed: shuffling seed for the grouped train/val/test split.
        loco_cluster: cluster to hold out; ``None`` uses :func:`choose_loco_cluster` (nearest
            10% of rows); ``-1`` disables LOCO.
        fractions: train/val/test row fractions for the non-LOCO rows (sum to 1).
    """
    clusters = np.asarray(clusters)
    if len(clusters) != len(df):
        raise ValueError(f"clusters has {len(clusters)} entries for {len(df)} rows")
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    if group_col not in df.columns:
        raise ValueError(f"df needs a {group_col!r} column (reduced formula) to group splits")
    formulas = df[group_col].astype(str).reset_index(drop=True)
    if loco_cluster is None:
        loco_cluster = choose_loco_cluster(formulas, clusters)
    elif loco_cluster != -1 and loco_cluster not in set(clusters.tolist()):
        raise ValueError(f"loco_cluster {loco_cluster} is not among the clusters")
    held = (
        _formula_closed(formulas, clusters, loco_cluster)
        if loco_cluster != -1
        else np.zeros(len(df), dtype=bool)
    )
    out = np.full(len(df), "loco", dtype=object)
    if (~held).any():
        out[~held] = _grouped_split(formulas[~held], seed=seed, fractions=fractions)
    return out.astype(str)
