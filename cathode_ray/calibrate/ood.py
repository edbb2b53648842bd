"""Out-of-domain (OOD) gates: composition, embedding kNN distance, ensemble disagreement.

Gate values per structure [N]:

* ``composition_jaccard``: min over training compositions of 1 - Jaccard(element sets), [0, 1].
* ``composition_l1``: L1 distance between fractional compositions to the nearest training
  composition, [0, 2]. Elements unseen in training count through an extra "other" channel.
* ``embedding_pct``: mean distance to the k nearest training embeddings (standardised), as a
  percentile [0, 1] of the training set's own leave-one-out kNN distances.
* ``epistemic_pct``: ensemble std of the medians (eV/atom) as a percentile [0, 1] of a
  reference distribution (calibration or training rows).

Gates fire independently (``composition``: an element unseen in training — always — or Jaccard
distance / L1 above threshold; ``embedding`` / ``disagreement``: percentile above threshold).
``ood_score = sigmoid(w . [jaccard, l1, embedding_pct, epistemic_pct, unseen] + b)`` in [0, 1];
``is_ood`` = any gate fired or ``ood_score >= score_threshold``. Default weights: for an
in-domain row (exact composition match, percentiles uniform) the score reaches 0.5 only when
``embedding_pct + epistemic_pct >= 1.9`` (about 0.5% of in-domain rows).

Persisted without pickle: ``ood_params.json`` + ``ood_train.npz`` (``allow_pickle=False``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.neighbors import NearestNeighbors

GATE_NAMES: tuple[str, ...] = ("composition", "embedding", "disagreement")
SCORE_FEATURES: tuple[str, ...] = (
    "composition_jaccard", "composition_l1", "embedding_pct", "epistemic_pct", "unseen_element",
)
PARAMS_FILE = "ood_params.json"
TRAIN_FILE = "ood_train.npz"
_EPS = 1e-12


@dataclass(frozen=True, kw_only=True)
class OODConfig:
    """OOD gate thresholds and the sigmoid combination.

    Attributes:
        k: neighbours for the embedding gate.
        embedding_pct_threshold: embedding gate fires when its percentile is above this.
        epistemic_pct_threshold: disagreement gate fires when its percentile is above this.
        jaccard_threshold: composition gate fires when the Jaccard distance is above this
            (0.0 = any element set not seen in training fires).
        l1_threshold: composition gate fires when the fractional-composition L1 is above this.
        weights: sigmoid weights, one per feature in SCORE_FEATURES.
        bias: sigmoid bias.
        score_threshold: is_ood when ood_score >= this (besides any fired gate).
    """

    k: int = 5
    embedding_pct_threshold: float = 0.99
    epistemic_pct_threshold: float = 0.99
    jaccard_threshold: float = 1.0 / 3.0
    l1_threshold: float = 0.5
    weights: tuple[float, ...] = (6.0, 4.0, 10.0, 10.0, 4.0)
    bias: float = -19.0
    score_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        for name in ("embedding_pct_threshold", "epistemic_pct_threshold", "score_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.jaccard_threshold <= 1.0:
            raise ValueError(f"jaccard_threshold must be in [0, 1], got {self.jaccard_threshold}")
        if not 0.0 <= self.l1_threshold <= 2.0:
            raise ValueError(f"l1_threshold must be in [0, 2], got {self.l1_threshold}")
        if len(self.weights) != len(SCORE_FEATURES):
            raise ValueError(f"weights needs {len(SCORE_FEATURES)} entries {SCORE_FEATURES}")


@dataclass(frozen=True, kw_only=True)
class OODResult:
    """Per-structure OOD output; every array is [N].

    Attributes:
        ood_score: sigmoid combination in [0, 1].
        ood_gates: comma-joined names of fired gates ("" when none), object array of str.
        is_ood: any gate fired or ood_score >= score_threshold.
        composition_jaccard, composition_l1, embedding_dist, embedding_pct, epistemic_pct:
            raw gate values (embedding_dist in standardised embedding units).
        unseen_elements: comma-joined element symbols absent from training ("" when none).
    """

    ood_score: np.ndarray
    ood_gates: np.ndarray
    is_ood: np.ndarray
    composition_jaccard: np.ndarray
    composition_l1: np.ndarray
    embedding_dist: np.ndarray
    embedding_pct: np.ndarray
    epistemic_pct: np.ndarray
    unseen_elements: np.ndarray

    def __len__(self) -> int:
        return int(self.ood_score.shape[0])

    @staticmethod
    def in_domain(n: int) -> OODResult:
        """A result that flags nothing for n rows (for callers without an OOD model)."""
        z = np.zeros(n, dtype=np.float64)
        e = np.full(n, "", dtype=object)
        return OODResult(ood_score=z, ood_gates=e, is_ood=np.zeros(n, dtype=bool),
                         composition_jaccard=z, composition_l1=z, embedding_dist=z,
                         embedding_pct=z, epistemic_pct=z, unseen_elements=e)


def composition_matrix(compositions: Sequence[Mapping[str, float]], elements: Sequence[str]
                       ) -> tuple[np.ndarray, list[str]]:
    """Fractional compositions [N, E + 1] over ``elements`` plus a last "other" column.

    Returns the matrix and, per row, the comma-joined symbols not in ``elements``.
    """
    index = {el: i for i, el in enumerate(elements)}
    mat = np.zeros((len(compositions), len(elements) + 1), dtype=np.float64)
    unseen: list[str] = []
    for row, comp in enumerate(compositions):
        total = sum(float(v) for v in comp.values() if float(v) > 0)
        other: list[str] = []
        for el, amount in comp.items():
            amount = float(amount)
            if amount <= 0:
                continue
            col = index.get(el)
            if col is None:
                other.append(el)
                col = len(elements)
            mat[row, col] += amount / max(total, _EPS)
        unseen.append(",".join(sorted(other)))
    return mat, unseen


def _jaccard_min(present: np.ndarray, n_unseen: np.ndarray, ref_sets: np.ndarray) -> np.ndarray:
    """Min Jaccard distance [N] from element sets present [N, E] (bool, training vocabulary)
    plus n_unseen [N] extra elements (never in training) to training sets ref_sets [S, E]."""
    inter = present.astype(np.float64) @ ref_sets.T.astype(np.float64)  # [N, S]
    size_q = present.sum(axis=1) + n_unseen  # [N]
    union = size_q[:, None] + ref_sets.sum(axis=1)[None, :] - inter  # [N, S]
    return 1.0 - (inter / np.maximum(union, 1.0)).max(axis=1)


def _percentile(values: np.ndarray, sorted_ref: np.ndarray) -> np.ndarray:
    """Fraction [N] of the sorted reference [T] that is <= each value."""
    return np.searchsorted(sorted_ref, values, side="right") / max(sorted_ref.shape[0], 1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class OODModel:
    """Fitted OOD gates. Build with :meth:`fit` or :meth:`load`; query with :meth:`score`."""

    def __init__(self, *, config: OODConfig, elements: list[str], emb_mean: np.ndarray,
                 emb_std: np.ndarray, train_embeddings: np.ndarray, train_fractions: np.ndarray,
                 loo_dist_sorted: np.ndarray, epistemic_sorted: np.ndarray) -> None:
        self.config = config
        self.elements = elements
        self.emb_mean = emb_mean  # [D]
        self.emb_std = emb_std  # [D]
        self.train_embeddings = train_embeddings  # [T, D] standardised
        self.train_fractions = train_fractions  # [U, E + 1] unique fractional compositions
        self.loo_dist_sorted = loo_dist_sorted  # [T]
        self.epistemic_sorted = epistemic_sorted  # [R], eV/atom
        self._train_sets = np.unique(train_fractions[:, :-1] > 0, axis=0)  # [S, E]
        # as many neighbours as the leave-one-out reference had (a training row has T - 1 others)
        k = min(config.k, train_embeddings.shape[0] - 1)
        self._emb_nn = NearestNeighbors(n_neighbors=k).fit(train_embeddings)
        self._comp_nn = NearestNeighbors(n_neighbors=1, metric="manhattan").fit(train_fractions)

    @classmethod
    def fit(cls, train_embeddings: np.ndarray, train_compositions: Sequence[Mapping[str, float]],
            train_epistemic: np.ndarray, config: OODConfig | None = None) -> OODModel:
        """Fit from training embeddings [T, D], compositions (len T) and a reference
        distribution of epistemic std [R] (eV/atom)."""
        config = config or OODConfig()
        emb = np.asarray(train_embeddings, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] < 2:
            raise ValueError(f"need >= 2 training embeddings [T, D], got shape {emb.shape}")
        mean, std = emb.mean(axis=0), emb.std(axis=0)
        std = np.where(std > _EPS, std, 1.0)
        z = (emb - mean) / std  # [T, D]
        k = min(config.k, z.shape[0] - 1)
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)  # [T, k + 1]
        loo = dist[:, 1:].mean(axis=1)  # drop self (distance 0 comes first)
        elements = sorted({el for c in train_compositions for el, v in c.items() if v > 0})
        fractions, _ = composition_matrix(train_compositions, elements)
        epi = np.asarray(train_epistemic, dtype=np.float64)
        return cls(config=config, elements=elements, emb_mean=mean, emb_std=std,
                   train_embeddings=z, train_fractions=np.unique(fractions, axis=0),
                   loo_dist_sorted=np.sort(loo), epistemic_sorted=np.sort(epi[np.isfinite(epi)]))

    def _composition(self, compositions: Sequence[Mapping[str, float]]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(jaccard [N], l1 [N], unseen symbols [N] object)."""
        frac, unseen = composition_matrix(compositions, self.elements)  # [N, E + 1]
        n_unseen = np.array([len(u.split(",")) if u else 0 for u in unseen], dtype=np.float64)
        jac = _jaccard_min(frac[:, :-1] > 0, n_unseen, self._train_sets)
        l1 = self._comp_nn.kneighbors(frac)[0][:, 0] if len(frac) else np.zeros(0)
        return jac, l1, np.array(unseen, dtype=object)

    def score(self, embeddings: np.ndarray, compositions: Sequence[Mapping[str, float]],
              epistemic: np.ndarray) -> OODResult:
        """Gate values, fired gates and the combined score for embeddings [N, D],
        compositions (len N) and epistemic std [N] (eV/atom)."""
        cfg = self.config
        n = int(np.asarray(epistemic).shape[0])
        if n == 0:
            return OODResult.in_domain(0)
        jac, l1, unseen = self._composition(compositions)
        z = (np.asarray(embeddings, dtype=np.float64) - self.emb_mean) / self.emb_std
        emb_dist = self._emb_nn.kneighbors(z)[0].mean(axis=1)  # [N]
        emb_pct = _percentile(emb_dist, self.loo_dist_sorted)
        epi_pct = _percentile(np.asarray(epistemic, dtype=np.float64), self.epistemic_sorted)
        has_unseen = unseen != ""
        fired = np.stack([
            has_unseen | (jac > cfg.jaccard_threshold) | (l1 > cfg.l1_threshold),
            emb_pct > cfg.embedding_pct_threshold,
            epi_pct > cfg.epistemic_pct_threshold,
        ], axis=1)  # [N, 3]
        feats = np.stack([jac, l1, emb_pct, epi_pct, has_unseen.astype(np.float64)], axis=1)
        ood_score = _sigmoid(feats @ np.asarray(cfg.weights) + cfg.bias)  # [N]
        names = np.array(GATE_NAMES, dtype=object)
        gates = np.array([",".join(names[row]) for row in fired], dtype=object)
        return OODResult(
            ood_score=ood_score, ood_gates=gates,
            is_ood=fired.any(axis=1) | (ood_score >= cfg.score_threshold),
            composition_jaccard=jac, composition_l1=l1, embedding_dist=emb_dist,
            embedding_pct=emb_pct, epistemic_pct=epi_pct, unseen_elements=unseen,
        )

    def save(self, directory: str | Path) -> list[Path]:
        """Write ood_params.json and ood_train.npz into ``directory``; returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params: dict[str, Any] = {"config": asdict(self.config), "elements": self.elements}
        params["config"]["weights"] = list(self.config.weights)
        p_json, p_npz = directory / PARAMS_FILE, directory / TRAIN_FILE
        p_json.write_text(json.dumps(params, indent=2, sort_keys=True))
        np.savez(p_npz, emb_mean=self.emb_mean, emb_std=self.emb_std,
                 train_embeddings=self.train_embeddings, train_fractions=self.train_fractions,
                 loo_dist_sorted=self.loo_dist_sorted, epistemic_sorted=self.epistemic_sorted)
        return [p_json, p_npz]

    @classmethod
    def load(cls, directory: str | Path) -> OODModel:
        """Rebuild from :meth:`save` output (no refitting beyond the kNN indices)."""
        directory = Path(directory)
        params = json.loads((directory / PARAMS_FILE).read_text())
        cfg = dict(params["config"])
        cfg["weights"] = tuple(float(w) for w in cfg["weights"])
        with np.load(directory / TRAIN_FILE, allow_pickle=False) as arrs:
            data = {k: arrs[k] for k in arrs.files}
        return cls(config=OODConfig(**cfg), elements=list(params["elements"]), **data)
