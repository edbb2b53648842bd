"""A small random-weight MACE ``.model`` file, built with ``mace.modules``, for offline tests.

MACE ships a trained model as the whole pickled ``torch.nn.Module`` (``torch.save(model)``);
:func:`build_tiny_mace` writes a file of exactly that kind, so tests can exercise the
``mace:PATH`` backbone path without downloading MACE-MP-0. The weights are random: energies
are plausible in size (a few eV/atom from the atomic reference energies E0) but meaningless.

:func:`build_medium_shape_mace` gives it the shape of MACE-MP-0 "medium" (used for timings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: Default element coverage: H .. Ac (Z = 1..89), like MACE-MP-0.
DEFAULT_ATOMIC_NUMBERS: tuple[int, ...] = tuple(range(1, 90))

#: Rough per-element reference energies E0 (eV/atom) for the cathode elements; others get
#: :data:`_DEFAULT_E0`. Only the order of magnitude matters (random-weight model).
_E0_EV: dict[int, float] = {
    3: -1.9,  # Li
    8: -4.9,  # O
    9: -1.9,  # F
    15: -5.4,  # P
    16: -4.1,  # S
    25: -9.0,  # Mn
    26: -8.3,  # Fe
    27: -7.1,  # Co
    28: -5.8,  # Ni
}
_DEFAULT_E0 = -3.0


def tiny_atomic_energies(atomic_numbers: tuple[int, ...]) -> np.ndarray:
    """Plausible E0 per element (eV), shape [n_elements], in ``atomic_numbers`` order."""
    return np.array([_E0_EV.get(z, _DEFAULT_E0) for z in atomic_numbers], dtype=np.float64)


def _model_kwargs(
    *,
    r_max: float,
    hidden_irreps: str,
    max_ell: int,
    correlation: int,
    num_interactions: int,
    atomic_numbers: tuple[int, ...],
    radial_mlp: tuple[int, ...],
) -> dict[str, object]:
    """Constructor arguments of :class:`mace.modules.ScaleShiftMACE` (MACE-MP-0 conventions)."""
    from e3nn import o3
    from mace import modules

    return {
        "r_max": r_max,  # Angstrom
        "num_bessel": 8,
        "num_polynomial_cutoff": 5,
        "max_ell": max_ell,
        "interaction_cls": modules.RealAgnosticResidualInteractionBlock,
        "interaction_cls_first": modules.RealAgnosticResidualInteractionBlock,
        "num_interactions": num_interactions,
        "num_elements": len(atomic_numbers),
        "hidden_irreps": o3.Irreps(hidden_irreps),
        "MLP_irreps": o3.Irreps("16x0e"),
        "atomic_energies": tiny_atomic_energies(atomic_numbers),  # eV
        "avg_num_neighbors": 30.0,
        "atomic_numbers": list(atomic_numbers),
        "correlation": correlation,
        "gate": torch.nn.functional.silu,
        "radial_MLP": list(radial_mlp),
        "atomic_inter_scale": 0.5,  # eV
        "atomic_inter_shift": -0.1,  # eV
    }


def build_tiny_mace(
    path: str | Path,
    *,
    r_max: float = 4.0,
    seed: int = 0,
    hidden_irreps: str = "16x0e+16x1o",
    max_ell: int = 2,
    correlation: int = 2,
    num_interactions: int = 2,
    atomic_numbers: tuple[int, ...] = DEFAULT_ATOMIC_NUMBERS,
    scale_shift: bool = True,
    radial_mlp: tuple[int, ...] = (32, 32, 32),
) -> Path:
    """Build a random-weight ScaleShiftMACE (or MACE) and ``torch.save`` it (whole module) to ``path``.

    Args:
        path: output ``.model`` file (parent directories are created).
        r_max: cutoff radius in Angstrom.
        seed: torch RNG seed for the random weights (same seed -> same file contents).
        hidden_irreps: node feature irreps, e.g. ``"16x0e+16x1o"``.
        max_ell: highest spherical-harmonic degree of the edge attributes.
        correlation: body order of the product basis.
        num_interactions: message-passing layers (>= 2 so the trunk is not empty).
        atomic_numbers: elements the model covers (one-hot order).
        radial_mlp: hidden widths of the radial MLP (MACE-MP-0: ``(64, 64, 64)``).
        scale_shift: build a ``ScaleShiftMACE`` (like MACE-MP-0) or a plain ``MACE``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. The model is float64, like MACE training output.
    """
    from mace import modules
    from mace.tools import torch_tools

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = _model_kwargs(
        r_max=r_max, hidden_irreps=hidden_irreps, max_ell=max_ell, correlation=correlation,
        num_interactions=num_interactions, atomic_numbers=tuple(atomic_numbers),
        radial_mlp=tuple(radial_mlp),
    )
    with torch_tools.default_dtype(torch.float64):
        torch.manual_seed(seed)
        if scale_shift:
            model = modules.ScaleShiftMACE(**kwargs)
        else:
            del kwargs["atomic_inter_scale"], kwargs["atomic_inter_shift"]
            model = modules.MACE(**kwargs)
    model.eval()
    torch.save(model, out)
    return out


def build_medium_shape_mace(path: str | Path, *, seed: int = 0) -> Path:
    """A random-weight model with the shape of MACE-MP-0 "medium" (4.69M parameters: 128x0e+128x1o,
    r_max 6 A, l_max 3, correlation 3, 2 interactions, radial MLP 64x64x64): random weights cost
    the same as trained ones, so it stands in for the real model in benchmarks."""
    return build_tiny_mace(path, r_max=6.0, seed=seed, hidden_irreps="128x0e + 128x1o", max_ell=3,
                           correlation=3, num_interactions=2, radial_mlp=(64, 64, 64))
