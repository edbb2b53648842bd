"""Item 3: security. Tampered model artifacts, torch.load discipline, secrets never written,
untrusted structure files parsed and never executed or unpickled.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cathode_ray.data.library import read_library_file
from cathode_ray.data.validate import ValidationConfig, validate_row
from cathode_ray.model.artifact import ArtifactIntegrityError
from cathode_ray.model.ensemble import Ensemble
from cathode_ray.screen.pipeline import ScreenConfig, ScreenSummary, run
from tests.data.badfiles import licoo2
from tests.reliability.helpers import (
    REPO,
    MotoServer,
    all_files,
    aws_env,
    local_ray,
    ray_session_dir,
    run_output,
    write_good_library,
)

#: Recognisable secret values that must never be written anywhere.
SECRET_KEY_ID = "AKIACATHODERAYLEAK01"
SECRET_ACCESS_KEY = "cathodeRaySecretAccessKeyDoNotLeak0123456"
SECRET_MP_KEY = "cathoderaympkeydonotleak00000000"  # 32 characters, like a real MP key
SECRETS = (SECRET_KEY_ID, SECRET_ACCESS_KEY, SECRET_MP_KEY)
BUCKET = "secrets"


# --------------------------------------------------------------------------- (b) torch.load
def _torch_load_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"):
            yield node


def test_every_torch_load_is_weights_only() -> None:
    """Every ``torch.load`` in cathode_ray/ passes ``weights_only=True`` explicitly, except the
    documented MACE ``.model`` load, which must hash the file first and say it is trusted."""
    found, allowed = 0, []
    for path in sorted((REPO / "cathode_ray").rglob("*.py")):
        source = path.read_text()
        assert "from torch import load" not in source, f"{path}: import torch.load by name"
        lines = source.splitlines()
        for call in _torch_load_calls(ast.parse(source)):
            found += 1
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            kw = {k.arg: k.value for k in call.keywords}
            value = kw.get("weights_only")
            assert isinstance(value, ast.Constant), f"{where}: weights_only not given explicitly"
            if value.value is True:
                continue
            assert path.name == "mace.py" and path.parent.name == "backbones", (
                f"{where}: torch.load(weights_only={value.value}) outside the MACE backbone")
            allowed.append(where)
            comment = " ".join(lines[max(0, call.lineno - 4):call.lineno]).lower()
            assert "#" in comment and "trusted" in comment, (
                f"{where}: the full-pickle load needs a comment right above it saying that only "
                "trusted model files are loaded (and that their sha256 is computed first)")
            before = "\n".join(lines[:call.lineno - 1])
            func_start = before.rfind("\ndef ")
            assert "sha256" in before[func_start:], (
                f"{where}: the file's sha256 must be computed before torch.load")
    assert found >= 3 and len(allowed) == 1, (found, allowed)


# --------------------------------------------------------------------------- (a) tampering
def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("member", ["member_0.pt", "conformal_params.json", "manifest-table"])
def test_tampered_model_is_refused_before_loading(model: str, references: str, tmp_path: Path,
                                                  member: str) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    if member == "manifest-table":  # re-hash a changed member in the manifest: model_id breaks
        _flip_byte(copy / "member_1.pt")
        manifest = json.loads((copy / "manifest.json").read_text())
        import hashlib

        manifest["files"]["member_1.pt"]["sha256"] = hashlib.sha256(
            (copy / "member_1.pt").read_bytes()).hexdigest()
        (copy / "manifest.json").write_text(json.dumps(manifest))
        expected = "does not match model_id"
    else:
        _flip_byte(copy / member)
        expected = f"{member}: sha256/size does not match the manifest"
    with pytest.raises(ArtifactIntegrityError, match=expected):
        Ensemble.load(str(copy))
    lib = tmp_path / "lib"
    write_good_library(lib, n=2, files=1)
    dest = tmp_path / "dest"
    with pytest.raises(ArtifactIntegrityError, match=expected) as info:
        run(ScreenConfig(library=str(lib), model=str(copy), out=str(dest), references=references,
                         run_id="tampered", verbose=False))
    assert "refusing to load" in str(info.value) or "model_id" in str(info.value)
    written = [p for p in all_files(dest)] if dest.exists() else []
    assert written == [], f"a refused run wrote {written}"


# --------------------------------------------------------------------------- (c) + (d) one screen
@dataclass(frozen=True)
class SecureRun:
    """The screen of a library with untrusted files to a moto S3 DEST, under secret env values."""

    summary: ScreenSummary
    out: str
    moto: MotoServer
    logs: str
    ray_logs: Path | None
    markers: tuple[Path, ...]
    untrusted: dict[str, tuple[str, ...]]


class _Boom:
    """Pickled with protocol 0/5: unpickling would run ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _write_untrusted(lib: Path, tmp: Path) -> tuple[dict[str, tuple[str, ...]], tuple[Path, ...],
                                                     Path]:
    """Untrusted files -> {name: accepted reject codes}, marker files, dir of the probe module."""
    markers = tuple(tmp / f"executed-{k}" for k in ("pickle", "import", "from_dict", "system"))
    probe_dir = tmp / "probe"
    probe_dir.mkdir()
    module = f"cathode_ray_probe_{uuid.uuid4().hex[:8]}"
    (probe_dir / f"{module}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(markers[1])!r}).touch()  # importing this module is code execution\n\n\n"
        "class Boom:\n"
        "    @classmethod\n"
        "    def from_dict(cls, d):\n"
        f"        Path({str(markers[2])!r}).touch()\n"
        "        return None\n")
    untrusted: dict[str, tuple[str, ...]] = {}
    (lib / "pickle_text.json").write_bytes(pickle.dumps(_Boom(markers[0]), protocol=0))
    untrusted["pickle_text.json"] = ("unparseable", "unreadable_file")
    (lib / "pickle_binary.json").write_bytes(pickle.dumps(_Boom(markers[0]), protocol=5))
    untrusted["pickle_binary.json"] = ("unparseable", "unreadable_file")
    (lib / "monty_os_system.json").write_text(json.dumps(
        {"@module": "os", "@class": "system", "command": f"touch {markers[3]}"}))
    untrusted["monty_os_system.json"] = ("unparseable",)
    (lib / "monty_callable.json").write_text(json.dumps(
        {"structure": {"@module": "os", "@callable": "system", "command": f"touch {markers[3]}"}}))
    untrusted["monty_callable.json"] = ("unparseable",)
    s = licoo2().as_dict()  # a valid structure whose site property is a Python object
    s["sites"][0]["properties"] = {"payload": {"@module": module, "@class": "Boom"}}
    (lib / "monty_site_property.json").write_text(json.dumps(s))
    untrusted["monty_site_property.json"] = ("unparseable",)
    # ASE's legacy pickle trajectory format, and a pickle named as an ASE database: ASE's ULM and
    # SQLite readers refuse both, neither unpickles
    (lib / "legacy.traj").write_bytes(b"PickleTrajectory" + pickle.dumps(_Boom(markers[0])))
    untrusted["legacy.traj"] = ("unreadable_file",)
    (lib / "pickle.db").write_bytes(pickle.dumps(_Boom(markers[0])))
    untrusted["pickle.db"] = ("unreadable_file",)
    # vasprun.xml: an entity-expansion bomb ("billion laughs", ~10 GB expanded) and an external
    # entity that would read a local file; expat refuses both before anything is expanded or read
    laughs = "".join(f' <!ENTITY l{i} "' + f"&l{i - 1};" * 10 + '">\n' for i in range(1, 10))
    (lib / "vasprun.xml").write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE m [\n <!ENTITY l0 "{"ha" * 50}">\n{laughs}]>\n'
        '<modeling><incar><i name="SYSTEM" type="string">&l9;</i></incar></modeling>\n')
    untrusted["vasprun.xml"] = ("unreadable_file",)
    probe_file = probe_dir / f"{module}.py"
    (lib / "vasprun.xml.xxe").write_text(
        f'<?xml version="1.0"?>\n<!DOCTYPE m [<!ENTITY x SYSTEM "file://{probe_file}">]>\n'
        '<modeling><incar><i name="SYSTEM" type="string">&x;</i></incar></modeling>\n')
    untrusted["vasprun.xml.xxe"] = ("unreadable_file",)
    (lib / "payload.pkl").write_bytes(pickle.dumps(_Boom(markers[0])))  # not a library format
    return untrusted, markers, probe_dir


