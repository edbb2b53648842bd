"""``cathode-ray rescreen``: change detection, latest view, up-to-date / busy paths, and (slow) a
full A -> B re-screen against the local MP server with a real tiny CHGNet ensemble."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cathode_ray.screen import rescreen as rs
from cathode_ray.screen.rescreen import RescreenConfig, run
from cathode_ray.screen.schema import RESULT_SCHEMA
from cathode_ray.screen.state import RescreenBusy, StateLock, StateStore
from cathode_ray.testing.mp_server import MPServer

DB_A, DB_B = "2025.01.01", "2025.02.01"
N_NEW, N_CHANGED, N_WITHDRAWN = 10, 5, 3


# --------------------------------------------------------------------------- helpers
def _fake_model(root: Path) -> Path:
    """A model directory with a valid manifest (enough for model_id; not loadable)."""
    from cathode_ray.model.artifact import ModelDir

    model = ModelDir(uri=str(root / "model"))
    model.write_bytes("weights.bin", b"not really weights")
    model.write_manifest({"file_names": ["weights.bin"]})
    return root / "model"


def _result_rows(ids: list[str], run_id: str) -> pa.Table:
    n = len(ids)
    cols: dict[str, Any] = {}
    for f in RESULT_SCHEMA:
        if f.name == "structure_id":
            cols[f.name] = ids
        elif f.name == "run_id":
            cols[f.name] = [run_id] * n
        elif pa.types.is_floating(f.type):
            cols[f.name] = [0.01] * n
        elif pa.types.is_integer(f.type):
            cols[f.name] = [1] * n
        elif pa.types.is_boolean(f.type):
            cols[f.name] = [True] * n
        else:
            cols[f.name] = ["x"] * n
    return pa.Table.from_pydict(cols, schema=RESULT_SCHEMA)


def _perturb(doc: dict[str, Any], k: int) -> dict[str, Any]:
    """A changed version of ``doc``: energies shifted (even k) or the lattice strained (odd k)."""
    doc = copy.deepcopy(doc)
    if k % 2 == 0:
        doc["energy_per_atom"] = float(doc["energy_per_atom"]) + 0.01
        doc["energy_above_hull"] = float(doc.get("energy_above_hull") or 0.0) + 0.01
    else:
        matrix = doc["structure"]["lattice"]["matrix"]
        doc["structure"]["lattice"]["matrix"] = [[1.002 * x for x in row] for row in matrix]
    return doc


# --------------------------------------------------------------------------- unit
def test_config_validation(tmp_path: Path) -> None:
    cfg = RescreenConfig(source="mp", model="m", out=str(tmp_path))
    assert cfg.state_uri == f"{tmp_path}/_state" and cfg.references == "mp" and not cfg.force
    assert RescreenConfig(model="m", out="s3://b/p", state="s3://b/s").state_uri == "s3://b/s"
    with pytest.raises(ValueError, match="--source mp"):
        RescreenConfig(source="snapshot:x", model="m", out="o")
    with pytest.raises(ValueError, match="model"):
        RescreenConfig(model="", out="o")


def test_fingerprint_tracks_structure_and_energies(tiny_docs: list[dict[str, Any]]) -> None:
    doc = tiny_docs[0]
    base = rs.fingerprint(doc)
    assert rs.fingerprint(copy.deepcopy(doc)) == base
    assert rs.fingerprint(_perturb(doc, 0)) != base
    assert rs.fingerprint(_perturb(doc, 1)) != base
    assert rs.fingerprint({**doc, "formula_pretty": "whatever"}) == base  # not hashed
    assert rs.fingerprint({**doc, "energy_per_atom": doc["energy_per_atom"] + 1e-12}) == base


def test_plan_changes_and_run_id() -> None:
    previous = {"a": "1", "b": "2", "c": "3"}
    current = {"a": "1", "b": "X", "d": "4"}
    plan = rs.plan_changes(previous=previous, current=current, full=False)
    assert (plan.new, plan.changed, plan.unchanged, plan.withdrawn) == (
        ("d",), ("b",), ("a",), ("c",))
    assert plan.to_screen == ("b", "d")
    assert rs.plan_changes(previous=previous, current=current, full=True).to_screen == (
        "a", "b", "d")
    assert rs.run_id_for("2025.04.10", "f" * 64, 3) == "mp-2025.04.10-ffffffffffff-g3"
    assert rs.run_id_for("v 1/2", "abc", 1) == "mp-v_1_2-abc-g1"


def test_merge_latest_replaces_marks_withdrawn_and_is_idempotent() -> None:
    first = rs.merge_latest(None, _result_rows(["a", "b", "c"], "r1"), rescreened=["a", "b", "c"],
                            current=["a", "b", "c"], db_version="A")
    assert first.schema == rs.latest_schema() and first.num_rows == 3
    # B: b changed (re-screened), c withdrawn, d new, e new but rejected (no result row)
    results = _result_rows(["b", "d"], "r2")
    kw = {"rescreened": ["b", "d", "e"], "current": ["a", "b", "d", "e"], "db_version": "B"}
    second = rs.merge_latest(first, results, **kw)
    rows = {r["structure_id"]: r for r in second.to_pylist()}
    assert sorted(rows) == ["a", "b", "c", "d"]
    assert (rows["a"]["db_version"], rows["a"]["run_id"]) == ("A", "r1")
    assert (rows["b"]["db_version"], rows["b"]["run_id"]) == ("B", "r2")
    assert rows["c"]["withdrawn"] and rows["c"]["withdrawn_db_version"] == "B"
    assert rows["c"]["db_version"] == "A"
    assert not any(rows[k]["withdrawn"] for k in "abd")
    assert rs.merge_latest(second, results, **kw).equals(second)  # crash + redo: same view
    third = rs.merge_latest(second, _result_rows([], "r3"), rescreened=[],
                            current=["a", "b", "d", "e"], db_version="C")
    assert third.to_pylist()[2]["withdrawn_db_version"] == "B"  # first withdrawal kept


def test_up_to_date_reads_only_heartbeat(tmp_path: Path, mp_server: MPServer) -> None:
    model = _fake_model(tmp_path)
    out = str(tmp_path / "dest")
    mp_server.set_db_version(DB_A)
    StateStore(uri=f"{out}/_state").write(
        {"db_version": DB_A, "model_id": rs.model_id_of(str(model)), "fingerprints": {}})
    outcome = run(RescreenConfig(model=str(model), out=out))
    assert outcome.status == "up_to_date" and "up to date" in outcome.message
    assert outcome.screened == 0 and outcome.db_version == DB_A
    assert [r.path for r in mp_server.requests] == ["/heartbeat"]
    assert not Path(out, "_state", "LOCK").exists()


def test_concurrent_rescreen_is_refused(tmp_path: Path, mp_server: MPServer) -> None:
    model = _fake_model(tmp_path)
    out = str(tmp_path / "dest")
    mp_server.set_db_version(DB_B)
    with StateLock(uri=f"{out}/_state", ttl_s=600, heartbeat=False) as held:
        with pytest.raises(RescreenBusy, match=held.owner):
            run(RescreenConfig(model=str(model), out=out))
    assert not any(r.path.startswith("/materials") for r in mp_server.requests)


def test_expired_lock_does_not_block(tmp_path: Path, mp_server: MPServer) -> None:
    """A lock left by a dead run is taken over; here the run then finds nothing to screen."""
    model = _fake_model(tmp_path)
    out = str(tmp_path / "dest")
    mp_server.set_db_version(DB_B)
    mp_server.set_documents(summary_docs=[])
    dead = StateLock(uri=f"{out}/_state", ttl_s=0.01, heartbeat=False).acquire()
    time.sleep(0.05)  # expired
    outcome = run(RescreenConfig(model=str(model), out=out))
    assert outcome.status == "screened" and outcome.screened == 0
    assert StateStore(uri=f"{out}/_state").read()["db_version"] == DB_B
    assert dead.read() is None  # the new owner released its own lock


def test_staging_the_same_docs_again_keeps_the_file(tmp_path: Path,
                                                   tiny_docs: list[dict[str, Any]]) -> None:
    """The staged file's listing (size, mtime) is its screen's library fingerprint: rewriting
    it on every attempt made each resume look like a resume on another library."""
    uri = str(tmp_path / "_staging" / "db_version=A" / "r.jsonl")
    rs.stage_library(uri, tiny_docs)
    before = Path(uri).stat()
    fingerprint = rs.staged_fingerprint(uri)
    time.sleep(0.01)
    rs.stage_library(uri, copy.deepcopy(tiny_docs))
    after = Path(uri).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert rs.staged_fingerprint(uri) == fingerprint
    rs.stage_library(uri, [_perturb(tiny_docs[0], 0), *tiny_docs[1:]])
    assert rs.staged_fingerprint(uri) != fingerprint
    assert [json.loads(line)["energy_per_atom"] for line in Path(uri).read_text().splitlines()][0] \
        == _perturb(tiny_docs[0], 0)["energy_per_atom"]


def test_a_finished_screen_is_skipped_only_for_the_same_staged_library(
        tmp_path: Path, tiny_docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a complete manifest with as many inputs as docs was enough to skip the screen."""
    from cathode_ray.screen import runs

    out = str(tmp_path / "dest")
    cfg = RescreenConfig(model="m", out=out, references="snapshot:x")
    screened: list[str] = []

    class _Summary:
        n_results, n_rejects = len(tiny_docs), 0

    def fake_pipeline(config: RescreenConfig, library: str, run_id: str) -> _Summary:
        screened.append(library)
        runs.write_json(runs.RunPaths(dest=out, run_id=run_id).manifest, {
            "status": "complete", "n_inputs": len(tiny_docs), "n_results": len(tiny_docs),
            "n_rejects": 0, "library_fingerprint": rs.staged_fingerprint(library)})
        return _Summary()

    monkeypatch.setattr(rs, "_run_pipeline", fake_pipeline)
    assert rs._screen(cfg, "r1", "A", tiny_docs) == ({"results": len(tiny_docs), "rejects": 0},
                                                     False)
    assert rs._screen(cfg, "r1", "A", copy.deepcopy(tiny_docs))[1] is True  # skipped, resumed
    assert len(screened) == 1
    # same count, other content: screened again (the pipeline's resume then judges the library)
    rs._screen(cfg, "r1", "A", [_perturb(tiny_docs[0], 1), *tiny_docs[1:]])
    assert len(screened) == 2


