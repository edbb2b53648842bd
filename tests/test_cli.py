"""The command line parses options and calls the Python API (typer's CliRunner, real code)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from typer.testing import CliRunner

from cathode_ray.cli import BUNDLED_MODEL, DEFAULT_REFERENCES, app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("ingest", "train", "report", "screen", "rescreen", "library"):
        assert cmd in out
    assert "generate" in runner.invoke(app, ["library", "--help"]).output


def test_bundled_model_is_in_the_repo() -> None:
    manifest = json.loads((Path(BUNDLED_MODEL) / "manifest.json").read_text())
    assert manifest["backbone"]["spec"] == "chgnet" and len(manifest["members"]) == 5
    assert [m["seed"] for m in manifest["members"]] == [42, 43, 44, 45, 46]


def test_default_references_are_found_from_any_working_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # a user screening from their own project directory
    path = Path(DEFAULT_REFERENCES.removeprefix("snapshot:"))
    assert path.is_absolute()
    assert path == Path(__file__).resolve().parents[2] / "shared" / "data" / "mp_reference_entries.jsonl.gz"


def test_ingest_command(tmp_path: Path, tiny_docs) -> None:
    snap = tmp_path / "docs.jsonl.gz"
    with gzip.open(snap, "wt") as f:
        for d in tiny_docs:
            f.write(json.dumps(d) + "\n")
    res = runner.invoke(app, ["ingest", "--source", f"snapshot:{snap}", "--out", str(tmp_path / "ds")])
    assert res.exit_code == 0, res.output
    assert f"{len(tiny_docs)} rows, 0 rejects" in res.output
    assert (tmp_path / "ds" / "DATA_VERSION.json").is_file()


def test_bad_option_is_a_clear_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["ingest", "--source", "ftp://x", "--out", str(tmp_path)])
    assert res.exit_code != 0
    assert "snapshot:PATH" in str(res.exception) or "snapshot:PATH" in res.output


def test_console_entry_prints_user_errors_in_one_line_and_bugs_in_full(
        monkeypatch, capsys, tmp_path: Path) -> None:
    """A missing library used to print a 60-line traceback (after starting Ray) around the line
    that says what to do; now it is that line, before Ray starts."""
    import sys

    import pytest

    from cathode_ray.cli import main

    missing = str(tmp_path / "no-such-library")
    monkeypatch.setattr(sys, "argv", ["cathode-ray", "screen", "--library", missing,
                                      "--out", str(tmp_path / "out")])
    monkeypatch.delenv("CATHODE_RAY_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: FileNotFoundError: library {missing!r} does not exist")
    assert "Traceback" not in err and len(err.splitlines()) == 2
    monkeypatch.setenv("CATHODE_RAY_DEBUG", "1")  # the traceback when asked for
    with pytest.raises(FileNotFoundError):
        main()
    monkeypatch.delenv("CATHODE_RAY_DEBUG")
    monkeypatch.setattr(sys, "argv", ["cathode-ray", "screen", "--library", "demo",
                                      "--model", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # no manifest.json: a clear error, not a stack
        main()
    assert "error: ArtifactIntegrityError:" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["cathode-ray", "screen", "--library", "demo", "--out",
                                      str(tmp_path / "out"), "--references", "snapshot:/no/refs.gz"])
    with pytest.raises(SystemExit):  # before: the graph actors failed after ~50 s of start-up
        main()
    assert "error: FileNotFoundError: reference entries file /no/refs.gz not found" in \
        capsys.readouterr().err
    # a bug (here: a library listing that crashes) keeps its traceback
    monkeypatch.setattr("cathode_ray.data.library.list_library",
                        lambda spec: (_ for _ in ()).throw(KeyError("bug")))
    monkeypatch.setattr(sys, "argv", ["cathode-ray", "screen", "--library", missing,
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(KeyError):
        main()
