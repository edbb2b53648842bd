"""Unit tests for cathode_ray.storage: URIs to filesystems, and Parquet writes no reader sees half of."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cathode_ray import storage
from cathode_ray.screen import runs


def test_filesystem_for_local_and_s3(tmp_path: Path) -> None:
    fs, path = storage.filesystem_for(str(tmp_path / "out/"))
    assert fs.type_name == "local" and path == str(tmp_path / "out")
    fs, path = storage.filesystem_for("s3://bucket/a/b/")
    assert fs.type_name == "s3" and path == "bucket/a/b"
    assert storage.join("s3://bucket/", "/results/", "run_id=x") == "s3://bucket/results/run_id=x"
    # a scheme pyarrow does not know: a ValueError that says what to give instead (before: Arrow's
    # "Unrecognized filesystem type in URI")
    with pytest.raises(ValueError, match=r"cannot read 'snapshot:' locations; give a local path "
                                         r"or s3://bucket/key \('snapshot:' marks MP-document"):
        storage.filesystem_for("snapshot:/data/docs.jsonl.gz")
    with pytest.raises(ValueError, match=r"cannot read 'ftp:' locations"):
        storage.filesystem_for("ftp://host/lib")


def test_relative_local_path_with_a_colon_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ``scheme://`` marks a URI: ``out:v2/screen`` is a directory under the working directory
    (before: read as the URI scheme 'out' and refused)."""
    monkeypatch.chdir(tmp_path)
    for rel in ("out:v2/screen", "results/v2:a", "2024-01-01T10:00/x"):
        fs, path = storage.filesystem_for(rel)
        assert fs.type_name == "local" and path == str(tmp_path / rel)
    fs, path = storage.filesystem_for(f"file://{tmp_path}/x")
    assert fs.type_name == "local" and path == f"{tmp_path}/x"
    storage.write_parquet(pa.table({"x": [1]}), *storage.filesystem_for("out:v2/part-0.parquet"))
    assert pq.read_table(tmp_path / "out:v2" / "part-0.parquet").num_rows == 1


def test_write_parquet_renames_a_complete_file(tmp_path: Path) -> None:
    table = pa.table({"structure_id": ["a", "b"], "x": [1.0, 2.0]})
    target = f"{tmp_path}/results/run_id=r/part-0.parquet"
    storage.write_parquet(table, pafs.LocalFileSystem(), target)
    assert pq.read_table(target).equals(table)
    assert sorted(p.name for p in Path(target).parent.iterdir()) == ["part-0.parquet"]


def test_write_killed_mid_file_leaves_no_parquet_and_resume_deletes_the_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = pa.table({"structure_id": ["a"]})
    results = tmp_path / "results"
    storage.write_parquet(good, pafs.LocalFileSystem(), f"{results}/part-0.parquet")

    def dies_half_way(table: pa.Table, where: str, **kwargs: object) -> None:
        Path(where).write_bytes(b"PAR1 half a file")  # what a killed writer leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.pq, "write_table", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        storage.write_parquet(pa.table({"structure_id": ["b"]}), pafs.LocalFileSystem(),
                              f"{results}/part-1.parquet")
    monkeypatch.undo()
    names = sorted(p.name for p in results.iterdir())
    assert names == [f".part-1.parquet{storage.IN_PROGRESS_SUFFIX}", "part-0.parquet"]
    # a reader (and Ray's read_parquet) sees only the complete file
    assert runs.read_columns(str(results), ["structure_id"]) == {"structure_id": ["a"]}
    assert pq.read_table(str(results)).column("structure_id").to_pylist() == ["a"]
    # a resume (drop_corrupt) removes the temporary so its rows are redone
    assert runs.read_columns(str(results), ["structure_id"], drop_corrupt=True) == {
        "structure_id": ["a"]}
    assert sorted(p.name for p in results.iterdir()) == ["part-0.parquet"]


def test_is_remote_reads_the_scheme_in_any_case() -> None:
    from cathode_ray.storage import is_remote

    assert is_remote("s3://b/k") and is_remote("S3://b/k")
    assert not is_remote("/tmp/s3://x") and not is_remote("file:///tmp/x") and not is_remote("s3")


def test_resume_deletes_a_corrupt_file_but_not_one_it_cannot_reach(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = tmp_path / "results"
    storage.write_parquet(pa.table({"structure_id": ["a"]}), pafs.LocalFileSystem(),
                          f"{results}/part-0.parquet")
    (results / "part-1.parquet").write_bytes(b"PAR1" + bytes(range(256)) + b"PAR1")  # damaged
    with pytest.raises(ValueError):  # without drop_corrupt a damaged file raises
        runs.read_columns(str(results), ["structure_id"])
    assert runs.read_columns(str(results), ["structure_id"], drop_corrupt=True) == {
        "structure_id": ["a"]}
    assert [p.name for p in results.iterdir()] == ["part-0.parquet"]

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OSError("When reading information for key 'part-0.parquet': AWS Error ACCESS_DENIED")

    monkeypatch.setattr(runs.pq, "read_table", unreachable)
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        runs.read_columns(str(results), ["structure_id"], drop_corrupt=True)
    assert [p.name for p in results.iterdir()] == ["part-0.parquet"]  # kept