def test_a_crashed_forced_rescreen_is_resumed_by_the_next_unforced_run(
        tmp_path: Path, tiny_docs: list[dict[str, Any]], mp_server: MPServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, the next run without --force said "up to date" and the forced run was lost."""
    from cathode_ray.screen import runs

    model = _fake_model(tmp_path)
    out = str(tmp_path / "dest")
    ids = [str(d["material_id"]) for d in tiny_docs]
    mp_server.set_documents(summary_docs=tiny_docs)
    mp_server.set_db_version(DB_A)
    screened: list[str] = []
    crash_next = {"on": False}

    class _Summary:
        n_results, n_rejects = len(ids), 0

    def fake_pipeline(config: RescreenConfig, library: str, run_id: str) -> _Summary:
        screened.append(run_id)
        if crash_next["on"]:
            crash_next["on"] = False
            raise RuntimeError("worker node lost mid-screen")
        paths = runs.RunPaths(dest=out, run_id=run_id)
        Path(paths.results).mkdir(parents=True, exist_ok=True)
        pq.write_table(_result_rows(ids, run_id), f"{paths.results}/part-0.parquet")
        runs.write_json(paths.manifest, {
            "status": "complete", "n_inputs": len(ids), "n_results": len(ids),
            "n_rejects": 0, "library_fingerprint": rs.staged_fingerprint(library)})
        return _Summary()

    monkeypatch.setattr(rs, "_run_pipeline", fake_pipeline)
    cfg = RescreenConfig(model=str(model), out=out, references="snapshot:x")
    first = run(cfg)
    assert first.status == "screened" and first.screened == len(ids)
    assert run(cfg).status == "up_to_date"

    # --force crashes inside the screen: the state stays at generation 1
    forced = RescreenConfig(model=str(model), out=out, references="snapshot:x", force=True)
    crash_next["on"] = True
    with pytest.raises(RuntimeError, match="worker node lost"):
        run(forced)
    store = StateStore(uri=f"{out}/_state")
    assert len(store.read()["history"]) == 1

    # the next run without --force finishes the forced run instead of "up to date"
    resumed = run(cfg)
    assert resumed.status == "screened" and resumed.screened == len(ids)
    assert resumed.run_id == rs.run_id_for(DB_A, first.model_id, 2) == screened[-1]
    entry = store.read()["history"][-1]
    assert entry["forced"] and entry["full"] and entry["run_id"] == resumed.run_id
    assert {r["run_id"] for r in _latest(out).values()} == {resumed.run_id}

    # a forced run that crashed after its screen, before the state write: skipped to the view
    with pytest.raises(rs.InjectedCrash):
        run(RescreenConfig(model=str(model), out=out, references="snapshot:x", force=True,
                           _crash_before_state_write=True))
    n_screens = len(screened)
    third = run(cfg)
    assert third.status == "screened" and third.resumed and len(screened) == n_screens
    assert len(store.read()["history"]) == 3 and store.read()["history"][-1]["forced"]
    assert run(cfg).status == "up_to_date"


# --------------------------------------------------------------------------- integration
def _latest(out: str) -> dict[str, dict[str, Any]]:
    table = pq.read_table(f"{out}/latest/latest.parquet")
    assert table.schema.remove_metadata() == rs.latest_schema()
    return {r["structure_id"]: r for r in table.to_pylist()}


@pytest.mark.slow
def test_rescreen_a_then_b_with_crash(local_ray, tiny_model, references, mp_server: MPServer,
                                      tmp_path: Path) -> None:
    from tests.screen.tiny_model import small_docs

    docs = small_docs(12 + N_NEW, max_sites=12)
    version_a = docs[:12]
    withdrawn = [d["material_id"] for d in version_a[:N_WITHDRAWN]]
    kept = version_a[N_WITHDRAWN:]
    changed = [_perturb(d, k) for k, d in enumerate(kept[:N_CHANGED])]
    version_b = changed + kept[N_CHANGED:] + docs[12:]
    out = str(tmp_path / "dest")
    # 0.5-CPU inference actor: read task (1) + graph actor (0.5) + inference (0.5) fit 2 CPUs
    cfg = {"model": str(tiny_model), "out": out, "references": references, "cpus_per_actor": 0.5}

    # version A: everything is screened
    mp_server.set_documents(summary_docs=version_a)
    mp_server.set_db_version(DB_A)
    first = run(RescreenConfig(**cfg))
    assert first.status == "screened" and first.screened == first.new == 12
    assert first.n_results + first.n_rejects == 12 and first.withdrawn == 0
    view = _latest(out)
    assert len(view) == first.n_results and {r["db_version"] for r in view.values()} == {DB_A}
    assert not any(r.path == "/materials/thermo" for r in mp_server.requests)  # no labels needed

    # unchanged: up to date, only the heartbeat is asked
    seen = len(mp_server.requests)
    again = run(RescreenConfig(**cfg))
    assert again.status == "up_to_date"
    assert [r.path for r in mp_server.requests[seen:]] == ["/heartbeat"]

    # version B, crash between the screen and the state write: the state stays at A
    mp_server.set_documents(summary_docs=version_b)
    mp_server.set_db_version(DB_B)
    with pytest.raises(rs.InjectedCrash):
        run(RescreenConfig(**cfg, _crash_before_state_write=True))
    store = StateStore(uri=f"{out}/_state")
    assert store.read()["db_version"] == DB_A and len(store.read()["history"]) == 1
    assert not Path(out, "_state", "LOCK").exists()

    # the next run completes B (resuming the finished screen) with exactly N + M screened
    second = run(RescreenConfig(**cfg))
    assert second.status == "screened" and second.resumed
    assert (second.new, second.changed, second.withdrawn) == (N_NEW, N_CHANGED, N_WITHDRAWN)
    assert second.screened == N_NEW + N_CHANGED
    assert second.n_results + second.n_rejects == N_NEW + N_CHANGED
    state = store.read()
    assert state["db_version"] == DB_B and len(state["history"]) == 2
    assert sorted(state["fingerprints"]) == sorted(d["material_id"] for d in version_b)
    view = _latest(out)
    rescreened = {d["material_id"] for d in changed + docs[12:]}
    for mid, row in view.items():
        if mid in withdrawn:
            assert row["withdrawn"] and row["withdrawn_db_version"] == DB_B
            assert row["db_version"] == DB_A
        else:
            assert not row["withdrawn"]
            assert row["db_version"] == (DB_B if mid in rescreened else DB_A)
            assert row["run_id"] == (second.run_id if mid in rescreened else first.run_id)
    ids1 = set(pq.read_table(f"{out}/results/run_id={first.run_id}")["structure_id"].to_pylist())
    ids2 = set(pq.read_table(f"{out}/results/run_id={second.run_id}")["structure_id"]
               .to_pylist())
    assert set(view) == (ids1 - rescreened) | ids2
    assert {m for m in withdrawn if m in view} == {m for m, r in view.items() if r["withdrawn"]}
    assert not Path(out, "_staging").exists() or not any(Path(out, "_staging").rglob("*.jsonl"))

    # and then it is up to date again
    assert run(RescreenConfig(**cfg)).status == "up_to_date"


@pytest.mark.slow
def test_rescreen_resumes_a_screen_that_died_before_its_manifest(
        local_ray, tiny_model, references, mp_server: MPServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen's start record holds the staged file's fingerprint; the next re-screen
    stages the same docs without touching the file, so its resume is accepted."""
    from cathode_ray.screen import pipeline
    from tests.screen.tiny_model import small_docs

    docs = small_docs(6, max_sites=12)
    out = str(tmp_path / "dest")
    cfg = {"model": str(tiny_model), "out": out, "references": references, "cpus_per_actor": 0.5}
    mp_server.set_documents(summary_docs=docs)
    mp_server.set_db_version(DB_A)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed before the manifest")

    real = pipeline._update_manifest
    monkeypatch.setattr(pipeline, "_update_manifest", crash)
    with pytest.raises(RuntimeError, match="killed before the manifest"):
        run(RescreenConfig(**cfg))
    monkeypatch.setattr(pipeline, "_update_manifest", real)  # undo() would drop mp_server's env
    assert StateStore(uri=f"{out}/_state").read() is None
    outcome = run(RescreenConfig(**cfg))
    assert outcome.status == "screened" and outcome.resumed
    assert outcome.n_results + outcome.n_rejects == 6
    from cathode_ray.screen import runs

    manifest = runs.read_json(runs.RunPaths(dest=out, run_id=outcome.run_id).manifest)
    assert manifest["status"] == "complete" and manifest["attempts"][-1]["n_skipped"] == 6
