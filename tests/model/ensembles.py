"""Small ensembles for the model tests: members that really differ, and hull inputs."""

from __future__ import annotations

from typing import Any

import torch

from cathode_ray.model.backbones import Backbone
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.model.head import HeadConfig
from cathode_ray.model.member import Member, Normalizer, ThermoInputs


def perturbed_ensemble(bb: Backbone, n_members: int = 3, *, head_only: bool = False, seed: int = 100,
                       **options: Any) -> Ensemble:
    """``n_members`` members whose last blocks differ (pretrained weights perturbed by ~2 % of their
    scale) and whose heads differ (seeds ``seed``...). ``options``: Ensemble fields
    (``stack_members``, ``compile_model``, ...)."""
    norm = Normalizer(mean=0.08, std=0.05)
    members = []
    for i in range(n_members):
        torch.manual_seed(seed + i)
        m = Member.create(bb, HeadConfig(), norm).eval()
        with torch.no_grad():
            for p in m.last_block.parameters():
                p.add_(0.02 * torch.randn_like(p) * p.abs().mean())
        members.append(m)
    manifest = {"model_id": "test", "config": {"train_last_block": not head_only}}
    return Ensemble(backbone=bb, members=members, normalizer=norm, manifest=manifest, uri="-", files={},
                    **options)


def thermo(n: int) -> ThermoInputs:
    """Hull inputs for ``n`` structures (eV/atom); every third has no reference entries."""
    return ThermoInputs(hull_pa=torch.linspace(-6.5, -5.5, n), corr_pa=torch.zeros(n),
                        has_ref=torch.tensor([i % 3 != 2 for i in range(n)]))
