"""Conformalized quantile regression (CQR) with a Mondrian (per-SOAP-cluster) variant.

Given raw ensemble bounds ``lo``/``hi`` [N] (eV/atom) and labels ``y`` [N] on a calibration set,
find widening offsets ``d`` (eV/atom) such that ``[lo - d_lo, hi + d_hi]`` covers a fresh point
with probability >= 1 - alpha (marginally, under exchangeability).

* symmetric: score ``s = max(lo - y, y - hi)``; one offset ``d`` at the finite-sample level
  ``ceil((n + 1)(1 - alpha)) / n``.
* asymmetric: lower score ``lo - y`` and upper score ``y - hi`` calibrated separately at
  ``alpha / 2`` each (levels ``ceil((n + 1)(1 - alpha / 2)) / n``).

If the finite-sample level exceeds 1 (too few calibration points for the requested coverage),
the offset is ``+inf``: the interval becomes unbounded, which is the only honest answer.
Offsets may be negative (the raw interval was too wide); an interval whose calibrated bounds
cross is collapsed to its midpoint.

Mondrian: clusters with >= ``min_points`` calibration points get their own offsets; smaller
clusters, rows without a cluster (label < 0) and clusters never seen in calibration use the
global offsets. Persisted as strict JSON (non-finite floats as the strings "inf"/"-inf"/"nan").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cathode_ray import seedcard

METHODS: tuple[str, ...] = ("symmetric", "asymmetric")


def float_to_json(value: float) -> float | str:
    """A float as a strict-JSON value (non-finite -> "inf" / "-inf" / "nan")."""
    value = float(value)
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def float_from_json(value: float | int | str) -> float:
    """Inverse of :func:`float_to_json`."""
    return float(value)


_RANK_EPS = 1e-9


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """Finite-sample conformal quantile of ``scores`` [n] at miscoverage ``alpha``.

    Level ``ceil((n + 1)(1 - alpha)) / n`` with ``np.quantile(method="higher")``: one rank above
    the textbook k-th order statistic (k = ceil((n + 1)(1 - alpha))) unless k = n, a deliberate
    margin for calibration and screened sets that are not exactly exchangeable; ``+inf`` when the
    level exceeds 1 or there are no scores. Units follow ``scores`` (eV/atom).
    """
    n = int(scores.shape[0])
    if n == 0:
        return math.inf
    # the rank k in exact arithmetic: (n + 1)(1 - alpha) can land just above an integer in
    # floating point (n = 99, alpha = 0.45 gives 55.00000000000001, k = 56 instead of 55)
    level = math.ceil((n + 1) * (1.0 - alpha) - _RANK_EPS) / n
    if level > 1.0:
        return math.inf
    return float(np.quantile(scores, level, method="higher"))


def _offsets(lo: np.ndarray, hi: np.ndarray, y: np.ndarray, method: str, alpha: float
             ) -> tuple[float, float]:
    """(d_lo, d_hi) in eV/atom for one group of calibration rows [n]."""
    if method == "symmetric":
        d = conformal_quantile(np.maximum(lo - y, y - hi), alpha)
        return d, d
    return conformal_quantile(lo - y, alpha / 2.0), conformal_quantile(y - hi, alpha / 2.0)


@dataclass(frozen=True, kw_only=True)
class ConformalParams:
    """Fitted CQR offsets (eV/atom), global and per cluster.

    Attributes:
        method: "symmetric" (d_lo == d_hi) or "asymmetric".
        alpha: target miscoverage (1 - coverage).
        d_lo, d_hi: global offsets; calibrated interval is [lo - d_lo, hi + d_hi].
        n_calib: calibration points behind the global offsets.
        min_points: Mondrian minimum calibration points for a cluster to get its own offsets.
        cluster_d_lo, cluster_d_hi: per-cluster offsets (only clusters with >= min_points).
        cluster_counts: calibration points per cluster seen in calibration (all clusters).
    """

    method: str
    alpha: float
    d_lo: float
    d_hi: float
    n_calib: int
    min_points: int = seedcard.MONDRIAN_MIN_POINTS
    cluster_d_lo: dict[int, float] = field(default_factory=dict)
    cluster_d_hi: dict[int, float] = field(default_factory=dict)
    cluster_counts: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if set(self.cluster_d_lo) != set(self.cluster_d_hi):
            raise ValueError("cluster_d_lo and cluster_d_hi must have the same clusters")
        if self.min_points < 1:
            raise ValueError(f"min_points must be >= 1, got {self.min_points}")

    @property
    def coverage(self) -> float:
        """Nominal coverage 1 - alpha."""
        return 1.0 - self.alpha

    def offsets_for(self, clusters: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-row offsets (d_lo [n], d_hi [n]) in eV/atom; global where no cluster offsets."""
        d_lo = np.full(n, self.d_lo, dtype=np.float64)
        d_hi = np.full(n, self.d_hi, dtype=np.float64)
        if clusters is None or not self.cluster_d_lo:
            return d_lo, d_hi
        clusters = np.asarray(clusters)
        for c, c_lo in self.cluster_d_lo.items():
            mask = clusters == c  # [n]
            d_lo[mask] = c_lo
            d_hi[mask] = self.cluster_d_hi[c]
        return d_lo, d_hi

    def apply(self, lo: np.ndarray, hi: np.ndarray, clusters: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated bounds (lo_cal [N], hi_cal [N]) in eV/atom from raw bounds [N]."""
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        d_lo, d_hi = self.offsets_for(clusters, lo.shape[0])
        lo_cal, hi_cal = lo - d_lo, hi + d_hi
        crossed = lo_cal > hi_cal  # [N]; only possible with negative offsets
        if crossed.any():
            mid = 0.5 * (lo_cal + hi_cal)
            lo_cal = np.where(crossed, mid, lo_cal)
            hi_cal = np.where(crossed, mid, hi_cal)
        return lo_cal, hi_cal

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON dict (cluster keys as strings, non-finite floats as strings)."""
        return {
            "method": self.method,
            "alpha": self.alpha,
            "d_lo": float_to_json(self.d_lo),
            "d_hi": float_to_json(self.d_hi),
            "n_calib": self.n_calib,
            "min_points": self.min_points,
            "cluster_d_lo": {str(c): float_to_json(v) for c, v in self.cluster_d_lo.items()},
            "cluster_d_hi": {str(c): float_to_json(v) for c, v in self.cluster_d_hi.items()},
            "cluster_counts": {str(c): int(v) for c, v in self.cluster_counts.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConformalParams:
        """Inverse of :meth:`to_dict`."""
        return cls(
            method=str(data["method"]),
            alpha=float(data["alpha"]),
            d_lo=float_from_json(data["d_lo"]),
            d_hi=float_from_json(data["d_hi"]),
            n_calib=int(data["n_calib"]),
            min_points=int(data["min_points"]),
            cluster_d_lo={int(c): float_from_json(v) for c, v in data["cluster_d_lo"].items()},
            cluster_d_hi={int(c): float_from_json(v) for c, v in data["cluster_d_hi"].items()},
            cluster_counts={int(c): int(v) for c, v in data["cluster_counts"].items()},
        )


def fit_conformal(
    lo: np.ndarray,
    hi: np.ndarray,
    y: np.ndarray,
    clusters: np.ndarray | None = None,
    *,
    method: str = "asymmetric",
    coverage: float = seedcard.TARGET_COVERAGE,
    min_points: int = seedcard.MONDRIAN_MIN_POINTS,
) -> ConformalParams:
    """Fit CQR offsets on calibration rows: raw bounds lo, hi [N], labels y [N] (eV/atom).

    ``clusters`` [N] are integer SOAP cluster labels (negative = unassigned) or None (global
    only). Rows with non-finite y are ignored.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    lo, hi, y = (np.asarray(a, dtype=np.float64) for a in (lo, hi, y))
    keep = np.isfinite(y) & np.isfinite(lo) & np.isfinite(hi)  # [N]
    lo, hi, y = lo[keep], hi[keep], y[keep]
    alpha = 1.0 - coverage
    d_lo, d_hi = _offsets(lo, hi, y, method, alpha)
    counts: dict[int, int] = {}
    c_lo: dict[int, float] = {}
    c_hi: dict[int, float] = {}
    if clusters is not None:
        clusters = np.asarray(clusters)[keep].astype(np.int64)
        labels, n_per = np.unique(clusters[clusters >= 0], return_counts=True)
        for c, n_c in zip(labels.tolist(), n_per.tolist(), strict=True):
            counts[c] = n_c
            if n_c >= min_points:
                m = clusters == c
                c_lo[c], c_hi[c] = _offsets(lo[m], hi[m], y[m], method, alpha)
    return ConformalParams(
        method=method, alpha=alpha, d_lo=d_lo, d_hi=d_hi, n_calib=int(y.shape[0]),
        min_points=min_points, cluster_d_lo=c_lo, cluster_d_hi=c_hi, cluster_counts=counts,
    )
