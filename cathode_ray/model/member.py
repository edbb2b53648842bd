"""One ensemble member: the backbone's trainable last block plus the E_hull head.

The member turns cached trunk features into E_hull quantiles. Its zero-shot input is the
backbone's own energy against the reference hull, kept differentiable::

    zs = e_pa(last_block) + mp2020_correction_pa - hull_energy_pa        # eV/atom, [B]

``hull_pa`` (hull energy per atom at the structure's composition, leave-self-out for training
materials) and ``corr_pa`` (0 for backbones that already predict MP2020-compatible energies) are
computed by the data layer and passed in, so the model stays free of pymatgen.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .backbones.base import Backbone, LastBlock, TrunkBatch, segment_mean
from .compiled import LastBlockFn
from .head import EhullHead, HeadConfig
from .stacked import precision_context


@dataclass(frozen=True, kw_only=True)
class Normalizer:
    """E_hull standardisation fitted on the train split: ``(E - mean) / std`` (eV/atom)."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"invalid normalizer mean={self.mean} std={self.std}")

    @classmethod
    def fit(cls, y: torch.Tensor) -> Normalizer:
        return cls(mean=float(y.mean()), std=float(y.std().clamp_min(1e-6)))

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean) / self.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Normalizer:
        d = json.loads(text)
        return cls(mean=float(d["mean"]), std=float(d["std"]))


@dataclass(frozen=True, kw_only=True)
class ThermoInputs:
    """Per-structure hull inputs for a batch (eV/atom, all [B]); ``has_ref`` False where the
    chemical system has no reference entries (then ``hull_pa`` is ignored)."""

    hull_pa: torch.Tensor
    corr_pa: torch.Tensor
    has_ref: torch.Tensor

    def to(self, device: torch.device | str) -> ThermoInputs:
        return ThermoInputs(
            hull_pa=self.hull_pa.to(device), corr_pa=self.corr_pa.to(device), has_ref=self.has_ref.to(device)
        )


class Member(nn.Module):
    """Last block + head. ``forward`` returns E_hull outputs in eV/atom (decoded).

    The head sees the last block's structure embedding [B, D] concatenated with the frozen
    trunk's mean scalar node features [B, D'] (both standardised), plus the zero-shot E_hull.
    """

    def __init__(self, last_block: LastBlock, head_in_dim: int, head: HeadConfig, normalizer: Normalizer) -> None:
        super().__init__()
        self.last_block = last_block
        self.head = EhullHead(head_in_dim, head)
        self.normalizer = normalizer

    @classmethod
    def create(cls, backbone: Backbone, head: HeadConfig, normalizer: Normalizer) -> Member:
        dim = backbone.embedding_dim + backbone.trunk_embedding_dim
        return cls(backbone.new_last_block(), dim, head, normalizer)

    def head_inputs(self, batch: TrunkBatch, thermo: ThermoInputs, precision: str = "float32",
                    last_block: LastBlockFn | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [B, D + D'], zero-shot E_hull [B] eV/atom (0 without reference), e_pa [B]).

        ``precision`` applies to the last block only (see :mod:`cathode_ray.model.stacked`); its
        outputs are cast back to float32 and the head always runs in float32. ``last_block``
        replaces the call of ``self.last_block`` (this member's compiled last block, see
        :mod:`cathode_ray.model.compiled`).
        """
        block = self.last_block if last_block is None else last_block
        with precision_context(precision, batch["n_atoms"].device):
            e_pa, emb = block(batch)  # [B] eV/atom, [B, D]
        e_pa, emb = e_pa.float(), emb.float()
        trunk = segment_mean(batch["node_scalars"], batch["atom_owners"], batch["n_atoms"])  # [B, D']
        zs = e_pa + thermo.corr_pa - thermo.hull_pa  # [B] zero-shot E_hull, eV/atom
        zs = torch.where(thermo.has_ref, zs, torch.zeros_like(zs))
        return torch.cat([emb, trunk], dim=1), zs, e_pa

    def forward(self, batch: TrunkBatch, thermo: ThermoInputs, precision: str = "float32",
                last_block: LastBlockFn | None = None) -> dict[str, torch.Tensor]:
        x, zs, e_pa = self.head_inputs(batch, thermo, precision, last_block)
        return self.outputs(x, zs, e_pa, thermo.has_ref)

    def outputs(self, x: torch.Tensor, zs: torch.Tensor, e_pa: torch.Tensor,
                has_ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs from precomputed head inputs (the head-only fast path uses this)."""
        out = self.head(x, self.normalizer.encode(zs), has_ref)
        emb = x
        n = self.normalizer
        return {
            "q10_norm": out["q10"], "q50_norm": out["q50"], "q90_norm": out["q90"],
            "q10": n.decode(out["q10"]), "q50": n.decode(out["q50"]), "q90": n.decode(out["q90"]),
            "logit_stable": out["logit_stable"], "logit_metastable": out["logit_metastable"],
            "p_stable": torch.sigmoid(out["logit_stable"]),
            "p_metastable": torch.sigmoid(out["logit_metastable"]),
            "zero_shot": torch.where(has_ref, zs, torch.full_like(zs, float("nan"))),
            "energy_pa": e_pa,
            "embedding": emb,
        }

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors (last block + head), detached on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