@pytest.fixture(scope="module")
def secure_run(references: str, model: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRun]:
    tmp = tmp_path_factory.mktemp("security")
    lib = tmp / "lib"
    write_good_library(lib, n=3, files=1)
    untrusted, markers, probe_dir = _write_untrusted(lib, tmp)
    moto = MotoServer().start()
    saved_mp = os.environ.get("MP_API_KEY")
    os.environ["MP_API_KEY"] = SECRET_MP_KEY
    handler = logging.StreamHandler(log_buffer := io.StringIO())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # what `cathode-ray screen` configures (cli._setup_logging)
    try:
        moto.create_bucket(BUCKET)
        with aws_env(moto.url, SECRET_KEY_ID, SECRET_ACCESS_KEY), \
                local_ray(extra_pythonpath=(str(probe_dir),)):
            out = f"s3://{BUCKET}/screen"
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                summary = run(ScreenConfig(library=str(lib), model=model, out=out,
                                           references=references, run_id="secure",
                                           min_rows_per_file=8, verbose=True))
            ray_logs = ray_session_dir()
            # copy Ray's logs before the session ends (they are part of what the run wrote)
            kept = None
            if ray_logs is not None and (ray_logs / "logs").is_dir():
                kept = tmp / "ray_logs"
                shutil.copytree(ray_logs / "logs", kept, ignore_dangling_symlinks=True,
                                dirs_exist_ok=True)
        yield SecureRun(summary=summary, out=out, moto=moto,
                        logs=buf.getvalue() + log_buffer.getvalue(), ray_logs=kept,
                        markers=markers, untrusted=untrusted)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        if saved_mp is None:
            os.environ.pop("MP_API_KEY", None)
        else:
            os.environ["MP_API_KEY"] = saved_mp
        moto.stop()


