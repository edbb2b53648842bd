"""One member's training loop on cached frozen-trunk features (pure torch, no Ray).

Seed card: pinball loss at 0.1/0.5/0.9 + 0.05 x BCE of both classifiers on standardised targets;
AdamW, lr 1e-3 head / 1e-5 last block; micro-batch 16 x accumulation 4; early stopping with
patience 12 on validation MAE (eV/atom). The seed fixes initialisation and data order, and each
epoch's order is derived from (seed, epoch) so a resumed run replays the same order.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cathode_ray import seedcard
from cathode_ray.model.backbones.base import Backbone, TrunkFeatures
from cathode_ray.model.head import HeadConfig
from cathode_ray.model.member import Member, Normalizer, ThermoInputs


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of one member (seed-card defaults).

    ``train_last_block=False`` is the head-only ensemble mode: the backbone's last block stays at
    its pretrained weights and only the head trains (five heads cost about one member).
    ``ref_dropout`` is the fraction of training rows shown without their reference hull, which
    trains the embedding-only fallback path of a delta head.
    """

    seed: int = seedcard.SEEDS[0]
    head: HeadConfig = field(default_factory=HeadConfig)
    lr_head: float = seedcard.LR_HEAD
    lr_backbone: float = seedcard.LR_BACKBONE
    weight_decay: float = 1e-2
    micro_batch: int = seedcard.MICRO_BATCH
    grad_accum: int = seedcard.GRAD_ACCUM
    patience: int = seedcard.PATIENCE
    max_epochs: int = seedcard.MAX_EPOCHS
    bce_weight: float = seedcard.BCE_WEIGHT
    ref_dropout: float = 0.1
    train_last_block: bool = True
    eval_batch: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or self.grad_accum < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError("micro_batch, grad_accum, max_epochs and patience must be >= 1")
        if self.lr_head <= 0 or self.lr_backbone < 0:
            raise ValueError("learning rates must be positive")
        if not 0.0 <= self.ref_dropout < 1.0:
            raise ValueError("ref_dropout must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class MemberData:
    """Cached trunk features with labels and hull inputs for N structures (eV/atom)."""

    feats: Sequence[TrunkFeatures]
    y: torch.Tensor  # [N] true E_hull, eV/atom (NaN allowed only for prediction)
    hull_pa: torch.Tensor  # [N]
    corr_pa: torch.Tensor  # [N]
    has_ref: torch.Tensor  # [N] bool

    def __post_init__(self) -> None:
        n = len(self.feats)
        for name in ("y", "hull_pa", "corr_pa", "has_ref"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},)")

    def __len__(self) -> int:
        return len(self.feats)

    def thermo(self, idx: Sequence[int] | np.ndarray) -> ThermoInputs:
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ThermoInputs(hull_pa=self.hull_pa[i], corr_pa=self.corr_pa[i], has_ref=self.has_ref[i])


@dataclass(frozen=True, kw_only=True)
class EpochReport:
    """What a member reports after each epoch (also its checkpoint for fault tolerance)."""

    epoch: int
    train_loss: float
    val_mae: float
    val_spearman: float
    seconds: float
    state: dict[str, Any]  # resumable training state (see fit_member's ``resume``)


@dataclass(frozen=True, kw_only=True)
class FitResult:
    member_state: dict[str, torch.Tensor]
    best_epoch: int
    epochs_run: int
    val_mae: float
    val_spearman: float
    history: list[dict[str, float]]


def pinball(pred: torch.Tensor, y: torch.Tensor, q: float) -> torch.Tensor:
    """Mean pinball (quantile) loss of ``pred`` [B] at quantile ``q`` against ``y`` [B]."""
    d = y - pred
    return torch.maximum(q * d, (q - 1.0) * d).mean()


