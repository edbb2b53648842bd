import numpy as np
from matplotlib.image import imread

from cathode_ray.report import plots


def _is_png(path) -> bool:
    img = imread(path)
    return img.ndim == 3 and img.shape[2] in (3, 4) and img.std() > 0


def test_plots_write_readable_pngs(tmp_path) -> None:
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 0.3, 3000)
    q50 = y + 0.02 * rng.standard_normal(3000)
    paths = [
        plots.parity_plot(y, q50, q50 - 0.03, q50 + 0.03, tmp_path / "p.png", title="t"),
        plots.coverage_curve_plot([0.5, 0.7, 0.9], {"test": [0.52, 0.69, None]},
                                  tmp_path / "c.png"),
        plots.cluster_coverage_plot({"test": {"0": {"coverage": 0.9}, "1": {"coverage": 0.8}}},
                                    0.9, tmp_path / "k.png"),
        plots.decision_counts_plot({"val": {"KEEP": 3, "KILL": 5}, "test": {"MAYBE": 2}},
                                   tmp_path / "sub" / "d.png"),
    ]
    assert all(p.exists() and _is_png(p) for p in paths)


def test_parity_plot_draws_bounds_beyond_q50(tmp_path) -> None:
    # calibrated bounds may lie on the far side of q50 (negative offsets, collapsed crossings)
    y = np.array([0.01, 0.10, 0.20])
    q50 = np.array([0.02, 0.12, 0.18])
    lo = np.array([0.03, 0.05, 0.15])  # lo > q50 in the first row
    hi = np.array([0.06, 0.11, 0.25])  # hi < q50 in the second row
    path = plots.parity_plot(y, q50, lo, hi, tmp_path / "p.png")
    assert _is_png(path)
