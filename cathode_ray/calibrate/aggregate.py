"""Collapse per-member ensemble quantiles into one prediction per structure (pure numpy).

Energies in eV/atom. Shapes: M members, N structures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cathode_ray.model.prediction import EnsemblePrediction


@dataclass(frozen=True, kw_only=True)
class Aggregated:
    """Ensemble summary per structure; every field is [N].

    Attributes:
        q50: mean of the member medians, eV/atom.
        lo: raw (uncalibrated) lower bound = min over members of q10, eV/atom.
        hi: raw (uncalibrated) upper bound = max over members of q90, eV/atom.
        epistemic_std: std (ddof 0) of the member medians, eV/atom.
        aleatoric_width: mean over members of (q90 - q10), eV/atom.
        p_stable: mean member P(E_hull < 0.05 eV/atom).
        p_metastable: mean member P(E_hull < 0.10 eV/atom), each member's raised to at least its
            p_stable (the head's two logits are independent; a stable structure is metastable).
    """

    q50: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    epistemic_std: np.ndarray
    aleatoric_width: np.ndarray
    p_stable: np.ndarray
    p_metastable: np.ndarray

    def __post_init__(self) -> None:
        n = self.q50.shape
        for name in ("lo", "hi", "epistemic_std", "aleatoric_width", "p_stable", "p_metastable"):
            if getattr(self, name).shape != n:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {n}")

    def __len__(self) -> int:
        return int(self.q50.shape[0])

    def subset(self, index: np.ndarray) -> Aggregated:
        """Rows selected by a boolean mask or integer index [K]."""
        return Aggregated(
            q50=self.q50[index], lo=self.lo[index], hi=self.hi[index],
            epistemic_std=self.epistemic_std[index], aleatoric_width=self.aleatoric_width[index],
            p_stable=self.p_stable[index], p_metastable=self.p_metastable[index],
        )


def aggregate(pred: EnsemblePrediction) -> Aggregated:
    """Aggregate member quantiles [M, N] into per-structure summaries [N] (eV/atom)."""
    q50 = np.asarray(pred.q50, dtype=np.float64)  # [M, N]
    q10 = np.asarray(pred.q10, dtype=np.float64)  # [M, N]
    q90 = np.asarray(pred.q90, dtype=np.float64)  # [M, N]
    p_stable = np.asarray(pred.p_stable, dtype=np.float64)  # [M, N]
    p_metastable = np.fmax(np.asarray(pred.p_metastable, dtype=np.float64), p_stable)  # [M, N]
    return Aggregated(
        q50=q50.mean(axis=0),
        lo=q10.min(axis=0),
        hi=q90.max(axis=0),
        epistemic_std=q50.std(axis=0, ddof=0),
        aleatoric_width=(q90 - q10).mean(axis=0),
        p_stable=p_stable.mean(axis=0),
        p_metastable=p_metastable.mean(axis=0),
    )