def member_loss(out: dict[str, torch.Tensor], y_norm: torch.Tensor, y: torch.Tensor, bce_weight: float) -> torch.Tensor:
    """Seed-card loss: pinball at 0.1/0.5/0.9 (normalised) + bce_weight x (BCE_stable + BCE_meta)."""
    q10, q50, q90 = seedcard.QUANTILES
    loss = pinball(out["q10_norm"], y_norm, q10) + pinball(out["q50_norm"], y_norm, q50)
    loss = loss + pinball(out["q90_norm"], y_norm, q90)
    s = (y < seedcard.STABLE_EHULL).to(y.dtype)
    m = (y < seedcard.METASTABLE_EHULL).to(y.dtype)
    bce = F.binary_cross_entropy_with_logits(out["logit_stable"], s)
    bce = bce + F.binary_cross_entropy_with_logits(out["logit_metastable"], m)
    return loss + bce_weight * bce


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties broken by order; fine for continuous predictions)."""
    if len(a) < 2:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


@torch.no_grad()
def predict_member(member: Member, backbone: Backbone, data: MemberData, *, batch: int = 64,
                   device: str = "cpu") -> dict[str, np.ndarray]:
    """Member outputs for every structure of ``data`` (eval mode), as [N] numpy arrays."""
    member.eval()
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(data), batch):
        idx = np.arange(start, min(start + batch, len(data)))
        b = backbone.collate([data.feats[i] for i in idx], device)
        out = member(b, data.thermo(idx).to(device))
        parts.append({k: v.detach().cpu().numpy() for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclass(frozen=True, kw_only=True)
class HeadInputs:
    """Precomputed head inputs for N rows: x [N, D + D'], zs [N] and e_pa [N] (eV/atom)."""

    x: torch.Tensor
    zs: torch.Tensor
    e_pa: torch.Tensor


@torch.no_grad()
def head_inputs(member: Member, backbone: Backbone, data: MemberData, *, batch: int = 64,
                device: str = "cpu") -> HeadInputs:
    """Run the (current) last block over ``data`` once; used for input scaling and head-only."""
    member.eval()
    xs, zss, es = [], [], []
    for start in range(0, len(data), batch):
        idx = np.arange(start, min(start + batch, len(data)))
        x, zs, e = member.head_inputs(backbone.collate([data.feats[i] for i in idx], device),
                                      data.thermo(idx).to(device))
        xs.append(x.cpu()), zss.append(zs.cpu()), es.append(e.cpu())
    return HeadInputs(x=torch.cat(xs), zs=torch.cat(zss), e_pa=torch.cat(es))


def _freeze_pretrained_block(member: Member) -> None:
    for p in member.last_block.parameters():
        p.requires_grad_(False)


def _optimizer(member: Member, config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(member.head.parameters()), "lr": config.lr_head}]
    if config.train_last_block:
        groups.append({"params": list(member.last_block.parameters()), "lr": config.lr_backbone})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _train_epoch(member: Member, backbone: Backbone, data: MemberData, opt: torch.optim.Optimizer,
                 config: TrainConfig, epoch: int, cached: HeadInputs | None = None) -> float:
    """One pass over ``data``; with ``cached`` head inputs (head-only mode) the last block is
    not run at all."""
    member.train()
    if not config.train_last_block:
        member.last_block.eval()
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout: same masks after a resume
    order = torch.randperm(len(data), generator=gen).numpy()
    drop = torch.rand(len(data), generator=gen) < config.ref_dropout  # [N]
    total, steps = 0.0, 0
    opt.zero_grad(set_to_none=True)
    for k, start in enumerate(range(0, len(order), config.micro_batch)):
        idx = order[start:start + config.micro_batch]
        th = data.thermo(idx)
        th = ThermoInputs(hull_pa=th.hull_pa, corr_pa=th.corr_pa, has_ref=th.has_ref & ~drop[idx])
        y = data.y[idx].to(config.device)
        if cached is not None:
            i = torch.as_tensor(idx)
            zs = torch.where(th.has_ref, cached.zs[i], torch.zeros_like(cached.zs[i]))
            out = member.outputs(cached.x[i].to(config.device), zs.to(config.device),
                                 cached.e_pa[i].to(config.device), th.has_ref.to(config.device))
        else:
            b = backbone.collate([data.feats[i] for i in idx], config.device)
            out = member(b, th.to(config.device))
        loss = member_loss(out, member.normalizer.encode(y), y, config.bce_weight)
        (loss / config.grad_accum).backward()
        total += float(loss.detach())
        steps += 1
        if (k + 1) % config.grad_accum == 0 or start + config.micro_batch >= len(order):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return total / max(steps, 1)


