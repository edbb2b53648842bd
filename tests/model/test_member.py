"""Head, normalizer and member: shapes, modes, quantile ordering, serialisation."""

from __future__ import annotations

import pytest
import torch

from cathode_ray.model.head import EhullHead, HeadConfig
from cathode_ray.model.member import Normalizer, ThermoInputs


def test_head_config_validates() -> None:
    with pytest.raises(ValueError, match="mode"):
        HeadConfig(mode="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        HeadConfig(dropout=1.0)
    with pytest.raises(TypeError):
        HeadConfig("delta")  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize("mode", ["delta", "embedding"])
def test_head_outputs_ordered_quantiles(mode: str) -> None:
    torch.manual_seed(0)
    head = EhullHead(8, HeadConfig(mode=mode)).eval()  # type: ignore[arg-type]
    emb = torch.randn(5, 8)
    zs = torch.randn(5)
    out = head(emb, zs, torch.tensor([True, True, False, True, False]))
    assert set(out) == {"q10", "q50", "q90", "logit_stable", "logit_metastable"}
    assert all(v.shape == (5,) for v in out.values())
    assert torch.all(out["q10"] <= out["q50"]) and torch.all(out["q50"] <= out["q90"])


def test_delta_head_adds_zero_shot_only_where_reference_exists() -> None:
    torch.manual_seed(0)
    head = EhullHead(4, HeadConfig(mode="delta")).eval()
    emb = torch.randn(1, 4).repeat(2, 1)
    has = torch.tensor([True, True])
    a = head(emb, torch.tensor([0.0, 1.0]), has)["q50"]
    # same embedding, zero-shot differs by 1 -> q50 differs by 1 plus the hidden layer's response
    assert not torch.isclose(a[0], a[1])
    none = head(emb, torch.tensor([0.0, 5.0]), torch.tensor([False, False]))["q50"]
    assert torch.isclose(none[0], none[1])  # no reference: zero-shot ignored


def test_embedding_head_ignores_zero_shot() -> None:
    torch.manual_seed(0)
    head = EhullHead(4, HeadConfig(mode="embedding")).eval()
    emb = torch.randn(2, 4)
    has = torch.ones(2, dtype=torch.bool)
    a = head(emb, torch.zeros(2), has)["q50"]
    b = head(emb, torch.full((2,), 3.0), has)["q50"]
    assert torch.equal(a, b)


def test_normalizer_round_trip_and_validation() -> None:
    n = Normalizer.fit(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    y = torch.tensor([0.05, 0.5])
    assert torch.allclose(n.decode(n.encode(y)), y)
    assert Normalizer.from_json(n.to_json()) == n
    with pytest.raises(ValueError):
        Normalizer(mean=0.0, std=0.0)


def test_thermo_inputs_to_device() -> None:
    th = ThermoInputs(hull_pa=torch.zeros(2), corr_pa=torch.zeros(2), has_ref=torch.ones(2, dtype=torch.bool))
    assert th.to("cpu").has_ref.dtype == torch.bool
