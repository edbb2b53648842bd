import dataclasses

import numpy as np
import pytest

from cathode_ray.calibrate.aggregate import aggregate
from cathode_ray.model.prediction import EnsemblePrediction


def _pred() -> EnsemblePrediction:
    q50 = np.array([[0.0, 0.10], [0.2, 0.30]])  # [M=2, N=2]
    return EnsemblePrediction(
        q10=q50 - np.array([[0.1, 0.05], [0.3, 0.05]]), q50=q50, q90=q50 + 0.1,
        p_stable=np.array([[1.0, 0.2], [0.5, 0.0]]), p_metastable=np.ones((2, 2)),
        embedding=np.zeros((2, 3)), zero_shot_ehull=np.full(2, np.nan),
        has_reference=np.zeros(2, dtype=bool),
    )


def test_aggregate_hand_values() -> None:
    agg = aggregate(_pred())
    np.testing.assert_allclose(agg.q50, [0.1, 0.2])
    np.testing.assert_allclose(agg.lo, [-0.1, 0.05])
    np.testing.assert_allclose(agg.hi, [0.3, 0.4])
    np.testing.assert_allclose(agg.epistemic_std, [0.1, 0.1])
    np.testing.assert_allclose(agg.aleatoric_width, [0.3, 0.15])
    np.testing.assert_allclose(agg.p_stable, [0.75, 0.1])
    assert len(agg) == 2 and len(agg.subset(np.array([1]))) == 1


def test_aggregated_rejects_mismatched_shapes() -> None:
    agg = aggregate(_pred())
    with pytest.raises(ValueError):
        type(agg)(**{**agg.__dict__, "lo": np.zeros(3)})


def test_p_metastable_is_never_below_p_stable() -> None:
    p = _pred()
    # member 0 of row 0: independent logits gave P(E < 0.10) = 0.3 < P(E < 0.05) = 1.0
    incoherent = dataclasses.replace(p, p_metastable=np.array([[0.3, 1.0], [1.0, 1.0]]))
    agg = aggregate(incoherent)
    np.testing.assert_allclose(agg.p_metastable, [1.0, 1.0])  # member 0 raised to its 1.0
    assert np.all(agg.p_metastable >= agg.p_stable)
    np.testing.assert_allclose(agg.p_stable, [0.75, 0.1])  # p_stable untouched
