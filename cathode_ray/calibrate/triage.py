"""KEEP / MAYBE / KILL triage from calibrated E_hull intervals (eV/atom) and OOD flags.

Rules, in order, per structure:

1. KEEP when the calibrated upper bound ``hi_cal < keep_hi`` or
   (``q50 < keep_q50`` and ``p_stable >= p_keep``). KEEP wins over KILL (never kill a keeper).
2. KILL only when the calibrated lower bound ``lo_cal > kill_lo`` (``kill_lo >= stable_ehull``).
3. MAYBE otherwise.
4. OOD rows (``is_ood`` or ``ood_score >= ood_threshold``) are NEVER killed: a would-be KILL
   becomes MAYBE with reason "OOD (gates: ...): would be KILL"; with ``ood_blocks_keep`` a
   would-be KEEP becomes MAYBE as well.

Every decision carries a short human-readable reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from cathode_ray import seedcard
from cathode_ray.calibrate.aggregate import Aggregated
from cathode_ray.calibrate.conformal import float_from_json, float_to_json
from cathode_ray.calibrate.ood import OODResult

KEEP, MAYBE, KILL = "KEEP", "MAYBE", "KILL"
DECISIONS: tuple[str, ...] = (KEEP, MAYBE, KILL)
_P_KEEP_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True, kw_only=True)
class TriageConfig:
    """Triage thresholds. Energies in eV/atom; ``-inf`` disables a KEEP rule.

    Attributes:
        stable_ehull: "stable" means true E_hull below this.
        kill_lo: KILL when the calibrated lower bound is above this (>= stable_ehull).
        keep_hi: KEEP when the calibrated upper bound is below this.
        keep_q50: KEEP when q50 is below this and p_stable >= p_keep.
        p_keep: probability threshold for the q50 KEEP rule.
        ood_threshold: rows with ood_score >= this count as OOD (as do rows with is_ood).
        ood_blocks_keep: OOD rows cannot be KEEP either (they go to MAYBE).
    """

    stable_ehull: float = seedcard.STABLE_EHULL
    kill_lo: float = seedcard.METASTABLE_EHULL
    keep_hi: float = seedcard.STABLE_EHULL
    keep_q50: float = seedcard.STABLE_EHULL / 2.0
    p_keep: float = 0.8
    ood_threshold: float = 0.5
    ood_blocks_keep: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.stable_ehull) or not math.isfinite(self.kill_lo):
            raise ValueError("stable_ehull and kill_lo must be finite")
        if self.kill_lo < self.stable_ehull:
            raise ValueError(f"kill_lo {self.kill_lo} must be >= stable_ehull {self.stable_ehull}")
        for name in ("keep_hi", "keep_q50"):
            if getattr(self, name) > self.stable_ehull:
                raise ValueError(f"{name} must be <= stable_ehull (may be -inf to disable)")
        if not 0.0 <= self.p_keep <= 1.0 or not 0.0 <= self.ood_threshold <= 1.0:
            raise ValueError("p_keep and ood_threshold must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON dict (non-finite floats as strings)."""
        return {k: v if isinstance(v, bool) else float_to_json(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TriageConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: v if isinstance(v, bool) else float_from_json(v) for k, v in data.items()})


def _keep_mask(agg: Aggregated, hi_cal: np.ndarray, cfg: TriageConfig
               ) -> tuple[np.ndarray, np.ndarray]:
    """(keep by upper bound [N], keep by q50 + p_stable [N])."""
    by_hi = hi_cal < cfg.keep_hi
    by_q50 = (agg.q50 < cfg.keep_q50) & (agg.p_stable >= cfg.p_keep)
    return by_hi, by_q50


def _ood_mask(ood: OODResult, cfg: TriageConfig) -> np.ndarray:
    return ood.is_ood | (ood.ood_score >= cfg.ood_threshold)


def _reason(decision: str, by_hi: bool, q50: float, lo: float, hi: float, p: float,
            cfg: TriageConfig) -> str:
    if decision == KEEP and by_hi:
        return f"hi {hi:.3f} < {cfg.keep_hi:.3f}: likely stable"
    if decision == KEEP:
        return f"q50 {q50:.3f} < {cfg.keep_q50:.3f} and p_stable {p:.2f} >= {cfg.p_keep:.2f}: likely stable"
    if decision == KILL:
        return f"lo {lo:.3f} > {cfg.kill_lo:.3f}: likely unstable"
    return f"interval [{lo:.3f}, {hi:.3f}]: not confidently stable, lo <= {cfg.kill_lo:.3f}"


