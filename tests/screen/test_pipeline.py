"""Integration: real Ray Data pipeline with a small trained CHGNet ensemble (slow)."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cathode_ray.screen import runs
from cathode_ray.screen.pipeline import (
    NoGPUError,
    ScreenConfig,
    check_cpu_actors_fit,
    run,
    wait_for_gpus,
)
from cathode_ray.screen.schema import RESULT_SCHEMA, SCREEN_REJECT_SCHEMA
from cathode_ray.storage import filesystem_for
from tests.screen.tiny_model import small_docs

pytestmark = pytest.mark.slow


def _read(uri: str):
    fs, path = filesystem_for(uri)
    return pq.read_table(path, filesystem=fs, partitioning=None)


def _config(model: Path, references: str, **kw) -> ScreenConfig:
    return ScreenConfig(model=str(model), references=references, min_rows_per_file=1000,
                        verbose=False, **kw)


def test_demo_library_to_s3(s3_server, local_ray, tiny_model, references) -> None:
    out = "s3://screen/prefix"
    summary = run(_config(tiny_model, references, library="demo", demo_size=24, out=out,
                          run_id="demo1", inference_batch_rows=8, inference_calls_per_actor=2))
    paths = runs.RunPaths(dest=out, run_id="demo1")
    results = _read(paths.results)
    assert results.schema.remove_metadata() == RESULT_SCHEMA
    rejects = _read(paths.rejects) if summary.n_rejects else None
    assert results.num_rows + (rejects.num_rows if rejects is not None else 0) == 24
    assert summary.n_inputs == 24 and summary.n_results == results.num_rows
    assert len(set(results.column("structure_id").to_pylist())) == results.num_rows
    assert set(results.column("run_id").to_pylist()) == {"demo1"}
    assert set(results.column("decision").to_pylist()) <= {"KEEP", "MAYBE", "KILL"}
    manifest = runs.read_json(paths.manifest)
    assert manifest["status"] == "complete" and manifest["n_inputs"] == 24
    assert manifest["invariant"]["results_plus_rejects_equals_inputs"]
    assert manifest["model_id"] and "ray" in manifest["versions"]
    # a Ray this process started (with 2 CPUs): the CPU inference actor gets its cores
    assert manifest["attempts"][-1]["inference_threads"] == min(len(os.sched_getaffinity(0)), 2)
    assert runs.read_json(paths.lock) is None  # released
    with pytest.raises(FileExistsError):  # same run id without --resume is refused
        run(_config(tiny_model, references, library="demo", demo_size=24, out=out,
                    run_id="demo1"))
    # rows of another model under this run id: resuming with this model would mix the two
    import pyarrow as pa
    import pyarrow.fs as pafs

    fs, path = filesystem_for(paths.results)
    first = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)))[0]
    table = pq.read_table(first, filesystem=fs)
    pq.write_table(table.set_column(table.schema.get_field_index("model_id"), "model_id",
                                    pa.array(["other-model"] * table.num_rows)), first, filesystem=fs)
    with pytest.raises(ValueError, match="another model"):
        run(_config(tiny_model, references, library="demo", demo_size=24, out=out,
                    run_id="demo1", resume=True))


def test_gpu_actors_on_a_cluster_without_gpus_fail_clearly_instead_of_waiting(
        local_ray, tiny_model, references, tmp_path) -> None:
    """Before, Ray Data waited forever for a GPU actor that no node could host."""
    import time

    wait_for_gpus(0, 0.0)  # nothing asked: returns at once
    with pytest.raises(NoGPUError, match=r"1 GPU inference actor\(s\) but the Ray cluster has 0 GPU\(s\)\. Run"):
        wait_for_gpus(1, 0.0)
    # on a cluster: ask the autoscaler, wait, then give up
    with pytest.raises(NoGPUError, match=r"has 0 GPU\(s\) after 1 s\. Run without --gpu-actors"):
        wait_for_gpus(1, 1.0)
    # the Ray this process started (as in a notebook) cannot gain GPUs: no wait at all, whatever
    # gpu_wait_s says (before, this waited the full gpu_wait_s)
    t0 = time.monotonic()
    with pytest.raises(NoGPUError, match=r"has 0 GPU\(s\)\. Run without --gpu-actors"):
        run(_config(tiny_model, references, library="demo", demo_size=8, out=str(tmp_path / "dest"),
                    run_id="nogpu", gpu_actors=1, gpu_wait_s=600.0))
    assert time.monotonic() - t0 < 60
    paths = runs.RunPaths(dest=str(tmp_path / "dest"), run_id="nogpu")
    assert runs.read_json(paths.lock) is None and not Path(paths.results).exists()
    # the same run then goes ahead on CPU actors
    summary = run(_config(tiny_model, references, library="demo", demo_size=8,
                          out=str(tmp_path / "dest"), run_id="nogpu"))
    assert summary.n_results + summary.n_rejects == 8


def test_cpu_actors_larger_than_every_node_fail_clearly_instead_of_waiting(
        local_ray, tiny_model, references, tmp_path, caplog) -> None:
    """Before, a screen with cpus_per_actor=3 on a 2-CPU local Ray waited forever ("pending: 3
    CPU"). Now it fails before any row is written; on a cluster it warns and waits for the
    autoscaler."""
    check_cpu_actors_fit(2.0, local=True)  # fits the 2-CPU node
    with pytest.raises(ValueError, match=r"cpus_per_actor=3 CPUs but the largest node of this Ray has 2"):
        run(_config(tiny_model, references, library="demo", demo_size=8, out=str(tmp_path / "dest"),
                    run_id="big", cpus_per_actor=3.0))
    paths = runs.RunPaths(dest=str(tmp_path / "dest"), run_id="big")
    assert runs.read_json(paths.lock) is None and not Path(paths.results).exists()
    with caplog.at_level("WARNING", logger="cathode_ray.screen.pipeline"):
        check_cpu_actors_fit(4.0, local=False)
    assert "until the autoscaler adds a node that large" in caplog.text


def test_an_address_given_to_a_connected_process_is_named_as_ignored(local_ray, caplog) -> None:
    from cathode_ray.screen.pipeline import _ensure_ray

    with caplog.at_level("WARNING", logger="cathode_ray.screen.pipeline"):
        assert _ensure_ray(None) == "connected" and not caplog.text
        assert _ensure_ray("ray://head.example:10001") == "connected"
    assert "ignores address='ray://head.example:10001'" in caplog.text and "ray.shutdown()" in caplog.text


def test_cli_screen_sizes_the_cpu_stages_and_compiles_the_model(local_ray, tiny_model, references, tmp_path) -> None:
    from typer.testing import CliRunner

    from cathode_ray.cli import app

    res = CliRunner().invoke(app, [
        "screen", "--library", "demo", "--demo-size", "8", "--model", str(tiny_model),
        "--out", str(tmp_path / "dest"), "--references", references, "--run-id", "cli1",
        "--graph-actors", "2", "--light-tasks", "1", "--compile-model", "--inference-threads", "1"])
    assert res.exit_code == 0, res.output
    assert "run cli1: 8 inputs -> 8 results" in res.output
    assert f"read_results({str(tmp_path / 'dest')!r}, 'cli1').to_pandas()" in res.output
    assert runs.read_results(str(tmp_path / "dest"), "cli1").num_rows == 8
    attempt = runs.read_json(runs.RunPaths(dest=str(tmp_path / "dest"), run_id="cli1").manifest)[
        "attempts"][-1]
    assert (attempt["config"]["graph_actors"], attempt["config"]["light_tasks"]) == (2, 1)
    assert attempt["config"]["compile_model"] is True
    assert attempt["inference_threads"] == 1


def _bad_library(root: Path) -> Path:
    """Good jsonl (12 docs), a malformed CIF, a no-Li structure, a duplicate id, a bad gz."""
    lib = root / "lib"
    lib.mkdir(parents=True)
    docs = small_docs(12)
    (lib / "a_good.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (lib / "b_dup.json").write_text(json.dumps([docs[0], docs[1]]))  # 2 duplicate ids
    (lib / "c_broken.cif").write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\nnonsense")
    no_li = dict(docs[2], material_id="no-li")
    no_li["structure"] = {**docs[2]["structure"], "sites": [
        s for s in docs[2]["structure"]["sites"] if s["species"][0]["element"] != "Li"]}
    (lib / "d_noli.json").write_text(json.dumps(no_li))
    (lib / "e_trunc.jsonl.gz").write_bytes(gzip.compress(b'{"material_id": "x"}\n' * 50)[:30])
    return lib


def test_bad_files_keep_invariant_and_resume(local_ray, tiny_model, references,
                                              tmp_path, monkeypatch) -> None:
    from cathode_ray.screen import stages

    lib = _bad_library(tmp_path)
    out = str(tmp_path / "dest")
    # interrupted run: it dies after its first 4-row file pair (a resume must be given the
    # library its run started with, so the interruption is a crash, not a smaller library)
    real_flush = stages.ScreenWriter.flush

    def flush_then_die(self: stages.ScreenWriter) -> None:
        real_flush(self)
        if self.files:
            raise RuntimeError("killed after the first file pair")

    monkeypatch.setattr(stages.ScreenWriter, "flush", flush_then_die)
    with pytest.raises(RuntimeError, match="killed after the first file pair"):
        run(replace(_config(tiny_model, references, library=str(lib), out=out, run_id="r1"),
                    min_rows_per_file=4))
    monkeypatch.setattr(stages.ScreenWriter, "flush", real_flush)
    done = runs.read_results(out, "r1").num_rows + runs.read_rejects(out, "r1").num_rows
    assert 0 < done < 17
    full = run(_config(tiny_model, references, library=str(lib), out=out, run_id="r1",
                       resume=True))
    assert full.n_skipped == done
    paths = runs.RunPaths(dest=out, run_id="r1")
    res, rej = _read(paths.results), _read(paths.rejects)
    assert rej.schema.remove_metadata() == SCREEN_REJECT_SCHEMA
    assert res.num_rows + rej.num_rows == full.n_inputs == 12 + 2 + 1 + 1 + 1
    reasons = rej.column("reason").to_pylist()
    assert reasons.count("duplicate_id") == 2
    assert {"unparseable", "out_of_scope", "unreadable_file"} <= set(reasons)
    ids = res.column("structure_id").to_pylist()
    assert len(ids) == len(set(ids))
    # an uninterrupted run into another run id gives the same rows
    fresh = run(_config(tiny_model, references, library=str(lib), out=out, run_id="r2"))
    res2 = _read(runs.RunPaths(dest=out, run_id="r2").results)
    assert sorted(res2.column("structure_id").to_pylist()) == sorted(ids)
    assert fresh.reject_reasons == full.reject_reasons
    manifest = runs.read_json(paths.manifest)  # the crashed attempt recorded no entry
    assert len(manifest["attempts"]) == 1 and manifest["status"] == "complete"
    assert manifest["attempts"][0]["n_skipped"] == done
    # the run started with the crashed attempt, whose start RUN.start kept
    assert manifest["started"] == runs.read_json(paths.start)["started"]
    assert manifest["started"] < manifest["attempts"][0]["started"]


def test_the_dataset_keeps_its_settings_and_pickles_object_columns_quietly(
        local_ray, tiny_model, references, tmp_path) -> None:
    """Structure and graph columns are Python objects on purpose; without the explicit setting,
    Ray Data logged "Failed to convert column 'structure' into pyarrow array" on every screen."""
    import ray

    from cathode_ray.screen.pipeline import InputIndex, build_dataset, plan_source

    config = _config(tiny_model, references, library="demo", demo_size=4, out=str(tmp_path / "d"),
                     object_store_mb=64)
    ds = build_dataset(config, plan_source(config), run_id="r",
                       index=InputIndex(n_inputs=4, ranks={}, rows_per_file={}), done=frozenset())
    assert ds.context.enable_fallback_to_arrow_object_ext_type is True
    assert ds.context.execution_options.resource_limits.object_store_memory == 64e6
    # the process-wide context is untouched: other datasets of a notebook keep Ray's defaults
    assert ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type is None


def test_a_library_rewritten_during_the_screen_is_named_as_the_cause(
        local_ray, tiny_model, references, tmp_path, monkeypatch) -> None:
    """A file cut between the index pass and the read breaks results + rejects = inputs; the
    error now says that the library changed, not only that the counts differ."""
    from cathode_ray.screen import pipeline
    from cathode_ray.screen.pipeline import ScreenInvariantError

    lib = tmp_path / "lib"
    lib.mkdir()
    docs = small_docs(6)
    for name, part in (("a.jsonl", docs[:3]), ("b.jsonl", docs[3:])):
        (lib / name).write_text("\n".join(json.dumps(d) for d in part) + "\n")
    real_index = pipeline.index_inputs

    def index_then_cut(source):  # a generator rewriting its shard while the screen runs
        index = real_index(source)
        (lib / "b.jsonl").write_text(json.dumps(docs[3]) + "\n")
        return index

    monkeypatch.setattr(pipeline, "index_inputs", index_then_cut)
    with pytest.raises(ScreenInvariantError, match=r"4 results \+ 0 rejects != 6 inputs.*"
                                                   r"The library changed while it was screened"):
        run(_config(tiny_model, references, library=str(lib), out=str(tmp_path / "d"),
                    run_id="moving"))
    monkeypatch.setattr(pipeline, "index_inputs", real_index)
    summary = run(_config(tiny_model, references, library=str(lib), out=str(tmp_path / "d"),
                          run_id="still"))  # the same library, left alone: no error
    assert summary.n_inputs == 4 and summary.n_results + summary.n_rejects == 4


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def _snapshot(out: str, run_id: str) -> dict[str, bytes]:
    """Every file of the run under DEST (results, rejects, manifest, start record), by bytes."""
    paths = runs.RunPaths(dest=out, run_id=run_id)
    found = [p for d in (paths.results, paths.rejects) for p in Path(d).rglob("*") if p.is_file()]
    return {str(p): p.read_bytes() for p in [*found, Path(paths.manifest), Path(paths.start)]}


def test_a_resume_on_an_edited_library_is_refused_before_anything_is_written(
        local_ray, tiny_model, references, tmp_path) -> None:
    """Before, a resume skipped the edited ids as done (stale rows, status complete), or wrote a
    new id into the run and failed its invariant only afterwards (5 rows for 4 inputs)."""
    from cathode_ray.screen.pipeline import LibraryChangedError

    docs = small_docs(6)
    lib, out = tmp_path / "lib.jsonl", str(tmp_path / "dest")
    _write_jsonl(lib, docs[:4])
    first = run(_config(tiny_model, references, library=str(lib), out=out, run_id="r1"))
    assert first.n_results + first.n_rejects == 4
    # the library left alone: the resume goes ahead (nothing left to do)
    again = run(_config(tiny_model, references, library=str(lib), out=out, run_id="r1",
                        resume=True))
    assert again.n_skipped == 4 and again.n_results + again.n_rejects == 4
    manifest = runs.read_json(runs.RunPaths(dest=out, run_id="r1").manifest)
    assert manifest["status"] == "complete" and len(manifest["attempts"]) == 2
    before = _snapshot(out, "r1")
    edits = {  # same ids, another structure for the first / one id out, another in
        "edited": [{**docs[4], "material_id": docs[0]["material_id"]}, *docs[1:4]],
        "swapped": [*docs[:3], docs[4]],
    }
    for name, edited in edits.items():
        _write_jsonl(lib, edited)
        with pytest.raises(LibraryChangedError,
                           match=r"run 'r1' was started on another library.*original library, "
                                 r"or screen this one under a new --run-id"):
            run(_config(tiny_model, references, library=str(lib), out=out, run_id="r1",
                        resume=True))
        assert _snapshot(out, "r1") == before, name  # nothing written, manifest untouched
    assert runs.read_json(runs.RunPaths(dest=out, run_id="r1").lock) is None


def test_the_library_fingerprint_is_recorded_before_the_first_row(
        local_ray, tiny_model, references, tmp_path, monkeypatch) -> None:
    """A run that dies before its manifest is written still names its library: its start
    record holds the fingerprint, and a resume on an edited library is refused."""
    from cathode_ray.screen import pipeline
    from cathode_ray.screen.pipeline import LibraryChangedError

    docs = small_docs(5)
    lib, out = tmp_path / "lib.jsonl", str(tmp_path / "dest")
    _write_jsonl(lib, docs[:4])

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(pipeline, "_update_manifest", crash)
    with pytest.raises(RuntimeError, match="killed before the manifest"):
        run(_config(tiny_model, references, library=str(lib), out=out, run_id="r1"))
    monkeypatch.undo()
    paths = runs.RunPaths(dest=out, run_id="r1")
    assert runs.read_json(paths.manifest) is None  # a manifest still means a finished attempt
    start = runs.read_json(paths.start)
    assert start["library"] == str(lib) and start["library_fingerprint"] == pipeline.plan_source(
        _config(tiny_model, references, library=str(lib), out=out)).fingerprint
    assert start["model"]["manifest_sha256"]
    written = runs.read_results(out, "r1").num_rows + runs.read_rejects(out, "r1").num_rows
    assert written == 4
    _write_jsonl(lib, [*docs[:3], docs[4]])
    with pytest.raises(LibraryChangedError, match="another library"):
        run(_config(tiny_model, references, library=str(lib), out=out, run_id="r1", resume=True))
    assert runs.read_json(paths.start) == start and runs.read_json(paths.manifest) is None
    assert runs.read_results(out, "r1").num_rows + runs.read_rejects(out, "r1").num_rows == 4
