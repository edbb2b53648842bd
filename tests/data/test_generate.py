"""Candidate generation (cathode_ray/data/generate.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pymatgen.core import Structure

from cathode_ray.data.generate import (
    CANDIDATE_SCHEMA,
    GenerateConfig,
    id_prefix,
    run,
    structure_fingerprint,
)
from cathode_ray.data.validate import ValidationConfig, validate_structure
from tests.data.badfiles import licoo2, lifepo4, limn2o4

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # ../shared/data of the repo
OP = re.compile(r"^(sub [A-Z][a-z]?->[A-Z][a-z]? \d+/\d+|vac Li \d+/\d+|strain( [abc])? [+-]\d+\.\d%)$")


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny parent library (JSON lines, MP-doc shaped) with one out-of-scope entry."""
    ni = licoo2()
    ni.replace_species({"Co": "Ni"})
    no_tm = licoo2()
    no_tm.replace_species({"Co": "Al"})
    docs = [{"material_id": f"p-{i}", "structure": s.as_dict(), "energy_above_hull": 0.0}
            for i, s in enumerate((licoo2(), limn2o4(), lifepo4(), ni, no_tm))]
    path = tmp_path_factory.mktemp("parents") / "parents.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    return path


def _read(out: Path) -> list[dict]:
    shards = sorted(out.glob("candidates-*.parquet"))
    return [row for shard in shards for row in pq.read_table(shard).to_pylist()]


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must"):
        GenerateConfig(source="x", n=0, out=str(tmp_path))
    with pytest.raises(ValueError, match="strain"):
        GenerateConfig(source="x", n=5, out=str(tmp_path), min_strain=0.05, max_strain=0.01)
    with pytest.raises(TypeError):
        GenerateConfig("x", 5, str(tmp_path))  # type: ignore[misc]  # keyword-only


def test_generate_small(parents: Path, tmp_path: Path) -> None:
    config = GenerateConfig(source=str(parents), n=200, out=str(tmp_path / "a"), seed=7,
                            shard_size=64, workers=1)
    result = run(config)
    assert result.n_candidates == 200 and result.n_parents == 4 and result.n_parent_rejects == 1
    assert result.parent_rejects[0]["reason"] == "out_of_scope"
    assert result.n_draws == 200 + result.n_duplicates
    assert [Path(s).name for s in result.shards] == [f"candidates-0000{i}.parquet" for i in range(4)]
    assert pq.read_schema(result.shards[0]).names == CANDIDATE_SCHEMA.names
    rows = _read(tmp_path / "a")
    assert [len(pq.read_table(s)) for s in result.shards] == [64, 64, 64, 8]
    assert len({r["structure_id"] for r in rows}) == 200
    assert {r["parent_id"] for r in rows} <= {"p-0", "p-1", "p-2", "p-3"}
    assert len({r["parent_id"] for r in rows}) == 4
    structures = [Structure.from_str(r["structure_json"], fmt="json") for r in rows]
    assert len({structure_fingerprint(s) for s in structures}) == 200  # de-duplicated
    config_v = ValidationConfig()
    for row, s in zip(rows, structures, strict=True):
        assert all(OP.match(op) for op in row["transformation"].split("; ")), row["transformation"]
        assert row["formula"] == s.composition.reduced_formula and row["nsites"] == len(s)
        assert row["chemsys"] == s.composition.chemical_system
        assert validate_structure(s, structure_id=row["structure_id"], source="gen",
                                  config=config_v) is None
    ops = " ".join(r["transformation"] for r in rows)
    assert "sub " in ops and "vac Li" in ops and "strain" in ops

    # same seed -> same output; different seed -> different output; "snapshot:PATH" (ingest's
    # spelling) names the same parents
    again = run(GenerateConfig(source=f"snapshot:{parents}", n=200, out=str(tmp_path / "b"),
                               seed=7, shard_size=64, workers=1))
    assert _read(tmp_path / "b") == rows and again.n_draws == result.n_draws
    run(GenerateConfig(source=str(parents), n=200, out=str(tmp_path / "c"), seed=8, workers=1))
    assert [r["structure_json"] for r in _read(tmp_path / "c")] != [r["structure_json"] for r in rows]


