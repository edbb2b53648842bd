"""E_hull head: quantiles (q10/q50/q90) and stability probabilities from a structure embedding.

Two modes (:class:`HeadConfig.mode`):

- ``delta`` (default): the head also sees the backbone's zero-shot E_hull (its own energy against
  the reference hull) and predicts a correction to it: ``q50 = zs + raw50`` where a reference hull
  exists. Rows without references fall back to the embedding-only path (``has_ref = 0``); the
  path is trained by dropping the reference on a fraction of training rows.
- ``embedding``: the seed card's plain head on the embedding alone.

All values inside the head are in *normalised* E_hull units ``(E - mean) / std``
(see :class:`cathode_ray.model.member.Normalizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from cathode_ray import seedcard

HeadMode = Literal["delta", "embedding"]


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Head architecture (seed card: Linear(D -> 128) + ReLU + Dropout(0.1))."""

    mode: HeadMode = "delta"
    hidden: int = seedcard.HEAD_HIDDEN
    dropout: float = seedcard.HEAD_DROPOUT

    def __post_init__(self) -> None:
        if self.mode not in ("delta", "embedding"):
            raise ValueError(f"head mode must be 'delta' or 'embedding', got {self.mode!r}")
        if self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("hidden must be >= 1 and dropout in [0, 1)")


class EhullHead(nn.Module):
    """Maps (embedding [B, D], zero-shot E_hull [B], has_ref [B]) to normalised outputs.

    The embedding is standardised with per-channel statistics of the training set, stored as
    buffers (``in_mean``, ``in_std``) so they travel with the member's tensors.

    Returns a dict of [B] tensors: ``q10``, ``q50``, ``q90`` (normalised E_hull) and
    ``logit_stable``, ``logit_metastable``.
    """

    def __init__(self, embedding_dim: int, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("in_mean", torch.zeros(embedding_dim))
        self.register_buffer("in_std", torch.ones(embedding_dim))
        extra = 2 if config.mode == "delta" else 0
        self.hidden = nn.Sequential(
            nn.Linear(embedding_dim + extra, config.hidden), nn.ReLU(), nn.Dropout(config.dropout)
        )
        # raw50, d_lo, d_hi, logit_stable, logit_metastable
        self.out = nn.Linear(config.hidden, 5)

    def forward(
        self, emb: torch.Tensor, zs_norm: torch.Tensor, has_ref: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # emb [B, D]; zs_norm [B] (0 where has_ref is False); has_ref [B] bool
        emb = (emb - self.in_mean) / self.in_std
        if self.config.mode == "delta":
            ref = has_ref.to(emb.dtype)
            zs = torch.where(has_ref, zs_norm, torch.zeros_like(zs_norm))
            x = torch.cat([emb, (zs * ref)[:, None], ref[:, None]], dim=1)  # [B, D + 2]
        else:
            ref = torch.zeros_like(zs_norm)
            zs = torch.zeros_like(zs_norm)
            x = emb
        o = self.out(self.hidden(x))  # [B, 5]
        q50 = o[:, 0] + zs * ref
        return {
            "q10": q50 - F.softplus(o[:, 1]),
            "q50": q50,
            "q90": q50 + F.softplus(o[:, 2]),
            "logit_stable": o[:, 3],
            "logit_metastable": o[:, 4],
        }

    @torch.no_grad()
    def fit_input_scaling(self, emb: torch.Tensor) -> None:
        """Set the standardisation buffers from training embeddings emb [N, D]."""
        self.in_mean.copy_(emb.mean(0))
        self.in_std.copy_(emb.std(0).clamp_min(1e-6))
