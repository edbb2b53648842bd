"""Synthetic ensemble predictions with known heteroscedastic noise (eV/atom)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import norm

from cathode_ray.model.prediction import EnsemblePrediction

Synth = tuple[EnsemblePrediction, np.ndarray, np.ndarray, list[dict[str, float]]]


def make_synthetic(n: int, seed: int, *, members: int = 5, dim: int = 8,
                   shift: float = 0.0) -> Synth:
    """(pred, y [N], clusters [N], compositions) with y = max(0.25 x + sigma(x) eps, 0) (E_hull is
    never negative), sigma = 0.01 + 0.06 x; member intervals are 30% too narrow so conformal has
    work to do."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, n)  # [N]
    sigma = 0.01 + 0.06 * x
    y = np.maximum(0.25 * x + sigma * rng.standard_normal(n), 0.0)
    q50 = 0.25 * x[None, :] + 0.005 * rng.standard_normal((members, n))  # [M, N]
    half = 1.2816 * 0.7 * sigma[None, :]
    p_st = norm.cdf((0.05 - q50) / sigma[None, :])
    p_meta = norm.cdf((0.10 - q50) / sigma[None, :])
    emb = rng.standard_normal((n, dim)) + shift  # [N, D]
    emb[:, 0] += 3.0 * x
    li = rng.uniform(0.1, 0.3, n)
    comps = [{"Li": float(a), "Mn": 0.2, "Fe": 0.1, "O": 0.5 - float(a) + 0.2} for a in li]
    clusters = np.minimum((x * 4).astype(np.int64), 3)
    pred = EnsemblePrediction(
        q10=q50 - half, q50=q50, q90=q50 + half, p_stable=p_st, p_metastable=p_meta,
        embedding=emb, zero_shot_ehull=0.25 * x + 0.05 * rng.standard_normal(n),
        has_reference=np.ones(n, dtype=bool),
    )
    return pred, y, clusters, comps


@pytest.fixture(scope="session")
def synth() -> Callable[..., Synth]:
    return make_synthetic