def fit_member(
    backbone: Backbone,
    train: MemberData,
    val: MemberData,
    config: TrainConfig,
    *,
    normalizer: Normalizer,
    resume: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> FitResult:
    """Train one member with early stopping on validation MAE; returns the best state.

    ``on_epoch`` receives an :class:`EpochReport` whose ``state`` can be passed back as
    ``resume`` to continue after a crash with the same data order and optimiser state.
    """
    seed_everything(config.seed)
    member = Member.create(backbone, config.head, normalizer).to(config.device)
    train_inputs = head_inputs(member, backbone, train, batch=config.eval_batch, device=config.device)
    member.head.fit_input_scaling(train_inputs.x.to(config.device))
    cached = val_cached = None
    if not config.train_last_block:
        _freeze_pretrained_block(member)
        cached = train_inputs
        val_cached = head_inputs(member, backbone, val, batch=config.eval_batch, device=config.device)
    opt = _optimizer(member, config)
    start_epoch, best_mae, best_epoch, bad, history = 0, math.inf, -1, 0, []
    best_state = member.trainable_state()
    best_rho = float("nan")
    if resume is not None:
        member.load_state_dict(resume["member"])
        opt.load_state_dict(resume["optimizer"])
        start_epoch, best_mae, best_epoch = resume["epoch"] + 1, resume["best_mae"], resume["best_epoch"]
        bad, history, best_state = resume["bad_epochs"], list(resume["history"]), resume["best_state"]
        best_rho = resume.get("best_rho", float("nan"))
    y_val = val.y.numpy()
    for epoch in range(start_epoch, config.max_epochs):
        if bad >= config.patience:
            break
        t0 = time.perf_counter()
        loss = _train_epoch(member, backbone, train, opt, config, epoch, cached)
        if val_cached is not None:
            member.eval()
            with torch.no_grad():
                dev = config.device  # head_inputs() keeps the cached inputs on the CPU
                pv = {"q50": member.outputs(val_cached.x.to(dev), val_cached.zs.to(dev),
                                            val_cached.e_pa.to(dev),
                                            val.has_ref.to(dev))["q50"].cpu().numpy()}
        else:
            pv = predict_member(member, backbone, val, batch=config.eval_batch, device=config.device)
        mae = float(np.mean(np.abs(pv["q50"] - y_val)))
        rho = spearman(pv["q50"], y_val)
        if mae < best_mae - 1e-7:
            best_mae, best_epoch, bad, best_rho = mae, epoch, 0, rho
            best_state = member.trainable_state()
        else:
            bad += 1
        history.append({"epoch": epoch, "train_loss": loss, "val_mae": mae, "val_spearman": rho,
                        "seconds": time.perf_counter() - t0})
        if on_epoch is not None:
            state = {"member": member.trainable_state(), "optimizer": copy.deepcopy(opt.state_dict()),
                     "epoch": epoch, "best_mae": best_mae, "best_epoch": best_epoch, "best_rho": best_rho,
                     "bad_epochs": bad, "history": [dict(h) for h in history], "best_state": best_state}
            on_epoch(EpochReport(epoch=epoch, train_loss=loss, val_mae=mae, val_spearman=rho,
                                 seconds=history[-1]["seconds"], state=state))
    return FitResult(member_state=best_state, best_epoch=best_epoch, epochs_run=len(history),
                     val_mae=best_mae, val_spearman=best_rho, history=history)
