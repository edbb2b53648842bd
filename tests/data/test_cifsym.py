"""Choosing the setting of a CIF without symmetry operations (cathode_ray/data/cifsym.py)."""

from __future__ import annotations

import pytest
from pymatgen.core.operations import SymmOp

from cathode_ray.data.cifsym import candidate_settings, symop_loop

HEXAGONAL = {"_cell_length_a": "2.816", "_cell_length_b": "2.816", "_cell_length_c": "14.05",
             "_cell_angle_alpha": "90", "_cell_angle_beta": "90", "_cell_angle_gamma": "120"}
RHOMBOHEDRAL = {"_cell_length_a": "4.957(2)", "_cell_length_b": "4.957(2)", "_cell_length_c": "4.957(2)",
                "_cell_angle_alpha": "33.0", "_cell_angle_beta": "33.0", "_cell_angle_gamma": "33.0"}


def _symbols(block: dict[str, object]) -> list[str]:
    return [s.symbol for s in candidate_settings(block)]


@pytest.mark.parametrize("block, symbols", [
    ({"_symmetry_space_group_name_H-M": "F d -3 m"}, ["F d -3 m :1", "F d -3 m :2"]),  # caller decides
    ({"_symmetry_space_group_name_H-M": "Fd-3m"}, ["F d -3 m :1", "F d -3 m :2"]),
    ({"_space_group_name_H-M_alt": "F d -3 m :2"}, ["F d -3 m :2"]),
    ({"_space_group_name_H-M_alt": "F d -3 m S"}, []),  # unknown spelling: pymatgen's own reading
    ({"_space_group_IT_number": "227"}, ["F d -3 m :1", "F d -3 m :2"]),
    ({"_symmetry_space_group_name_H-M": "R -3 m", **HEXAGONAL}, ["R -3 m :H"]),
    ({"_symmetry_space_group_name_H-M": "R -3 m", **RHOMBOHEDRAL}, ["R -3 m :R"]),
    ({"_symmetry_space_group_name_H-M": "R -3 m"}, ["R -3 m :H", "R -3 m :R"]),  # no cell to tell
    ({"_space_group_name_Hall": "-R 3 2\""}, ["R -3 m :H"]),
    ({"_space_group_name_Hall": "-P 2ac 2n"}, ["P n m a"]),  # Hall symbols of one-setting groups too
    ({"_symmetry_space_group_name_H-M": "P n m a"}, []),  # one setting: pymatgen is right
    ({"_symmetry_space_group_name_H-M": "F d -3 m", "_symmetry_equiv_pos_as_xyz": ["x,y,z"]}, []),
    ({"_symmetry_space_group_name_H-M": "?"}, []),
])
def test_candidate_settings(block: dict[str, object], symbols: list[str]) -> None:
    assert _symbols(block) == symbols


def test_symop_loop_lists_the_settings_operations() -> None:
    (setting,) = candidate_settings({"_space_group_name_H-M_alt": "F d -3 m :2"})
    loop = symop_loop(setting).strip().splitlines()
    assert loop[:2] == ["loop_", "_space_group_symop_operation_xyz"] and len(loop) == 2 + 192
    ops = [SymmOp.from_xyz_str(line.strip("'")) for line in loop[2:]]
    assert any(op.rotation_matrix.trace() == -3 and not op.translation_vector.any() for op in ops)  # -1 at 0
