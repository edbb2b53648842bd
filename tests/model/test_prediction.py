import numpy as np
import pytest

from cathode_ray.model.prediction import EnsemblePrediction


def _pred(m: int = 3, n: int = 4, d: int = 2) -> EnsemblePrediction:
    rng = np.random.default_rng(0)
    q50 = rng.uniform(0, 0.2, (m, n))
    return EnsemblePrediction(q10=q50 - 0.02, q50=q50, q90=q50 + 0.02, p_stable=np.full((m, n), 0.5),
                              p_metastable=np.full((m, n), 0.7), embedding=rng.normal(size=(n, d)),
                              zero_shot_ehull=np.r_[np.nan, rng.uniform(0, 0.2, n - 1)],
                              has_reference=np.r_[False, np.ones(n - 1, dtype=bool)])


def test_shapes_are_checked() -> None:
    p = _pred()
    with pytest.raises(ValueError, match="q10"):
        EnsemblePrediction(**{**p.__dict__, "q10": p.q10[:, :2]})
    with pytest.raises(ValueError, match="embedding"):
        EnsemblePrediction(**{**p.__dict__, "embedding": p.embedding[:2]})


def test_finite_flags_any_member_or_embedding_but_not_zero_shot() -> None:
    p = _pred()
    assert p.finite().tolist() == [True] * 4  # NaN zero-shot (no reference hull) is expected
    q50, emb = p.q50.copy(), p.embedding.copy()
    q50[2, 1] = np.nan  # one member of structure 1
    emb[3, 0] = np.inf
    bad = EnsemblePrediction(**{**p.__dict__, "q50": q50, "embedding": emb})
    assert bad.finite().tolist() == [True, False, True, False]


def test_take_and_concat_round_trip() -> None:
    p = _pred()
    parts = [p.take(np.array([0, 1])), p.take(np.array([2, 3]))]
    back = EnsemblePrediction.concat(parts)
    for k, v in p.__dict__.items():
        np.testing.assert_array_equal(getattr(back, k), v)
    sub = p.take(np.array([3, 0]))
    assert len(sub) == 2 and sub.n_members == 3
    np.testing.assert_array_equal(sub.q50, p.q50[:, [3, 0]])
    np.testing.assert_array_equal(sub.embedding, p.embedding[[3, 0]])
