"""Which setting of its space group a CIF without symmetry operations means.

When a CIF lists no operations, pymatgen's ``CifParser`` builds them from the space-group name, but it
reads the name without its setting. A suffix (``'F d -3 m :2'``, ``'R -3 m :R'``) or a Hall symbol is
not understood. For the 24 groups with two origin choices and the 7 rhombohedral groups, pymatgen
always applies the first setting: origin choice 1, hexagonal axes. Spinel LiMn2O4 (Fd-3m) is usually
written in origin choice 2, and R-3m layered oxides are sometimes given on rhombohedral axes; read in
the wrong setting, such a file becomes another structure, with overlapping atoms or another formula.

:func:`candidate_settings` names the settings a block can mean. It takes the setting the CIF states
(a suffix, a Hall symbol) or the one its cell shows: rhombohedral axes have a = b = c and
alpha = beta = gamma. It gives both origin choices when the name leaves that open, and the caller
keeps the one that gives a consistent structure (:mod:`cathode_ray.data.parse`). The table is
pymatgen's own (``pymatgen/symmetry/symm_ops.json``, from the COD).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: CIF tags that list symmetry operations; a block with any of them needs no setting chosen.
SYMOP_TAGS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz")
_HALL_TAGS = ("_space_group_name_Hall", "_symmetry_space_group_name_Hall")
_HM_TAGS = ("_space_group_name_H-M_alt", "_symmetry_space_group_name_H-M")
_NUMBER_TAGS = ("_space_group_IT_number", "_symmetry_Int_Tables_number")
_NO_VALUE = {"", "?", "."}
_CELL_TOLERANCE = 1e-3  # relative, on lengths (A) and angles (degrees)


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One setting of a space group: its universal Hermann-Mauguin symbol and its operations."""

    symbol: str  # e.g. 'F d -3 m :2'
    symops: tuple[str, ...]  # 'x,y,z' style, on that setting's axes and origin

    @property
    def choice(self) -> str:
        """The setting's code after the colon: '1'/'2' (origin choice), 'H'/'R' (axes), or ''."""
        return self.symbol.rpartition(":")[2].strip() if ":" in self.symbol else ""


def candidate_settings(block: dict[str, Any]) -> tuple[Setting, ...]:
    """The settings a CIF block (``CifParser.as_dict()`` value) can mean, when pymatgen would guess.

    Empty when the block lists its operations, names no group, or names a group with one setting:
    pymatgen's own reading is then right. One setting when the CIF states it or its cell shows it;
    two (origin choices 1 and 2, or H and R for an unusual cell) when the caller must decide.
    """
    if any(_value(block, tag) for tag in SYMOP_TAGS):
        return ()
    by_name, by_hall = _tables()
    for tag in _HALL_TAGS:
        if (hall := by_hall.get(_squash_hall(_value(block, tag)))) is not None:
            return (hall,)
    for tag in _HM_TAGS:
        name, _, code = _squash(_value(block, tag)).partition(":")
        if name in by_name:
            settings = by_name[name]
            if code:
                return tuple(s for s in settings if s.choice.lower() == code.lower())
            return _by_cell(settings, block)
    for tag in _NUMBER_TAGS:
        number = _value(block, tag)
        if number and re.fullmatch(r"\d+", number):
            from pymatgen.symmetry.groups import SpaceGroup

            name = _squash(SpaceGroup.from_int_number(int(number)).symbol)
            return _by_cell(by_name.get(name, ()), block)
    return ()


def symop_loop(setting: Setting) -> str:
    """CIF text of a ``_space_group_symop_operation_xyz`` loop giving ``setting``'s operations."""
    return "\nloop_\n_space_group_symop_operation_xyz\n" + "".join(f"'{op}'\n" for op in setting.symops)


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[dict[str, tuple[Setting, ...]], dict[str, Setting]]:
    """Squashed Hermann-Mauguin name ('Fd-3m') -> its settings, for the groups with more than one;
    squashed Hall symbol -> its setting, for every setting in the table."""
    import pymatgen.symmetry
    from monty.serialization import loadfn

    groups: dict[str, list[Setting]] = {}
    by_hall: dict[str, Setting] = {}
    for entry in loadfn(Path(pymatgen.symmetry.__file__).parent / "symm_ops.json"):
        setting = Setting(symbol=entry["universal_h_m"], symops=tuple(entry["symops"]))
        by_hall.setdefault(_squash_hall(entry["hall"]), setting)
        if ":" in entry["universal_h_m"]:
            groups.setdefault(_squash(entry["hermann_mauguin"]), []).append(setting)
    by_name = {name: tuple(settings) for name, settings in groups.items() if len(settings) > 1}
    by_hall.pop("", None)
    return by_name, by_hall


def _by_cell(settings: tuple[Setting, ...], block: dict[str, Any]) -> tuple[Setting, ...]:
    """Hexagonal or rhombohedral axes chosen from the cell; origin choices left to the caller."""
    if {s.choice for s in settings} != {"H", "R"}:
        return settings
    try:
        a, b, c, alpha, beta, gamma = (float(re.sub(r"\(.*", "", _value(block, f"_cell_{tag}")))
                                       for tag in ("length_a", "length_b", "length_c",
                                                   "angle_alpha", "angle_beta", "angle_gamma"))
    except ValueError:
        return settings
    close = functools.partial(math.isclose, rel_tol=_CELL_TOLERANCE)
    choice = ("H" if close(a, b) and close(gamma, 120.0) and close(alpha, 90.0) and close(beta, 90.0)
              else "R" if close(a, b) and close(b, c) and close(alpha, beta) and close(beta, gamma)
              else None)
    return tuple(s for s in settings if s.choice == choice) if choice else settings


def _value(block: dict[str, Any], tag: str) -> str:
    """The tag's value as text ('' when absent or '?'/'.'); tags compared case-insensitively."""
    wanted = tag.lower().replace("-", "_")
    for key, value in block.items():
        if key.lower().replace("-", "_") == wanted:
            text = (value if isinstance(value, str) else " ".join(map(str, value))).strip()
            return "" if text in _NO_VALUE else text
    return ""


def _squash(text: str) -> str:
    """A Hermann-Mauguin symbol without spaces or underscores, as pymatgen compares them."""
    return re.sub(r"[\s_]", "", text)


def _squash_hall(text: str) -> str:
    """A Hall symbol without spaces, in lower case (its quotes name axes and are kept)."""
    return re.sub(r"\s", "", text).lower()
