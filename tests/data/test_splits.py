"""Tests for cathode_ray.data.splits: SOAP clustering (JSON round trip, unseen species), splits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Structure

from cathode_ray.data.splits import (
    SPLITS,
    SoapClusterer,
    SoapConfig,
    choose_loco_cluster,
    holdout_rows,
    make_splits,
)

FAST = SoapConfig(n_max=2, l_max=2, n_clusters=3)


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    from tests.conftest import tiny_summary_docs

    return [Structure.from_dict(d["structure"]) for d in tiny_summary_docs()]


@pytest.fixture(scope="module")
def fitted(structures: list[Structure]) -> SoapClusterer:
    return SoapClusterer(FAST).fit(structures)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="r_cut"):
        SoapConfig(r_cut=0.5)
    with pytest.raises(ValueError, match="n_clusters"):
        SoapConfig(n_clusters=0)


def test_fit_assign_shapes_and_determinism(
    structures: list[Structure], fitted: SoapClusterer
) -> None:
    labels = fitted.assign(structures)
    assert labels.shape == (12,) and set(labels.tolist()) <= {0, 1, 2}
    assert len(set(labels.tolist())) > 1
    assert fitted.species == ["Co", "Fe", "Li", "Mn", "Ni", "O"]
    again = SoapClusterer(FAST).fit_assign(structures)
    np.testing.assert_array_equal(again, labels)  # KMeans labels == nearest centre, same seed


def test_json_round_trip(structures: list[Structure], fitted: SoapClusterer) -> None:
    restored = SoapClusterer.from_dict(json.loads(json.dumps(fitted.to_dict())))
    np.testing.assert_array_equal(restored.assign(structures), fitted.assign(structures))
    assert restored.config == fitted.config
    with pytest.raises(ValueError, match="format"):
        SoapClusterer.from_dict({**fitted.to_dict(), "format_version": 99})


def test_describe_matches_pymatgen_ase_adaptor_and_follows_species(
    structures: list[Structure], fitted: SoapClusterer
) -> None:
    from pymatgen.io.ase import AseAtomsAdaptor

    decorated = structures[0].copy()
    decorated.add_oxidation_state_by_guess()
    decorated.add_site_property("magmom", [0.5] * len(decorated))
    reference = fitted._soap().create([AseAtomsAdaptor.get_atoms(s) for s in (structures[0], decorated)])
    np.testing.assert_allclose(fitted.describe([structures[0], decorated]), reference, rtol=0, atol=1e-12)
    # the cached descriptor follows the species list (a refit on fewer species has fewer features)
    before = fitted.describe(structures[:1]).shape[1]
    refit = SoapClusterer(FAST)
    refit.species = ["Co", "Li", "O"]
    small = refit.describe(structures[:1]).shape[1]
    refit.species = list(fitted.species)
    assert small < before == refit.describe(structures[:1]).shape[1]


def test_unseen_species_still_assigned(structures: list[Structure], fitted: SoapClusterer) -> None:
    cu = structures[0].copy()
    cu.replace_species({"Mn": "Cu"})
    labels = fitted.assign([cu, structures[0]])
    assert labels.shape == (2,) and 0 <= labels[0] < 3
    assert fitted.unseen_species([cu, structures[0]]) == [["Cu"], []]
    # Cu removed -> the Li/O framework of the Mn cell without Mn: differs from the Mn cell
    assert not np.allclose(fitted.transform([cu]), fitted.transform([structures[0]]))
    assert fitted.assign([]).shape == (0,)


def test_not_fitted_and_too_few(structures: list[Structure]) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        SoapClusterer(FAST).assign(structures)
    with pytest.raises(ValueError, match="n_clusters"):
        SoapClusterer(FAST).fit(structures[:2])


def _frame(n_formulas: int = 60, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    formulas = [f"F{i}" for i in rng.integers(0, n_formulas, size=400)]  # repeated orderings
    clusters = rng.integers(0, 8, size=400)
    clusters[:40] = 7  # cluster 7 is about 10%
    clusters[40:] = np.where(clusters[40:] == 7, 0, clusters[40:])
    return pd.DataFrame({"formula": formulas}), clusters


def test_make_splits_grouped_and_complete() -> None:
    df, clusters = _frame()
    splits = make_splits(df, clusters=clusters, seed=42, loco_cluster=7)
    assert set(splits) == set(SPLITS)
    per_formula = pd.Series(splits).groupby(df["formula"]).nunique()
    assert per_formula.max() == 1  # no formula in two splits, loco included
    assert (splits[clusters == 7] == "loco").all()
    non_loco = splits[splits != "loco"]
    frac = pd.Series(non_loco).value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.1 and abs(frac["val"] - 0.15) < 0.08


def test_make_splits_seeded() -> None:
    df, clusters = _frame()
    a = make_splits(df, clusters=clusters, seed=1, loco_cluster=7)
    np.testing.assert_array_equal(a, make_splits(df, clusters=clusters, seed=1, loco_cluster=7))
    assert not np.array_equal(a, make_splits(df, clusters=clusters, seed=2, loco_cluster=7))


def test_default_loco_rule_and_disable() -> None:
    formulas = pd.Series([f"A{i}" for i in range(100)])
    clusters = np.array([0] * 50 + [1] * 11 + [2] * 30 + [3] * 9)
    assert choose_loco_cluster(formulas, clusters) == 1  # 11% is nearer 10% than 9%? tie-> |.01|
    clusters = np.array([0] * 50 + [1] * 20 + [2] * 21 + [3] * 9)
    assert choose_loco_cluster(formulas, clusters) == 3
    no_loco = make_splits(pd.DataFrame({"formula": formulas}), clusters=clusters, loco_cluster=-1)
    assert "loco" not in set(no_loco)


def test_make_splits_bad_input() -> None:
    df, clusters = _frame()
    with pytest.raises(ValueError, match="entries"):
        make_splits(df, clusters=clusters[:-1])
    with pytest.raises(ValueError, match="fractions"):
        make_splits(df, clusters=clusters, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="not among"):
        make_splits(df, clusters=clusters, loco_cluster=42)
    with pytest.raises(ValueError, match="formula"):
        make_splits(df.rename(columns={"formula": "f"}), clusters=clusters)


def test_holdout_rows_by_whole_formula_groups() -> None:
    groups = [f"F{i % 40}" for i in range(400)]  # 40 formulas, 10 rows each
    held = holdout_rows(groups, fraction=0.15, seed=3)
    assert held.shape == (400,) and held.dtype == bool
    assert 0.12 <= held.mean() <= 0.18
    by_group = pd.Series(held).groupby(groups).agg(["min", "max"])
    assert (by_group["min"] == by_group["max"]).all()  # no formula on both sides
    assert (holdout_rows(groups, fraction=0.15, seed=3) == held).all()
    assert (holdout_rows(groups, fraction=0.15, seed=4) != held).any()
    with pytest.raises(ValueError, match="fraction"):
        holdout_rows(groups, fraction=1.0)
    with pytest.raises(ValueError, match="keep some on each side"):
        holdout_rows(["LiCoO2"] * 5, fraction=0.5)
