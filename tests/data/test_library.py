"""Library listing, readers and parsing (cathode_ray/data/library.py)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pymatgen.core import Structure
from pymatgen.io.vasp import Poscar

from cathode_ray.data import library
from cathode_ray.data.library import (
    filesystem_for,
    iter_library,
    library_format,
    list_library,
    list_library_files,
    make_structure_id,
    read_library_file,
    split_extxyz,
    split_res,
)
from cathode_ray.data.parse import parse_raw
from cathode_ray.data.records import Reject, RejectCode
from tests.data.badfiles import (
    airss_res,
    licoo2,
    lifepo4,
    limn2o4,
    relaxation,
    vasprun_xml,
    write_ase_db,
    write_bad_library,
    write_good_library,
)
from tests.ports import free_port


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    d = tmp_path_factory.mktemp("good")
    return d, write_good_library(d)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, RejectCode]]:
    d = tmp_path_factory.mktemp("bad")
    return d, write_bad_library(d)


def test_list_directory_is_recursive_sorted_and_skips_unsupported(good_dir) -> None:
    d, counts = good_dir
    files = list_library_files(str(d))
    assert files == sorted(files)
    assert sorted(Path(f).relative_to(d).as_posix() for f in files) == sorted(counts)
    assert not any(f.endswith("README.txt") for f in files)


def test_list_glob_and_single_file(good_dir) -> None:
    d, _ = good_dir
    assert [Path(f).name for f in list_library_files(str(d / "*.parquet"))] == [
        "cif_column.parquet", "json_column.parquet"]
    assert list_library_files(str(d / "LiCoO2.cif")) == [str(d / "LiCoO2.cif")]


def test_listing_carries_each_files_size_and_time(good_dir) -> None:
    """Sizes and times come with the listing (a fingerprint of 100,000 S3 objects used to send
    one HEAD request per object)."""
    from datetime import datetime

    d, _ = good_dir
    for spec in (str(d), str(d / "**" / "*.gz"), str(d / "LiCoO2.cif")):
        listed = list_library(spec)
        assert [f.uri for f in listed] == list_library_files(spec)
        for f in listed:
            stat = Path(f.uri).stat()
            assert f.size == stat.st_size, f
            assert datetime.fromisoformat(f.mtime).timestamp() == pytest.approx(stat.st_mtime), f


def test_list_missing_or_empty_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_library_files(str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no structure files"):
        list_library_files(str(tmp_path))


def test_every_good_format_reads_and_parses(good_dir) -> None:
    d, counts = good_dir
    for rel, n in counts.items():
        rows = list(read_library_file(str(d / rel)))
        assert len(rows) == n, rel
        for row in rows:
            assert row["fmt"] in ("cif", "poscar", "extxyz", "res", "pymatgen_json"), row
            assert isinstance(parse_raw(row), Structure), (rel, parse_raw(row))


def test_ids_given_fallback_and_stable(good_dir) -> None:
    d, _ = good_dir
    first = [r["structure_id"] for r in iter_library(str(d))]
    assert first == [r["structure_id"] for r in iter_library(str(d))]
    assert len(set(first)) == len(first)
    assert {"mp-doc-0", "list-a", "cif-a", "frames.extxyz#1", "mp-good/POSCAR#0",
            "json_column.parquet#2"} <= set(first)


def test_fallback_ids_of_same_named_files_in_subfolders_differ(tmp_path: Path) -> None:
    """batchA/structure.cif and batchB/structure.cif hold different structures without ids:
    their fallback ids follow the path below the library root, so neither is a duplicate."""
    from cathode_ray.data.validate import ValidationConfig, validate_rows
    from tests.data.badfiles import limn2o4

    for sub, s in (("batchA", licoo2()), ("batchB", limn2o4())):
        (tmp_path / "lib" / sub).mkdir(parents=True)
        s.to(filename=str(tmp_path / "lib" / sub / "structure.cif"))
    licoo2().to(filename=str(tmp_path / "lib" / "top.cif"))
    rows = list(iter_library(str(tmp_path / "lib")))
    assert [r["structure_id"] for r in rows] == [
        "batchA/structure.cif#0", "batchB/structure.cif#0", "top.cif#0"]
    valid, rejects = validate_rows(rows, ValidationConfig())
    assert len(valid) == 3 and not rejects
    # a glob keeps the path below its fixed folder; one file named alone keeps its name
    assert [r["structure_id"] for r in iter_library(str(tmp_path / "lib") + "/**/*.cif")][:2] == [
        "batchA/structure.cif#0", "batchB/structure.cif#0"]
    only = str(tmp_path / "lib" / "batchB" / "structure.cif")
    assert [r["structure_id"] for r in iter_library(only)] == ["structure.cif#0"]


def test_pymatgen_computed_structure_entries_read_with_their_entry_ids(tmp_path: Path) -> None:
    from pymatgen.entries.computed_entries import ComputedStructureEntry

    entries = [ComputedStructureEntry(s, -80.0, entry_id=f"mp-{i}-GGA+U").as_dict()
               for i, s in enumerate((licoo2(), lifepo4()))]
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    rows = list(read_library_file(str(tmp_path / "entries.json")))
    assert [r["structure_id"] for r in rows] == ["mp-0-GGA+U", "mp-1-GGA+U"]
    assert [parse_raw(r).composition.reduced_formula for r in rows] == ["LiCoO2", "LiFePO4"]


def test_make_structure_id_content_hash() -> None:
    sid = make_structure_id(None, "", 3, "payload")
    assert sid.startswith("sha1-") and sid == make_structure_id("  ", "", 0, "payload")
    assert make_structure_id("mp-1", "f.cif", 0) == "mp-1"


def test_labels_ride_along(good_dir) -> None:
    d, _ = good_dir
    rows = {r["structure_id"]: r for r in iter_library(str(d))}
    assert rows["list-b"]["energy_above_hull"] == pytest.approx(0.012)
    assert rows["cif-c"]["energy_above_hull"] == pytest.approx(0.05)
    assert "formula_pretty" not in rows["mp-doc-1"]  # only PASSTHROUGH_FIELDS ride along


def test_bad_files_each_yield_one_row_never_raise(bad_dir) -> None:
    d, expected = bad_dir
    for name in expected:
        rows = list(read_library_file(str(d / name)))
        assert len(rows) == 1, name


@pytest.mark.parametrize(
    ("name", "code"),
    [("corrupt.parquet", RejectCode.UNREADABLE_FILE), ("truncated.cif.gz", RejectCode.UNREADABLE_FILE),
     ("empty.cif", RejectCode.EMPTY_SOURCE)],
)
def test_file_level_errors_become_error_rows(bad_dir, name: str, code: RejectCode) -> None:
    d, _ = bad_dir
    (row,) = read_library_file(str(d / name))
    assert row["fmt"] == "error" and row["error"] == code
    reject = parse_raw(row)
    assert isinstance(reject, Reject) and reject.reason == code and name in reject.message


def test_cif_blocks_become_rows_and_metadata_blocks_are_skipped(good_dir) -> None:
    d, _ = good_dir
    rows = list(read_library_file(str(d / "two_blocks.cif")))
    assert [r["structure_id"] for r in rows] == ["two_blocks.cif#0", "two_blocks.cif#1"]
    assert [parse_raw(r).composition.reduced_formula for r in rows] == ["LiCoO2", "LiMn2O4"]
    (row,) = read_library_file(str(d / "journal.cif"))  # data_global (authors) + data_I
    assert row["structure_id"] == "journal.cif#0" and "M\u00fcller" in row["payload"]
    assert parse_raw(row).composition.reduced_formula == "LiFePO4"


@pytest.mark.parametrize("text", ["data_global\n_journal_name_full 'Acta Cryst'\n", "not a cif\n"])
def test_cif_without_atom_sites_is_rejected_with_the_parsers_reason(tmp_path: Path, text: str) -> None:
    path = tmp_path / "meta.cif"
    path.write_text(text)
    (row,) = read_library_file(str(path))
    reject = parse_raw(row)
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE


def test_text_encodings_byte_order_marks_and_binary(tmp_path: Path) -> None:
    (tmp_path / "bom.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"structure_id": "a", "structure": licoo2().as_dict()}).encode())
    (row,) = read_library_file(str(tmp_path / "bom.jsonl"))
    assert row["structure_id"] == "a" and isinstance(parse_raw(row), Structure)
    poscar = licoo2().to(fmt="poscar").replace("\n", " J\u00f6rg\n", 1)
    (tmp_path / "latin1.vasp").write_bytes(poscar.encode("latin-1"))
    (row,) = read_library_file(str(tmp_path / "latin1.vasp"))
    assert isinstance(parse_raw(row), Structure)
    # Windows' "Unicode" (UTF-16 with a byte-order mark), a whole-file format and JSON
    (tmp_path / "utf16.cif").write_text(str(licoo2().to(fmt="cif")), encoding="utf-16")
    (tmp_path / "utf16.json").write_text(json.dumps(licoo2().as_dict()), encoding="utf-16")
    for name in ("utf16.cif", "utf16.json"):
        (row,) = read_library_file(str(tmp_path / name))
        assert isinstance(parse_raw(row), Structure), (name, row)
    # binary content (NUL bytes) is not taken for Latin-1 text: the file is unreadable, as before
    (tmp_path / "binary.cif").write_bytes(bytes(range(256)) * 4)
    (row,) = read_library_file(str(tmp_path / "binary.cif"))
    assert row["error"] == RejectCode.UNREADABLE_FILE and "UnicodeDecodeError" in row["payload"]
    # JSON must be UTF-8: Latin-1 bytes there stay an unreadable file
    (tmp_path / "latin1.json").write_bytes('{"structure_id": "J\u00f6rg"}'.encode("latin-1"))
    (row,) = read_library_file(str(tmp_path / "latin1.json"))
    assert row["error"] == RejectCode.UNREADABLE_FILE


def test_gzip_is_recognised_by_content_not_by_suffix(tmp_path: Path) -> None:
    """A gzipped .cif without .gz, and plain text named .gz, both read (streamed JSON lines too)."""
    cif = str(licoo2().to(fmt="cif"))
    line = json.dumps({"structure_id": "z", "structure": licoo2().as_dict()}) + "\n"
    (tmp_path / "zipped.cif").write_bytes(gzip.compress(cif.encode()))
    (tmp_path / "plain.cif.gz").write_text(cif)
    (tmp_path / "zipped.jsonl").write_bytes(gzip.compress(line.encode()))
    (tmp_path / "plain.jsonl.gz").write_text(line)
    for name in ("zipped.cif", "plain.cif.gz", "zipped.jsonl", "plain.jsonl.gz"):
        (row,) = read_library_file(str(tmp_path / name))
        assert isinstance(parse_raw(row), Structure), (name, row)


def test_cif_text_where_a_structure_dict_was_expected(tmp_path: Path) -> None:
    """JSON items with CIF text under 'cif' or 'structure', and a Parquet 'structure' column of
    CIFs (a DataFrame of CIFs saved as is), parse as CIFs."""
    cif = str(licoo2().to(fmt="cif"))
    (tmp_path / "items.json").write_text(json.dumps(
        [{"structure_id": "c1", "cif": cif}, {"structure_id": "c2", "structure": cif}]))
    pq.write_table(pa.table({"material_id": ["c3"], "structure": [cif]}), tmp_path / "cifs.parquet")
    rows = [*read_library_file(str(tmp_path / "items.json")),
            *read_library_file(str(tmp_path / "cifs.parquet"))]
    assert [(r["structure_id"], r["fmt"]) for r in rows] == [("c1", "cif"), ("c2", "cif"), ("c3", "cif")]
    assert all(parse_raw(r).matches(licoo2()) for r in rows)


def test_json_lines_or_concatenated_objects_saved_as_json(tmp_path: Path) -> None:
    items = [{"structure_id": f"j{i}", "structure": licoo2().as_dict()} for i in range(3)]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    (tmp_path / "pretty.json").write_text("".join(json.dumps(i, indent=2) for i in items))
    for name in ("lines.json", "pretty.json"):
        rows = list(read_library_file(str(tmp_path / name)))
        assert [r["structure_id"] for r in rows] == ["j0", "j1", "j2"], name
        assert all(isinstance(parse_raw(r), Structure) for r in rows)
    # a broken value: the items before it are kept, the rest is one reject saying where
    (tmp_path / "cut.json").write_text(json.dumps(items[0]) + "\n" + json.dumps(items[1])[:-20] + "\n")
    rows = list(read_library_file(str(tmp_path / "cut.json")))
    assert [(r["structure_id"], r["error"]) for r in rows] == [
        ("j0", ""), ("cut.json#1", RejectCode.UNPARSEABLE)]
    assert "item 1 and after" in rows[1]["payload"]


def test_parquet_cell_with_two_structures_is_one_reject(bad_dir) -> None:
    d, _ = bad_dir
    (row,) = read_library_file(str(d / "two_structures_in_one_cell.parquet"))
    reject = parse_raw(row)
    assert isinstance(reject, Reject) and reject.reason == RejectCode.MULTIPLE_STRUCTURES
    assert "2 data blocks" in reject.message and reject.structure_id == "two-in-one"


def test_truncated_jsonl_gz_keeps_rows_before_the_cut(tmp_path: Path) -> None:
    lines = [json.dumps({"material_id": f"m-{i}", "structure": licoo2().as_dict()}) for i in range(40)]
    blob = gzip.compress("\n".join(lines).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: int(len(blob) * 0.8)])
    rows = list(read_library_file(str(path)))
    assert rows[-1]["error"] == RejectCode.UNREADABLE_FILE
    good = rows[:-1]
    assert 0 < len(good) < 40 and all(r["fmt"] == "pymatgen_json" for r in good)
    assert rows[-1]["structure_id"] == f"cut.jsonl.gz#{len(good)}"


def test_bad_jsonl_line_and_item_without_structure(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    first = json.dumps({"structure_id": "a", "structure": licoo2().as_dict()})
    path.write_text(first + '\n{not json\n{"structure_id": "c"}\n')
    rows = list(read_library_file(str(path)))
    assert [r["fmt"] for r in rows] == ["pymatgen_json", "error", "error"]
    assert [r["structure_id"] for r in rows] == ["a", "mixed.jsonl#1", "c"]
    assert {r["error"] for r in rows[1:]} == {RejectCode.UNPARSEABLE}


def test_json_empty_list_is_empty_source(tmp_path: Path) -> None:
    (tmp_path / "none.json").write_text("[]")
    (row,) = read_library_file(str(tmp_path / "none.json"))
    assert row["error"] == RejectCode.EMPTY_SOURCE


def test_parquet_read_in_batches_and_missing_column(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(library, "_PARQUET_BATCH_ROWS", 7)
    sjson = licoo2().to_json()
    pq.write_table(pa.table({"structure_json": [sjson] * 20, "structure_id": [f"p{i}" for i in range(20)]}),
                   tmp_path / "many.parquet", row_group_size=5)
    rows = list(read_library_file(str(tmp_path / "many.parquet")))
    assert [r["structure_id"] for r in rows] == [f"p{i}" for i in range(20)]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "nocol.parquet")
    (row,) = read_library_file(str(tmp_path / "nocol.parquet"))
    assert row["error"] == RejectCode.UNREADABLE_FILE and "structure_json" in row["payload"]


def test_parquet_with_two_structure_columns_reads_each_rows_filled_one(tmp_path: Path) -> None:
    """A library merged from two exports: some rows have structure_json, others only cif."""
    from pymatgen.io.cif import CifWriter

    table = pa.table({"structure_id": ["json", "cif", "neither"],
                      "structure_json": [licoo2().to_json(), None, ""],
                      "cif": [None, str(CifWriter(limn2o4())), None]})
    pq.write_table(table, tmp_path / "merged.parquet")
    rows = list(read_library_file(str(tmp_path / "merged.parquet")))
    assert [(r["structure_id"], r["fmt"]) for r in rows] == [("json", "pymatgen_json"), ("cif", "cif"),
                                                             ("neither", "error")]
    first, second, third = (parse_raw(r) for r in rows)
    assert first.matches(licoo2()) and second.matches(limn2o4())
    assert isinstance(third, Reject) and "empty 'structure_json' and 'cif' value" in third.message


def test_parquet_structure_column_as_struct_reads_like_json(tmp_path: Path) -> None:
    """MP-shaped documents written with pa.Table.from_pylist store 'structure' as a nested struct
    (not a JSON string); each row still parses to its structure."""
    sd = licoo2().as_dict()
    sd.pop("properties", None)  # an empty dict has no Parquet struct type
    for site in sd["sites"]:
        site.pop("properties", None)
    docs = [{"material_id": f"mp-{i}", "structure": sd, "energy_above_hull": 0.01 * i}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "docs.parquet")
    assert pa.types.is_struct(pq.read_schema(tmp_path / "docs.parquet").field("structure").type)
    rows = list(read_library_file(str(tmp_path / "docs.parquet")))
    assert [r["structure_id"] for r in rows] == ["mp-0", "mp-1", "mp-2"]
    parsed = [parse_raw(r) for r in rows]
    assert all(isinstance(p, Structure) and p.matches(licoo2()) for p in parsed)


def test_files_in_hidden_directories_are_skipped(tmp_path: Path, caplog) -> None:
    (tmp_path / "lib" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "lib" / "sub").mkdir()
    licoo2().to(filename=str(tmp_path / "lib" / "sub" / "LiCoO2.cif"))
    licoo2().to(filename=str(tmp_path / "lib" / ".ipynb_checkpoints" / "LiCoO2-checkpoint.cif"))
    licoo2().to(filename=str(tmp_path / "lib" / ".hidden.cif"))
    expected = [str(tmp_path / "lib" / "sub" / "LiCoO2.cif")]
    (tmp_path / "lib" / "OUTCAR").write_text(" vasp.6.4.2\n")
    with caplog.at_level("WARNING", logger=library.__name__):
        assert list_library_files(str(tmp_path / "lib")) == expected
    assert "skipped 3 unsupported or hidden files (e.g. .hidden.cif, LiCoO2-checkpoint.cif, " \
           "OUTCAR)" in caplog.text
    assert list_library_files(str(tmp_path / "lib") + "/**/*.cif") == expected
    # a library that itself lies below a dot-directory is still read
    (tmp_path / ".data").mkdir()
    licoo2().to(filename=str(tmp_path / ".data" / "a.cif"))
    assert list_library_files(str(tmp_path / ".data")) == [str(tmp_path / ".data" / "a.cif")]


def test_airss_res_ase_files_and_vasprun_hold_the_structures_written(good_dir) -> None:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    d, _ = good_dir
    rows = {r["structure_id"]: r for r in iter_library(str(d))
            if library_format(r["source"]) in ("res", "ase")}
    expected = {"LiCoO2-8f2a-1": licoo2(), "LiFePO4-03b1-7": lifepo4(), "relax.traj#0": licoo2(),
                "relax.traj#1": limn2o4(), "ase-b": limn2o4(), "candidates.db#1": lifepo4(),
                "relax-1/vasprun.xml.gz#0": relaxation(limn2o4())[-1]}
    assert sorted(rows) == sorted(expected)
    matcher = StructureMatcher(primitive_cell=False, scale=False, attempt_supercell=False)
    for sid, structure in expected.items():
        parsed = parse_raw(rows[sid])
        assert isinstance(parsed, Structure), (sid, parsed)
        assert parsed.composition == structure.composition, sid
        assert matcher.fit(parsed, structure), sid
        assert parsed.volume == pytest.approx(structure.volume, rel=1e-6), sid  # the last step
    assert rows["ase-b"]["energy_above_hull"] == pytest.approx(0.02)  # ASE key-value pairs ride along
    assert "energy_above_hull" not in rows["candidates.db#1"]
    assert not any(Path(f).name == "Thumbs.db" for f in list_library_files(str(d)))


def test_split_res_blocks_ids_and_text_without_titl(tmp_path: Path) -> None:
    text = airss_res(licoo2(), "a-1") + "\n" + airss_res(lifepo4(), "b-2")
    blocks = split_res("REM header before the first structure\n" + text)
    assert [b.split()[1] for b in blocks] == ["a-1", "b-2"]
    assert split_res("CELL 1.0 3 3 3 90 90 90\n") == ["CELL 1.0 3 3 3 90 90 90\n"]
    bare = tmp_path / "bare.res"  # pymatgen writes a bare TITL line: the ids fall back to FILE#i
    bare.write_text(re.sub(r"^TITL .*$", "TITL", text, flags=re.MULTILINE))
    assert [r["structure_id"] for r in read_library_file(str(bare))] == ["bare.res#0", "bare.res#1"]
    reject = parse_raw({"structure_id": "x", "source": "x.res", "fmt": "res",
                        "payload": "TITL broken\nCELL 1.0 nan\nEND\n"})
    assert isinstance(reject, Reject) and reject.reason == RejectCode.UNPARSEABLE


def test_bad_ase_files_become_reject_rows_and_are_never_written(tmp_path: Path) -> None:
    from ase import Atoms
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor

    (tmp_path / "junk.db").write_bytes(b"not a SQLite file " * 10)
    (tmp_path / "empty.db").write_bytes(b"")
    (tmp_path / "empty.traj").write_bytes(b"")
    frames = [AseAtomsAdaptor.get_atoms(s) for s in (licoo2(), lifepo4(), limn2o4())]
    ase_write(tmp_path / "whole.traj", frames, format="traj")
    data = (tmp_path / "whole.traj").read_bytes()
    (tmp_path / "cut.traj").write_bytes(data[: int(len(data) * 0.9)])  # a run killed mid-write
    write_ase_db(tmp_path / "mixed.db", [(frames[0], {"structure_id": "periodic"}),
                                         (Atoms("LiO", positions=[[0, 0, 0], [0, 0, 1.8]]),
                                          {"structure_id": "molecule"})])
    (tmp_path / "mixed.db.gz").write_bytes(gzip.compress((tmp_path / "mixed.db").read_bytes()))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def read(name: str) -> list[dict]:
        return list(read_library_file(str(tmp_path / name)))

    [junk] = read("junk.db")
    assert junk["error"] == RejectCode.UNREADABLE_FILE and "not a readable ASE .db file" in junk["payload"]
    for name in ("empty.db", "empty.traj"):
        assert [r["error"] for r in read(name)] == [RejectCode.EMPTY_SOURCE], name
    cut = read("cut.traj")
    assert 2 <= len(cut) <= 3 and cut[-1]["error"] == RejectCode.UNREADABLE_FILE  # frames before kept
    assert all(isinstance(parse_raw(r), Structure) for r in cut[:-1])
    for name in ("mixed.db", "mixed.db.gz"):
        parsed = {r["structure_id"]: parse_raw(r) for r in read(name)}
        assert isinstance(parsed["periodic"], Structure)
        assert parsed["molecule"].reason == RejectCode.DEGENERATE_LATTICE  # no 3D cell
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written


def test_vasprun_names_ids_and_runs_that_did_not_finish(tmp_path: Path) -> None:
    for name in ("vasprun.xml", "vasprun.xml.gz", "vasprun.xml.relax2", "vasprun.relax2.xml.gz",
                 "VASPRUN.XML"):
        assert library_format(f"calc/{name}") == "ase", name
    for name in ("OUTCAR", "vasprun.h5", "other.xml", "vasprun.txt"):
        assert library_format(f"calc/{name}") is None, name
    text = vasprun_xml(relaxation(licoo2()))
    for run, content in {"done": text, "killed": text[: len(text) // 2],
                         "not-xml": "vasp.6.4.2 OUTCAR text</modeling>\n", "empty": ""}.items():
        (tmp_path / run).mkdir()
        (tmp_path / run / "vasprun.xml").write_text(content)

    def read(run: str) -> list[dict]:
        return list(read_library_file(str(tmp_path / run / "vasprun.xml")))

    [done] = read("done")
    assert done["structure_id"] == "done/vasprun.xml#0" and done["fmt"] == "extxyz"
    assert "energy" not in done["payload"] and "forces" not in done["payload"]  # the structure only
    assert parse_raw(done).volume == pytest.approx(relaxation(licoo2())[-1].volume)
    [killed] = read("killed")  # ASE alone would return the last finished ionic step as the result
    assert killed["error"] == RejectCode.UNREADABLE_FILE and "did not finish" in killed["payload"]
    [not_xml] = read("not-xml")
    assert not_xml["error"] == RejectCode.UNREADABLE_FILE
    assert "not a readable VASP vasprun.xml file" in not_xml["payload"]
    assert [r["error"] for r in read("empty")] == [RejectCode.EMPTY_SOURCE]
    # a whole calculation tree: one row per run, named by its folder
    rows = list(iter_library(str(tmp_path)))
    assert sorted(r["structure_id"] for r in rows) == [
        "done/vasprun.xml#0", "empty/vasprun.xml", "killed/vasprun.xml", "not-xml/vasprun.xml"]


def test_run_folders_with_several_vasp_files_are_pointed_out(tmp_path: Path, caplog) -> None:
    """VASP leaves POSCAR (start), CONTCAR (end) and vasprun.xml in a run folder: all are read,
    and the log says how to keep one structure per run."""
    text = vasprun_xml(relaxation(licoo2()))
    for run in ("r1", "r2"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "vasprun.xml").write_text(text)
        (tmp_path / run / "CONTCAR").write_text(Poscar(licoo2()).get_str())
    with caplog.at_level("WARNING", logger=library.__name__):
        assert len(list_library_files(str(tmp_path))) == 4
    assert "2 VASP run folders hold several of POSCAR/CONTCAR/vasprun.xml (e.g. r1)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=library.__name__):  # the glob the warning suggests
        assert list_library_files(f"{tmp_path}/**/vasprun.xml*") == [
            str(tmp_path / r / "vasprun.xml") for r in ("r1", "r2")]
    assert "VASP run folders" not in caplog.text


def test_split_extxyz_frames_and_garbage() -> None:
    text = "2\nLattice=\"3 0 0 0 3 0 0 0 3\"\nLi 0 0 0\nO 1 1 1\n1\nc\nO 0 0 0\n"
    assert len(split_extxyz(text)) == 2
    assert split_extxyz("abc\ndef\n") == ["abc\ndef\n"]
    # a count one short keeps its extra atom line, and the frames after it are read as they are
    frames = split_extxyz(text.replace("2\n", "1\n", 1) + text)
    assert len(frames) == 4 and frames[0].count("\n") == 4 and frames[2] == frames[0].replace("1\n", "2\n", 1)


def test_names_holding_poscar_with_a_listed_suffix_take_the_suffixs_format() -> None:
    assert library_format("relaxed_CONTCARs.extxyz") == "extxyz"
    assert library_format("POSCAR_set.json") == "json"
    assert library_format("CONTCAR_all.parquet") == "parquet"
    assert library_format("run/POSCAR") == library_format("CONTCAR.relax1.gz") == "poscar"
    assert library_format("LiCoO2_POSCAR") == library_format("x.vasp") == "poscar"


def test_res_title_written_by_ase_is_not_taken_for_an_id(tmp_path: Path) -> None:
    for i, title in enumerate(("TITL config_type=layered seed=0", "TITL None None 12.0")):
        block = re.sub(r"^TITL.*$", title, airss_res(licoo2(), "x"), flags=re.MULTILINE)
        (tmp_path / f"cand_{i}.res").write_text(block)
    ids = [r["structure_id"] for i in range(2) for r in read_library_file(str(tmp_path / f"cand_{i}.res"))]
    assert ids == ["cand_0.res#0", "cand_1.res#0"]


def test_file_labels_of_s3_and_local_files_are_paths_below_the_root(monkeypatch) -> None:
    built: list[str] = []  # an S3FileSystem per file took 0.6 ms: a minute for 100,000 files

    def counting_filesystem_for(uri: str):
        built.append(uri)
        return filesystem_for(uri)

    monkeypatch.setattr(library, "filesystem_for", counting_filesystem_for)
    files = [f"s3://b/lib/sub{i}/POSCAR" for i in range(2)] + ["s3://b/lib/top.cif"]
    assert library.file_labels("s3://b/lib", files) == ["sub0/POSCAR", "sub1/POSCAR", "top.cif"]
    assert built == ["s3://b/lib"]  # the root only
    assert library.file_labels("/data/lib", ["/data/lib/a/s.cif", "/data/lib/s.cif"]) == [
        "a/s.cif", "s.cif"]


def test_file_label_prefixes_the_folder_only_for_names_vasp_gives_every_run() -> None:
    label = library.file_label
    for name in ("POSCAR", "CONTCAR.gz", "POSCAR-001", "CONTCAR.relax1", "vasprun.xml",
                 "vasprun.xml.relax2.gz"):
        assert label(f"/x/run1/{name}") == f"run1/{name}", name
    for name in ("POSCAR_set.json", "LiCoO2_POSCAR", "POSCARS.extxyz", "s.cif"):
        assert label(f"/x/run1/{name}") == name, name


def test_filesystem_for_local_and_s3(monkeypatch) -> None:
    fs, path = filesystem_for("relative/dir")
    assert path.endswith("relative/dir") and Path(path).is_absolute()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs, path = filesystem_for("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix" and fs.type_name == "s3"


@pytest.mark.slow
def test_s3_library_via_moto(good_dir, monkeypatch) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    d, counts = good_dir
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                           "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="lib")
        for rel in counts:
            s3.upload_file(str(d / rel), "lib", f"screen/{rel}")
        files = list_library_files("s3://lib/screen")
        assert files == sorted(f"s3://lib/screen/{rel}" for rel in counts)
        sizes = {f.uri: f.size for f in list_library("s3://lib/screen")}
        assert sizes == {f"s3://lib/screen/{rel}": (d / rel).stat().st_size for rel in counts}
        assert all(f.mtime for f in list_library("s3://lib/screen/*.json"))
        assert list_library_files("s3://lib/screen/*.json") == [
            "s3://lib/screen/bom.json", "s3://lib/screen/list.json",
            "s3://lib/screen/single.json"]
        rows = list(iter_library("s3://lib/screen"))
        assert len(rows) == sum(counts.values())
        assert all(isinstance(parse_raw(r), Structure) for r in rows)
    finally:
        server.stop()


def test_gzipped_parquet_and_unsupported_explicit_file(tmp_path: Path) -> None:
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"structure_json": [licoo2().to_json()] * 3}), buffer)
    (tmp_path / "lib.parquet.gz").write_bytes(gzip.compress(buffer.getvalue().to_pybytes()))
    rows = list(read_library_file(str(tmp_path / "lib.parquet.gz")))
    assert [r["structure_id"] for r in rows] == [f"lib.parquet.gz#{i}" for i in range(3)]
    assert all(isinstance(parse_raw(r), Structure) for r in rows)
    (tmp_path / "notes.txt").write_text("hello")
    assert list_library_files(str(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]
    (row,) = read_library_file(str(tmp_path / "notes.txt"))
    assert row["error"] == RejectCode.UNREADABLE_FILE and "unsupported file type" in row["payload"]


def test_parquet_row_ranges_read_like_the_whole_file(tmp_path: Path) -> None:
    n = 12
    pq.write_table(pa.table({"material_id": [f"m{i}" for i in range(n)], "structure_json": ["{}"] * n}),
                   tmp_path / "a.parquet", row_group_size=5)
    path = str(tmp_path / "a.parquet")
    whole = list(read_library_file(path))
    assert list(read_library_file(path, rows=(3, 11))) == whole[3:11]
    assert list(read_library_file(path, rows=(12, 20))) == []  # past the end: nothing, no empty_source
    (tmp_path / "x.cif").write_text("data_x")
    with pytest.raises(ValueError, match="only supported for Parquet"):
        list(read_library_file(str(tmp_path / "x.cif"), rows=(0, 1)))


def test_parquet_columns_of_bytes_or_numbers_are_rejects_not_crashes(tmp_path: Path) -> None:
    good = licoo2().to_json()
    table = pa.table({"material_id": ["a", "b", "c"],
                      "structure_json": [good.encode(), b"\xff\xfe\x00", None],
                      "structure": [None, None, 5]})
    pq.write_table(table, tmp_path / "odd.parquet")
    rows = list(read_library_file(str(tmp_path / "odd.parquet")))
    assert [r["structure_id"] for r in rows] == ["a", "b", "c"]
    assert isinstance(parse_raw(rows[0]), Structure)  # UTF-8 bytes are text
    assert rows[1]["error"] == RejectCode.UNPARSEABLE and "is binary, not UTF-8" in rows[1]["payload"]
    assert rows[2]["error"] == RejectCode.UNPARSEABLE and "holds a int value" in rows[2]["payload"]


def test_json_arrays_appended_to_one_file_are_each_item(tmp_path: Path) -> None:
    items = [{"material_id": f"m{i}", "structure": licoo2().as_dict()} for i in range(3)]
    (tmp_path / "appended.json").write_text(json.dumps(items[:2]) + "\n" + json.dumps(items[2:]))
    rows = list(read_library_file(str(tmp_path / "appended.json")))
    assert [r["structure_id"] for r in rows] == ["m0", "m1", "m2"]
    assert all(isinstance(parse_raw(r), Structure) for r in rows)


def test_utf16_json_lines_and_windows_1252_text(tmp_path: Path) -> None:
    lines = "".join(json.dumps({"material_id": f"m{i}", "structure": licoo2().as_dict()}) + "\n"
                    for i in range(2))
    (tmp_path / "ps.jsonl").write_text(lines, encoding="utf-16")  # PowerShell's ">"
    assert [r["structure_id"] for r in read_library_file(str(tmp_path / "ps.jsonl"))] == ["m0", "m1"]
    # Windows-1252 '…' (0x85) was U+0085 in Latin-1: a line break to splitlines, one atom too many
    import io

    from ase.io import write
    from pymatgen.io.ase import AseAtomsAdaptor

    buffer = io.StringIO()
    write(buffer, AseAtomsAdaptor.get_atoms(licoo2()), format="extxyz")
    head, comment, rest = buffer.getvalue().split("\n", 2)
    text = "\n".join([head, comment + ' note="from ICSD\u2026"', rest])
    (tmp_path / "win.extxyz").write_bytes(text.encode("cp1252"))
    (row,) = read_library_file(str(tmp_path / "win.extxyz"))
    assert isinstance(parse_raw(row), Structure), row["payload"][:200]


def test_bracketed_names_are_paths_and_dangling_links_are_rejects(tmp_path: Path) -> None:
    folder = tmp_path / "LiCoO2 [mp-22526]"
    folder.mkdir()
    (folder / "sample[1].cif").write_text(str(licoo2().to(fmt="cif")))
    (folder / "sample1.cif").write_text(str(limn2o4().to(fmt="cif")))
    assert list_library_files(str(folder / "sample[1].cif")) == [str(folder / "sample[1].cif")]
    assert len(list_library_files(str(folder))) == 2
    (folder / "gone.cif").symlink_to(tmp_path / "purged" / "gone.cif")
    for spec in (str(folder), str(tmp_path / "*" / "*.cif")):  # a glob matches the bracketed name
        rows = {r["structure_id"]: r for r in iter_library(spec)}
        assert len(rows) == 3, spec
        assert "sample[1].cif#0" in rows or "LiCoO2 [mp-22526]/sample[1].cif#0" in rows
        gone = next(r for sid, r in rows.items() if "gone.cif" in sid)
        assert gone["error"] == RejectCode.UNREADABLE_FILE and "does not exist" in gone["payload"]
    assert library_format("vasprun.xml.bz2") is None and library_format("vasprun.xml.gz") == "ase"
