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


def _console(monkeypatch, capsys, argv: list[str]) -> tuple[int | str | None, str]:
    """Run the console entry with ``argv``; its exit code and stderr."""
    import sys

    import pytest

    from cathode_ray.cli import main

    monkeypatch.setattr(sys, "argv", ["cathode-ray", *argv])
    monkeypatch.delenv("CATHODE_RAY_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_screen_config_yaml_mistakes_are_one_line_errors(monkeypatch, capsys, tmp_path: Path) -> None:
    """A --config YAML with a typo'd key, a wrong type, a list instead of a mapping, bad YAML or an
    unknown validation setting: ``error: ...`` (exit 1) naming the file and key, before Ray
    starts (before: TypeError tracebacks, click's boxed usage error with exit 2, or an
    AttributeError inside the Ray validate workers)."""
    cases = {
        "gpu_actor: 1\n": r"unknown key 'gpu_actor' \(did you mean 'gpu_actors'\?\); valid keys: "
                          r"library, model, .*validation, verbose$",
        "gpu_actors: two\n": r"gpu_actors: 'two' is not a valid integer",
        "gpu_actors: 2.5\n": r"gpu_actors must be int, got float 2.5",
        "cpu_actors: true\n": r"cpu_actors must be int, got bool True",
        "- a\n- b\n": r"expected a mapping of option names to values .*got a YAML list",
        "gpu_actors: [1\n": r"not valid YAML: ",
        "validation:\n  max_sites: 10\n": r"validation: unknown key 'max_sites' \(did you mean "
                                         r"'max_atoms'\?\); valid keys: max_atoms, ",
        "validation:\n  max_atoms: 1.5\n": r"validation: max_atoms must be int, got float 1.5",
        "validation: strict\n": r"validation: expected a mapping .*got a YAML str",
    }
    import re

    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text)
        code, err = _console(monkeypatch, capsys, ["screen", "--out", str(tmp_path / "out"),
                                                   "--config", str(path)])
        first, *rest = err.splitlines()
        assert code == 1 and first.startswith(f"error: ValueError: {path}: "), (text, err)
        assert re.search(message, first), (text, first)
        assert rest == ["(set CATHODE_RAY_DEBUG=1 for the traceback)"], (text, err)
    assert not (tmp_path / "out").exists()


def test_screen_config_yaml_values_convert_like_the_command_line(tmp_path: Path) -> None:
    """YAML strings convert through the options' click types ("2" -> 2, "no" -> False), lists
    become the tuples a field holds, and a validation mapping becomes a ValidationConfig."""
    from cathode_ray.cli import _yaml_defaults
    from cathode_ray.data.validate import ValidationConfig
    from cathode_ray.screen.pipeline import ScreenConfig

    path = tmp_path / "screen.yaml"
    path.write_text("gpu-actors: '2'\nobject_store_mb: '256'\nverbose: 'no'\nlock_ttl_s: 30\n"
                    "validation:\n  max_atoms: 50\n  transition_metals: [Mn, Ni]\n")
    got = _yaml_defaults(path, ScreenConfig)
    assert got == {"gpu_actors": 2, "object_store_mb": 256.0, "verbose": False, "lock_ttl_s": 30,
                   "validation": ValidationConfig(max_atoms=50, transition_metals=("Mn", "Ni"))}
    config = ScreenConfig(library="demo", model="m", out=str(tmp_path), references="mp", **got)
    assert config.validation.max_atoms == 50 and config.gpu_actors == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert _yaml_defaults(empty, ScreenConfig) == {}


def test_screen_config_checks_field_types() -> None:
    """ScreenConfig refuses wrong types by name, from the Python API as from the CLI (bool is not
    an int; an int is a float; numpy integers are ints)."""
    import numpy as np
    import pytest

    from cathode_ray.screen.pipeline import ScreenConfig

    base = {"library": "demo", "model": "m", "out": "o", "references": "mp"}
    for field, value, message in (
            ("validation", {"max_sites": 10}, "validation must be ValidationConfig, got dict"),
            ("gpu_actors", "2", "gpu_actors must be int, got str '2'"),
            ("gpu_actors", True, "gpu_actors must be int, got bool True"),
            ("demo_size", 3.0, "demo_size must be int, got float 3.0"),
            ("inference_threads", "4", "inference_threads must be int or None, got str"),
            ("resume", 1, "resume must be bool, got int 1"),
            ("library", 5, "library must be str, got int 5"),
            ("gpu_wait_s", False, "gpu_wait_s must be float, got bool False")):
        with pytest.raises(ValueError, match=f"^{message}"):
            ScreenConfig(**{**base, field: value})
    ok = ScreenConfig(**base, gpu_actors=np.int64(0), gpu_wait_s=5, object_store_mb=None)
    assert ok.gpu_wait_s == 5 and ok.object_store_mb is None
