import json

import numpy as np
import pytest

from cathode_ray.calibrate.ood import OODConfig, OODModel, OODResult, composition_matrix


def _train(n: int = 300, seed: int = 0) -> tuple[np.ndarray, list[dict[str, float]], np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, 4))
    tm = ["Mn", "Fe", "Co", "Ni"]
    comps = [{"Li": 1.0, tm[i % 4]: 1.0, "O": 2.0} for i in range(n)]
    return emb, comps, np.abs(rng.normal(0.02, 0.01, n))


def test_composition_matrix_fractions_and_unseen() -> None:
    mat, unseen = composition_matrix([{"Li": 1, "Mn": 1, "O": 2}, {"Ti": 1, "O": 1}],
                                     ["Li", "Mn", "O"])
    np.testing.assert_allclose(mat, [[0.25, 0.25, 0.5, 0.0], [0.0, 0.0, 0.5, 0.5]])
    assert unseen == ["", "Ti"]


def test_in_domain_rows_do_not_fire() -> None:
    emb, comps, epi = _train()
    model = OODModel.fit(emb, comps, epi)
    res = model.score(emb[:3] * 0.5, [{"Li": 1, "Mn": 1, "O": 2}] * 3, np.full(3, 0.02))
    np.testing.assert_allclose(res.composition_jaccard, 0.0)
    np.testing.assert_allclose(res.composition_l1, 0.0, atol=1e-12)
    assert list(res.ood_gates) == ["", "", ""] and not res.is_ood.any()
    assert (res.ood_score < 0.5).all()


@pytest.mark.parametrize("tm", ["Ti", "V", "Cr", "Cu"])
def test_unseen_element_always_fires_composition(tm: str) -> None:
    emb, comps, epi = _train()
    # a tiny dopant amount: Jaccard/L1 small-ish, but the element is unseen -> must fire
    model = OODModel.fit(emb, comps, epi, OODConfig(jaccard_threshold=1.0, l1_threshold=2.0))
    res = model.score(emb[:1], [{"Li": 1.0, "Mn": 0.99, tm: 0.01, "O": 2.0}], np.full(1, 0.02))
    assert res.ood_gates[0] == "composition" and res.is_ood[0]
    assert res.unseen_elements[0] == tm
    # Jaccard: {Li, Mn, X, O} vs {Li, Mn, O} -> 1 - 3/4
    assert res.composition_jaccard[0] == pytest.approx(0.25)


def test_embedding_and_disagreement_gates_fire() -> None:
    emb, comps, epi = _train()
    model = OODModel.fit(emb, comps, epi)
    far = np.full((1, 4), 25.0)
    res = model.score(far, comps[:1], np.full(1, 0.5))
    assert res.embedding_pct[0] == 1.0 and res.epistemic_pct[0] == 1.0
    assert res.ood_gates[0] == "embedding,disagreement"
    assert res.ood_score[0] > 0.5 and res.is_ood[0]


def test_embedding_percentile_of_training_like_points_is_uniformish() -> None:
    emb, comps, epi = _train(600, 1)
    model = OODModel.fit(emb[:400], comps[:400], epi[:400])
    res = model.score(emb[400:], comps[400:], epi[400:])
    assert 0.35 < np.median(res.embedding_pct) < 0.65
    assert res.is_ood.mean() < 0.1


def test_save_load_round_trip_exact(tmp_path) -> None:
    emb, comps, epi = _train()
    model = OODModel.fit(emb, comps, epi, OODConfig(k=3))
    paths = model.save(tmp_path)
    assert {p.name for p in paths} == {"ood_params.json", "ood_train.npz"}
    json.loads(paths[0].read_text())
    loaded = OODModel.load(tmp_path)
    q_emb = np.random.default_rng(5).standard_normal((20, 4)) * 2
    q_comp = comps[:19] + [{"Li": 1, "V": 1, "O": 2}]
    a = model.score(q_emb, q_comp, epi[:20] * 3)
    b = loaded.score(q_emb, q_comp, epi[:20] * 3)
    for name in a.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert loaded.config == model.config


def test_in_domain_result_and_config_validation() -> None:
    assert not OODResult.in_domain(4).is_ood.any()
    with pytest.raises(ValueError):
        OODConfig(weights=(1.0,))
    with pytest.raises(ValueError):
        OODConfig(embedding_pct_threshold=1.5)


def test_embedding_gate_uses_as_many_neighbours_as_its_reference_on_tiny_training_sets() -> None:
    """With T <= k training rows the leave-one-out reference averages T - 1 neighbours, so a new
    row's distance does too (it averaged T before: an extra far neighbour made every row look
    further out than the training rows it is compared with)."""
    train = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # T = 3 < k = 5
    comps = [{"Li": 0.5, "O": 0.5}] * 3
    model = OODModel.fit(train, comps, np.array([0.01, 0.02, 0.03]), OODConfig(k=5))
    query = np.array([[0.2, 0.1]])
    res = model.score(query, comps[:1], np.array([0.02]))
    z_train = (train - train.mean(axis=0)) / train.std(axis=0)
    z_query = (query - train.mean(axis=0)) / train.std(axis=0)
    two_nearest = np.sort(np.linalg.norm(z_train - z_query, axis=1))[:2]
    assert res.embedding_dist[0] == pytest.approx(two_nearest.mean())