def test_dedup_when_draw_space_is_small(parents: Path, tmp_path: Path) -> None:
    """One tiny parent: many draws repeat, the output still holds only distinct structures."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"material_id": "only", "structure": licoo2().as_dict()}))
    result = run(GenerateConfig(source=str(one), n=60, out=str(tmp_path / "o"), workers=1))
    rows = _read(tmp_path / "o")
    assert result.n_duplicates > 0 and len(rows) == 60
    keys = {structure_fingerprint(Structure.from_str(r["structure_json"], fmt="json")) for r in rows}
    assert len(keys) == 60


def test_existing_output_needs_overwrite(parents: Path, tmp_path: Path) -> None:
    config = GenerateConfig(source=str(parents), n=10, out=str(tmp_path / "x"), workers=1)
    run(config)
    with pytest.raises(FileExistsError, match="overwrite"):
        run(config)
    result = run(GenerateConfig(source=str(parents), n=5, out=str(tmp_path / "x"), workers=1,
                                overwrite=True))
    assert len(_read(tmp_path / "x")) == 5 and len(result.shards) == 1


def test_no_usable_parents_raises(tmp_path: Path) -> None:
    bad = licoo2()
    bad.replace_species({"Li": "Na"})
    (tmp_path / "p.json").write_text(json.dumps(bad.as_dict()))
    with pytest.raises(ValueError, match="no usable parent"):
        run(GenerateConfig(source=str(tmp_path / "p.json"), n=5, out=str(tmp_path / "o")))


@pytest.mark.slow
def test_workers_do_not_change_output(parents: Path, tmp_path: Path) -> None:
    common = {"source": str(parents), "n": 300, "seed": 3, "chunk_size": 40}
    run(GenerateConfig(out=str(tmp_path / "w1"), workers=1, **common))
    run(GenerateConfig(out=str(tmp_path / "w2"), workers=2, **common))
    assert _read(tmp_path / "w1") == _read(tmp_path / "w2")


@pytest.mark.slow
def test_generate_from_real_snapshot(tmp_path: Path) -> None:
    path = SHARED / "mp_litmo_summary.jsonl.gz"
    if not path.exists():
        pytest.skip(f"MP snapshot not found at {path} (expected ../shared/data next to the repo)")
    result = run(GenerateConfig(source=str(path), n=300, out=str(tmp_path / "mp"), workers=1))
    assert result.n_parents > 1200 and result.n_candidates == 300
    rows = _read(tmp_path / "mp")
    assert all(re.fullmatch(r"mp-\d+", r["parent_id"]) for r in rows)


def test_shards_are_written_in_read_task_row_groups(parents: Path, tmp_path: Path, monkeypatch) -> None:
    import cathode_ray.data.generate as generate

    monkeypatch.setattr(generate, "LIBRARY_ROW_GROUP_ROWS", 16)
    result = run(GenerateConfig(source=str(parents), n=40, out=str(tmp_path / "a"), seed=7,
                                shard_size=40, workers=1))
    meta = pq.ParquetFile(result.shards[0]).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [16, 16, 8]


def test_ids_differ_across_parents_and_settings_but_repeat_for_the_same_run(tmp_path: Path) -> None:
    """Two libraries generated with the default seed from other parents (or other settings) can
    be screened together: their ids never collide. The same parents, settings and seed give the
    same ids (and candidates) again."""
    def prefix(**kw: object) -> str:
        return id_prefix(GenerateConfig(**{"source": "x", "n": 5, "out": str(tmp_path), **kw}),
                         ["p-1", "p-0"])

    assert re.fullmatch(r"cand-0-[0-9a-f]{8}", prefix())
    assert prefix() == prefix(workers=1, shard_size=7, chunk_size=3, out="elsewhere")
    assert prefix() != prefix(seed=1) and prefix() != prefix(max_strain=0.05)
    assert prefix() != id_prefix(GenerateConfig(source="x", n=5, out=str(tmp_path)), ["p-0"])
    assert prefix() == id_prefix(GenerateConfig(source="x", n=5, out=str(tmp_path)), ["p-0", "p-1"])


def test_fingerprint_follows_the_axes_when_it_orders_them() -> None:
    """Sorting the lengths alone (without the coordinates) called (3, 4, 5) and (4, 3, 5) cells
    with the same fractional coordinates one structure; they are two. A relabelling of the axes
    (coordinates permuted with them) is the same structure and keeps its key."""
    from pymatgen.core import Lattice

    species = ["Li", "Co", "O", "O"]
    frac = np.array([[0.0, 0.0, 0.0], [0.1, 0.3, 0.5], [0.2, 0.7, 0.1], [0.6, 0.15, 0.8]])
    a = Structure(Lattice.from_parameters(3, 4, 5, 80, 90, 90), species, frac)
    b = Structure(Lattice.from_parameters(4, 3, 5, 80, 90, 90), species, frac)
    relabelled = Structure(Lattice.from_parameters(4, 3, 5, 90, 80, 90), species, frac[:, [1, 0, 2]])
    assert np.allclose(relabelled.distance_matrix, a.distance_matrix)  # the same crystal
    assert structure_fingerprint(a) != structure_fingerprint(b)
    assert structure_fingerprint(relabelled) == structure_fingerprint(a)
    # equal lengths: either order of the tied axes gives one key
    c = Structure(Lattice.from_parameters(3, 3, 5, 90, 90, 90), species, frac)
    c_swapped = Structure(Lattice.from_parameters(3, 3, 5, 90, 90, 90), species, frac[:, [1, 0, 2]])
    assert structure_fingerprint(c) == structure_fingerprint(c_swapped)
