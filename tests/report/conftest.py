"""Synthetic labelled splits and a fitted calibrator for report tests (eV/atom)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import norm

from cathode_ray.calibrate.calibrator import Calibrator
from cathode_ray.model.prediction import EnsemblePrediction
from cathode_ray.report.governance import SplitData


def make_split(n: int, seed: int, *, noise_scale: float = 1.0, shift: float = 0.0) -> SplitData:
    """y = max(0.25 x + sigma(x) eps, 0) (E_hull is never negative) with sigma = 0.01 + 0.06 x;
    members 30% too narrow."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, n)
    sigma = 0.01 + 0.06 * x
    y = np.maximum(0.25 * x + noise_scale * sigma * rng.standard_normal(n), 0.0)
    q50 = 0.25 * x[None, :] + 0.005 * rng.standard_normal((5, n))  # [M, N]
    half = 1.2816 * 0.7 * sigma[None, :]
    emb = rng.standard_normal((n, 6)) + shift
    emb[:, 0] += 3.0 * x
    pred = EnsemblePrediction(
        q10=q50 - half, q50=q50, q90=q50 + half, p_stable=norm.cdf((0.05 - q50) / sigma),
        p_metastable=norm.cdf((0.10 - q50) / sigma), embedding=emb,
        zero_shot_ehull=np.where(rng.uniform(size=n) < 0.2, np.nan,
                                 0.25 * x + 0.08 * rng.standard_normal(n)),
        has_reference=np.ones(n, dtype=bool),
    )
    comps = [{"Li": 1.0, "Mn": 1.0, "O": 2.0} for _ in range(n)]
    return SplitData(y=y, pred=pred, clusters=np.minimum((x * 4).astype(np.int64), 3),
                     compositions=comps)


@pytest.fixture(scope="session")
def split_factory() -> Callable[..., SplitData]:
    return make_split


@pytest.fixture(scope="session")
def fitted_report_inputs() -> tuple[dict[str, SplitData], Calibrator]:
    train, val = make_split(800, 31), make_split(2000, 32)
    splits = {"val": val, "test": make_split(1500, 33), "loco": make_split(600, 34)}
    cal = Calibrator.fit(val.pred, val.y, val.clusters, val.compositions, train.pred,
                         train.compositions)
    return splits, cal