def _leaks(blob: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in blob]


@pytest.mark.slow
def test_secrets_never_written_by_a_screen(secure_run: SecureRun) -> None:
    keys = secure_run.moto.keys(BUCKET)
    assert any("/results/" in k for k in keys) and any(k.endswith("secure.json") for k in keys)
    client = secure_run.moto.client()
    for key in keys:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert not _leaks(body), f"s3://{BUCKET}/{key} contains {_leaks(body)}"
    assert not _leaks(secure_run.logs.encode()), "captured driver output/logs contain a secret"
    scanned = 0
    for path in all_files(secure_run.ray_logs) if secure_run.ray_logs else []:
        scanned += 1
        assert not _leaks(path.read_bytes()), f"Ray log {path} contains {_leaks(path.read_bytes())}"
    assert secure_run.ray_logs is None or scanned > 0


@pytest.mark.slow
def test_secrets_never_written_by_ingest(tmp_path: Path, mp_server: object, tiny_docs: list[dict],
                                         monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    from cathode_ray.data.dataset import IngestConfig
    from cathode_ray.data.dataset import run as ingest
    from cathode_ray.data.splits import SoapConfig
    from cathode_ray.testing.mp_server import thermo_docs_from_summary

    mp_server.set_documents(tiny_docs, thermo_docs_from_summary(tiny_docs))  # type: ignore[attr-defined]
    monkeypatch.setenv("MP_API_KEY", SECRET_MP_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    caplog.set_level(logging.INFO)
    out = tmp_path / "dataset"
    result = ingest(IngestConfig(source="mp", out=str(out), verbose=True,
                                 soap=SoapConfig(n_clusters=3, n_max=2, l_max=2)))
    assert result.n_rows > 0 and (out / "DATA_VERSION.json").is_file()
    files = list(all_files(out))
    for path in files:
        assert not _leaks(path.read_bytes()), f"{path} contains {_leaks(path.read_bytes())}"
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text
    assert not _leaks(text.encode()), "ingest output/logs contain a secret"


@pytest.mark.slow
def test_untrusted_files_are_parsed_never_executed(secure_run: SecureRun) -> None:
    with aws_env(secure_run.moto.url):
        results, rejects = run_output(secure_run.out, "secure")
    by_file = {Path(r["source"]).name: r for r in rejects}
    executed = [m.name for m in secure_run.markers if m.exists()]
    problems = []
    for name, codes in secure_run.untrusted.items():
        row = by_file.get(name)
        if row is None:
            problems.append(f"{name}: not rejected (became a result)")
        elif row["reason"] not in codes:
            problems.append(f"{name}: {row['reason']} not in {codes} ({row['message']})")
    assert not executed and not problems, (
        f"code executed by parsing untrusted input: {executed}; {problems}")
    assert "payload.pkl" not in by_file and len(results) == 3  # .pkl is not a library format
    assert secure_run.summary.n_inputs == 3 + len(secure_run.untrusted)


def test_explicit_pickle_file_is_an_unreadable_reject(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    pkl = tmp_path / "structures.pkl"
    pkl.write_bytes(pickle.dumps(_Boom(marker)))
    (raw,) = read_library_file(str(pkl))
    good, bad = validate_row(raw, ValidationConfig())
    assert good is None and bad is not None and bad["reason"] == "unreadable_file"
    assert "unsupported file type" in bad["message"]
    assert not marker.exists()