def triage(agg: Aggregated, lo_cal: np.ndarray, hi_cal: np.ndarray, ood: OODResult,
           config: TriageConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decisions [N] (object str in KEEP/MAYBE/KILL) and reasons [N] (object str).

    ``lo_cal``/``hi_cal`` [N] are calibrated bounds in eV/atom.
    """
    cfg = config or TriageConfig()
    by_hi, by_q50 = _keep_mask(agg, hi_cal, cfg)
    keep = by_hi | by_q50
    kill = (lo_cal > cfg.kill_lo) & ~keep
    raw = np.where(keep, KEEP, np.where(kill, KILL, MAYBE)).astype(object)  # [N]
    is_ood = _ood_mask(ood, cfg)
    blocked = is_ood & ((raw == KILL) | ((raw == KEEP) & cfg.ood_blocks_keep))
    decision = np.where(blocked, MAYBE, raw).astype(object)
    reasons = np.empty(len(raw), dtype=object)
    for i in range(len(raw)):
        if blocked[i]:
            why = ood.ood_gates[i] or f"score {ood.ood_score[i]:.2f}"
            reasons[i] = f"OOD (gates: {why}): would be {raw[i]}"
        else:
            reasons[i] = _reason(raw[i], bool(by_hi[i]), agg.q50[i], lo_cal[i], hi_cal[i],
                                 agg.p_stable[i], cfg)
            if is_ood[i]:
                reasons[i] += f" [OOD: {ood.ood_gates[i] or 'score'}]"
    return decision, reasons


def _choose_kill(lo_cal: np.ndarray, stable: np.ndarray, cfg: TriageConfig) -> tuple[float, str]:
    """Smallest kill_lo (>= stable_ehull, 3-decimal grid) killing none of ``stable`` [N]
    (truly stable, in-domain validation rows: OOD rows are never killed anyway)."""
    worst = float(lo_cal[stable].max()) if stable.any() else -math.inf
    kill_lo = max(cfg.stable_ehull, math.ceil(max(worst, cfg.stable_ehull) * 1000.0) / 1000.0)
    if kill_lo <= worst:
        kill_lo += 0.001
    text = (f"kill_lo = {kill_lo:.3f} eV/atom: the smallest threshold >= {cfg.stable_ehull:.3f} "
            f"that kills no truly stable validation structure (highest calibrated lower bound "
            f"of a stable structure: {worst:.3f}).")
    return kill_lo, text


def _threshold_grid(stable_ehull: float) -> np.ndarray:
    """Candidate KEEP thresholds (eV/atom): -inf (rule off) and a 0.0025 grid up to stable."""
    steps = np.round(np.arange(-0.05, stable_ehull + 1e-9, 0.0025), 4)
    return np.r_[-np.inf, steps]


def _keep_text(cfg: TriageConfig) -> str:
    rules = []
    if math.isfinite(cfg.keep_hi):
        rules.append(f"hi_cal < {cfg.keep_hi:.4f}")
    if math.isfinite(cfg.keep_q50):
        rules.append(f"(q50 < {cfg.keep_q50:.4f} and p_stable >= {cfg.p_keep:.2f})")
    return "KEEP if " + " or ".join(rules) if rules else "KEEP disabled"


def wilson_lower(successes: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    """One-sided Wilson score lower bound of a binomial proportion (z = 0: the plain ratio)."""
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    p = np.asarray(successes, dtype=np.float64) / n
    if z == 0:
        return p
    centre = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - margin) / (1 + z * z / n)


def _choose_keep(agg: Aggregated, hi_cal: np.ndarray, stable: np.ndarray, allowed: np.ndarray,
                 cfg: TriageConfig, min_precision: float, z: float = 0.0) -> tuple[TriageConfig, str]:
    """Grid search (keep_hi, keep_q50, p_keep) for max KEEP recall at precision >= min.

    With ``z`` > 0 the precision's one-sided Wilson lower bound (z = 1.2816: 90 % confidence)
    must reach ``min_precision``, so a rule is not chosen on the luck of a small validation set.
    """
    grid = _threshold_grid(cfg.stable_ehull)  # [G]
    n_stable = max(int(stable.sum()), 1)
    best: tuple[float, float, float, float, float] | None = None  # recall, prec, hi, q50, p
    by_hi = (hi_cal[None, :] < grid[:, None]) & allowed  # [G, N]
    for q in grid:
        for p in _P_KEEP_GRID:
            keep = by_hi | ((agg.q50 < q) & (agg.p_stable >= p) & allowed)  # [G, N]
            n_keep = keep.sum(axis=1)  # [G]
            tp = (keep & stable).sum(axis=1)  # [G]
            prec = tp / np.maximum(n_keep, 1)
            recall = tp / n_stable
            ok = (wilson_lower(tp, n_keep, z) >= min_precision) & (n_keep > 0)
            if ok.any():
                j = int(np.argmax(np.where(ok, recall, -1.0)))
                cand = (float(recall[j]), float(prec[j]), float(grid[j]), float(q), p)
                if best is None or cand[:2] > best[:2]:
                    best = cand
    if best is None:
        new = replace(cfg, keep_hi=-math.inf, keep_q50=-math.inf)
        return new, (f"No KEEP rule reaches precision >= {min_precision:.2f} on validation; "
                     "KEEP disabled (everything not killed is MAYBE).")
    recall, prec, keep_hi, keep_q50, p_keep = best
    new = replace(cfg, keep_hi=keep_hi, keep_q50=keep_q50, p_keep=p_keep)
    bound = (f" with its {z:.2f}-sigma Wilson lower bound" if z > 0 else "")
    return new, (f"{_keep_text(new)}: validation KEEP precision {prec:.3f}{bound} >= "
                 f"{min_precision:.2f} at the highest recall found, {recall:.3f}.")


def choose_thresholds(agg: Aggregated, lo_cal: np.ndarray, hi_cal: np.ndarray, y: np.ndarray,
                      *, ood: OODResult | None = None, base: TriageConfig | None = None,
                      min_keep_precision: float = 0.93,
                      precision_z: float = 1.2816) -> tuple[TriageConfig, str]:
    """Pick kill/keep thresholds on validation rows [N] (labels y, eV/atom).

    KILL: zero false kills on validation (the hard limit elsewhere is < 2%). KEEP: maximum
    recall subject to precision >= ``min_keep_precision`` at 90 % confidence (one-sided Wilson
    bound with ``precision_z``; 0 = the plain validation precision). OOD rows are excluded from KEEP
    when ``base.ood_blocks_keep`` (as triage would). Returns the config and the reasoning text.
    """
    cfg = base or TriageConfig()
    y = np.asarray(y, dtype=np.float64)
    stable = y < cfg.stable_ehull  # [N]
    ood = ood or OODResult.in_domain(len(y))
    is_ood = _ood_mask(ood, cfg)
    allowed = ~(is_ood & cfg.ood_blocks_keep)
    lo_cal = np.asarray(lo_cal, dtype=np.float64)
    # a non-finite lower bound is never killed (NaN > kill_lo is False), so it cannot set kill_lo
    kill_lo, kill_text = _choose_kill(lo_cal, stable & ~is_ood & np.isfinite(lo_cal), cfg)
    cfg, keep_text = _choose_keep(agg, np.asarray(hi_cal), stable, allowed, cfg,
                                  min_keep_precision, precision_z)
    cfg = replace(cfg, kill_lo=kill_lo)
    decision, _ = triage(agg, lo_cal, hi_cal, ood, cfg)
    n_stable = max(int(stable.sum()), 1)
    fk = int(((decision == KILL) & stable).sum())
    summary = (f"On {len(y)} validation structures ({int(stable.sum())} stable, E_hull < "
               f"{cfg.stable_ehull:.3f} eV/atom): {int((decision == KEEP).sum())} KEEP, "
               f"{int((decision == KILL).sum())} KILL, false-kill rate {fk / n_stable:.4f}.")
    return cfg, "\n".join([kill_text, keep_text, summary])
