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
