"""Governance plots (matplotlib Agg via an explicit canvas; no pyplot state). eV/atom axes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cathode_ray import seedcard

_MAX_POINTS = 2000
_DECISION_COLOURS = {"KEEP": "tab:green", "MAYBE": "tab:orange", "KILL": "tab:red"}


def _figure(width: float = 5.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def parity_plot(y: np.ndarray, q50: np.ndarray, lo: np.ndarray, hi: np.ndarray, path: Path,
                *, title: str = "", seed: int = 0) -> Path:
    """Predicted q50 vs true E_hull [N] with calibrated intervals (subsampled to 2000 rows)."""
    n = len(y)
    idx = np.arange(n)
    if n > _MAX_POINTS:
        idx = np.sort(np.random.default_rng(seed).choice(n, _MAX_POINTS, replace=False))
    y, q50, lo, hi = y[idx], q50[idx], lo[idx], hi[idx]
    inside = (lo <= y) & (y <= hi)
    fig = _figure()
    ax = fig.add_subplot()
    for mask, colour, label in ((inside, "tab:blue", "covered"), (~inside, "tab:red", "missed")):
        # the interval as a line from lo to hi: a calibrated bound may lie beyond q50 (negative
        # conformal offsets, crossed intervals collapsed to their midpoint)
        ax.vlines(y[mask], lo[mask], hi[mask], lw=0.5, alpha=0.5, color=colour)
        ax.plot(y[mask], q50[mask], "o", ms=2, alpha=0.5, color=colour, label=label)
    finite = np.concatenate([y, q50])
    finite = finite[np.isfinite(finite)]
    if finite.size:
        edge = [float(finite.min()), float(finite.max())]
        ax.plot(edge, edge, "k--", lw=1)
    ax.axvline(seedcard.STABLE_EHULL, color="grey", lw=0.8, ls=":")
    ax.axhline(seedcard.STABLE_EHULL, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("true E_hull (eV/atom)")
    ax.set_ylabel("predicted E_hull q50 (eV/atom)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def coverage_curve_plot(levels: Sequence[float], measured: Mapping[str, Sequence[float]],
                        path: Path) -> Path:
    """Measured coverage per split vs nominal level (conformal refitted at each level)."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    for name, values in measured.items():
        ax.plot(levels, [np.nan if v is None else v for v in values], "o-", label=name)
    lo_lim = min(levels) - 0.05
    ax.set_xlim(lo_lim, 1.0)
    ax.set_ylim(lo_lim, 1.0)
    ax.set_xlabel("nominal coverage")
    ax.set_ylabel("measured coverage")
    ax.legend(fontsize=8)
    return _save(fig, path)


def cluster_coverage_plot(per_split: Mapping[str, Mapping[str, Mapping[str, float]]],
                          target: float, path: Path) -> Path:
    """Grouped bars: coverage per SOAP cluster for each split ({split: {cluster: {coverage}}})."""
    clusters = sorted({c for per in per_split.values() for c in per}, key=lambda c: int(c))
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    width = 0.8 / max(len(per_split), 1)
    x = np.arange(len(clusters))
    for i, (name, per) in enumerate(per_split.items()):
        vals = [per[c]["coverage"] if c in per else np.nan for c in clusters]
        ax.bar(x + i * width, vals, width=width, label=name)
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:.2f}")
    ax.set_xticks(x + 0.4 - width / 2, clusters)
    ax.set_xlabel("SOAP cluster")
    ax.set_ylabel("coverage")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    return _save(fig, path)


def decision_counts_plot(counts: Mapping[str, Mapping[str, int]], path: Path) -> Path:
    """Stacked bars of KEEP / MAYBE / KILL counts per split."""
    fig = _figure()
    ax = fig.add_subplot()
    names = list(counts)
    bottom = np.zeros(len(names))
    for decision, colour in _DECISION_COLOURS.items():
        vals = np.array([counts[s].get(decision, 0) for s in names], dtype=float)
        ax.bar(names, vals, bottom=bottom, color=colour, label=decision)
        bottom += vals
    ax.set_ylabel("structures")
    ax.legend(fontsize=8)
    return _save(fig, path)
