"""What an ensemble hands to calibration: per-member arrays for N structures (pure numpy).

Shapes: M members, N structures, D embedding channels. Energies in eV/atom.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class EnsemblePrediction:
    """Raw (uncalibrated) ensemble output.

    Attributes:
        q10, q50, q90: member quantiles of E_hull, eV/atom, each [M, N].
        p_stable: member P(E_hull < 0.05 eV/atom), [M, N].
        p_metastable: member P(E_hull < 0.10 eV/atom), [M, N].
        embedding: frozen-trunk structure embedding shared by all members, [N, D]
            (used by the embedding OOD gate).
        zero_shot_ehull: the backbone's own E_hull against the reference hull, eV/atom, [N];
            NaN where the chemical system has no reference entries.
        has_reference: whether the delta (zero-shot + correction) path was used, [N] bool.
    """

    q10: np.ndarray
    q50: np.ndarray
    q90: np.ndarray
    p_stable: np.ndarray
    p_metastable: np.ndarray
    embedding: np.ndarray
    zero_shot_ehull: np.ndarray
    has_reference: np.ndarray

    def __post_init__(self) -> None:
        m, n = self.q50.shape
        for name in ("q10", "q90", "p_stable", "p_metastable"):
            if getattr(self, name).shape != (m, n):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {(m, n)}")
        if self.embedding.shape[0] != n:
            raise ValueError(f"embedding has {self.embedding.shape[0]} rows, expected {n}")
        for name in ("zero_shot_ehull", "has_reference"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {(n,)}")

    @property
    def n_members(self) -> int:
        return int(self.q50.shape[0])

    def __len__(self) -> int:
        return int(self.q50.shape[1])

    def finite(self) -> np.ndarray:
        """[N] bool: every member's quantiles and probabilities and the embedding are finite
        (``zero_shot_ehull`` is NaN by design where a system has no reference hull)."""
        ok = np.ones(len(self), dtype=bool)
        for name in ("q10", "q50", "q90", "p_stable", "p_metastable"):
            ok &= np.isfinite(getattr(self, name)).all(axis=0)
        return ok & np.isfinite(self.embedding.reshape(len(self), -1)).all(axis=1)

    def take(self, idx: np.ndarray) -> EnsemblePrediction:
        """The structures ``idx`` [K] (indices into N), in that order."""
        return EnsemblePrediction(
            q10=self.q10[:, idx], q50=self.q50[:, idx], q90=self.q90[:, idx],
            p_stable=self.p_stable[:, idx], p_metastable=self.p_metastable[:, idx],
            embedding=self.embedding[idx], zero_shot_ehull=self.zero_shot_ehull[idx],
            has_reference=self.has_reference[idx],
        )

    @staticmethod
    def concat(parts: list[EnsemblePrediction]) -> EnsemblePrediction:
        """Join predictions for consecutive batches of structures along N."""
        if not parts:
            raise ValueError("nothing to concatenate")
        cat1 = lambda k: np.concatenate([getattr(p, k) for p in parts], axis=1)  # noqa: E731
        cat0 = lambda k: np.concatenate([getattr(p, k) for p in parts], axis=0)  # noqa: E731
        return EnsemblePrediction(
            q10=cat1("q10"), q50=cat1("q50"), q90=cat1("q90"), p_stable=cat1("p_stable"),
            p_metastable=cat1("p_metastable"), embedding=cat0("embedding"),
            zero_shot_ehull=cat0("zero_shot_ehull"), has_reference=cat0("has_reference"),
        )
