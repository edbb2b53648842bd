"""Unit tests: edge-budget batching, duplicate ranking, schema enforcement, locks, run paths."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cathode_ray import seedcard
from cathode_ray.data.validate import ValidationConfig
from cathode_ray.screen import runs
from cathode_ray.screen.pipeline import ScreenConfig
from cathode_ray.screen.schema import RESULT_SCHEMA, SCREEN_REJECT_SCHEMA, SchemaError, conform
from cathode_ray.screen.stages import (
    ScreenWriter,
    ValidateStage,
    count_edges,
    count_rows_per_file,
    demo_raw_rows,
    duplicate_ranks,
    edge_batches,
    iter_file_rows,
    order_key,
    read_file_chunks,
    read_file_ids,
    read_items,
    split_output,
)
from cathode_ray.testing.compilers import cxx_compiler_available


def test_edge_batches_respect_budget_and_order() -> None:
    edges = [10, 20, 30, 5, 100, 1, 1]
    batches = edge_batches(edges, 40)
    assert [i for b in batches for i in b] == list(range(len(edges)))
    for b in batches:
        assert sum(edges[i] for i in b) <= 40 or len(b) == 1  # oversized alone
    assert [4] in batches
    assert edge_batches([], 10) == []
    with pytest.raises(ValueError):
        edge_batches([1], 0)


def test_duplicate_ranks_first_occurrence_wins() -> None:
    sids = ["a", "b", "a", "a"]
    orders = [order_key(1, 0), order_key(0, 3), order_key(0, 1), order_key(2, 0)]
    ranks = duplicate_ranks(sids, orders)
    # "a" occurs at (0,1) first -> k=0 (not listed), then (1,0) -> 1, then (2,0) -> 2
    assert ranks == {order_key(1, 0): 1, order_key(2, 0): 2}


def test_count_edges_chgnet_and_pyg_shapes() -> None:
    import torch

    class G:
        atom_graph = torch.zeros((17, 2))

    class P:
        edge_index = torch.zeros((2, 9))

    assert count_edges(G()) == 17
    assert count_edges(P()) == 9


def test_validate_stage_marks_duplicates_and_skips_done() -> None:
    from cathode_ray.data.demo import demo_library

    raw = demo_raw_rows(demo_library(3))
    raw.append({**raw[0], "order": order_key(0, 3)})  # duplicate id
    raw.append({"structure_id": "bad", "source": "x", "fmt": "cif", "payload": "junk",
                "error": "", "order": order_key(0, 4)})
    ranks = duplicate_ranks([r["structure_id"] for r in raw], [r["order"] for r in raw])
    stage = ValidateStage(config=ValidationConfig(), ranks=ranks,
                          done=frozenset({(raw[1]["structure_id"], 0)}))
    out = stage(pd.DataFrame(raw))
    assert len(out) == 4  # one skipped as done
    by_id = out.groupby("kind").size().to_dict()
    assert by_id == {"valid": 2, "reject": 2}
    assert set(out.loc[out.kind == "reject", "reason"]) == {"duplicate_id", "unparseable"}
    assert out.loc[out.reason == "duplicate_id", "occurrence"].tolist() == [1]


def test_validate_then_graph_stage_on_raw_rows(tiny_model, references: str) -> None:
    """Raw rows in; valid rows cross to the graph stage as compact arrays (pickled, as Ray moves
    blocks) and come out with graphs and hull inputs, rejects keep their reasons, every input is
    accounted for, and no structure column is left in the block."""
    import pickle

    from cathode_ray.data.demo import demo_library
    from cathode_ray.screen.stages import GraphStage

    raw = demo_raw_rows(demo_library(4))
    raw.append({**raw[0], "order": order_key(0, 4)})  # duplicate id
    raw.append({"structure_id": "bad", "source": "x", "fmt": "pymatgen_json", "payload": "{}",
                "error": "", "order": order_key(0, 5)})
    ranks = duplicate_ranks([r["structure_id"] for r in raw], [r["order"] for r in raw])
    validated = ValidateStage(config=ValidationConfig(), ranks=ranks)(pd.DataFrame(raw))
    out = GraphStage(model=str(tiny_model), references=references)(pickle.loads(pickle.dumps(validated)))
    assert len(out) == len(raw)
    assert "structure" not in out.columns and "structure_json" not in out.columns
    valid = out[out.kind == "valid"]
    assert len(valid) == 4
    assert all(n > 0 for n in valid.n_edges) and all(g is not None for g in valid.graph)
    assert all(isinstance(h, float) for h in valid.hull_pa)
    assert sorted(json.loads(valid.composition.iloc[0])) == sorted(valid.chemsys.iloc[0].split("-"))
    assert sorted(out.loc[out.kind == "reject", "reason"]) == ["duplicate_id", "unparseable"]
    assert (out.t_validate.fillna(0) >= 0).all() and (valid.t_graph > 0).all()


def test_inference_stage_rejects_rows_with_non_finite_output(tiny_model, references: str) -> None:
    """A structure whose model output is NaN (here: a broken reference hull energy) becomes an
    inference_failed reject with a reason; the other rows of the batch are still screened, and
    the batch passes the output schema (a NaN result row would stop the whole run)."""
    from cathode_ray.data.demo import demo_library
    from cathode_ray.screen.stages import GraphStage, InferenceStage

    raw = demo_raw_rows(demo_library(3))
    validated = ValidateStage(config=ValidationConfig(), ranks={})(pd.DataFrame(raw))
    graphs = GraphStage(model=str(tiny_model), references=references)(validated)
    graphs.loc[1, ["hull_pa", "has_ref"]] = [float("nan"), True]
    out = InferenceStage(model=str(tiny_model), run_id="t")(graphs)
    assert out.kind.tolist() == ["valid", "reject", "valid"]
    assert out.reason[1] == "inference_failed" and "non-finite model output" in out.message[1]
    results, rejects, _ = split_output(out, run_id="t")
    assert results.num_rows == 2 and rejects.num_rows == 1


def test_inference_threads_follow_the_config_and_reach_the_actor(tiny_model) -> None:
    """A local screen gives its CPU inference actors the machine's cores; a cluster or GPU actor
    keeps what Ray gave it, unless the user says otherwise."""
    import torch

    from cathode_ray.screen.pipeline import ScreenConfig
    from cathode_ray.screen.stages import InferenceStage

    def config(**kw: object) -> ScreenConfig:
        return ScreenConfig(library="demo", model="m", out="o", references="r", **kw)

    assert config().threads_per_actor(local_cores=2) == 2  # the embedded default on 2 cores
    assert config(cpu_actors=3).threads_per_actor(local_cores=8) == 2
    assert config(cpu_actors=4).threads_per_actor(local_cores=2) == 1
    assert config().threads_per_actor(local_cores=None) is None  # a cluster: Ray's setting
    assert config(gpu_actors=1).threads_per_actor(local_cores=16) is None
    assert config(inference_threads=3).threads_per_actor(local_cores=None) == 3
    with pytest.raises(ValueError, match="inference_threads must be >= 1"):
        config(inference_threads=0)
    before = torch.get_num_threads()
    try:
        InferenceStage(model=str(tiny_model), run_id="t", threads=before + 1)
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def _result_row(**kw: object) -> dict:
    row = {f.name: 0.1 for f in RESULT_SCHEMA if pa.types.is_floating(f.type)}
    row |= {"structure_id": "s1", "formula": "LiCoO2", "chemsys": "Co-Li-O", "nsites": 4,
            "ood_gates": "", "soap_cluster": 1, "decision": "KEEP", "decision_reason": "r",
            "model_id": "m", "run_id": "r1", "has_reference": True}
    return row | kw


def test_conform_enforces_schema() -> None:
    table = pa.Table.from_pylist([_result_row(extra="dropped")])
    out = conform(table, RESULT_SCHEMA)
    assert out.schema == RESULT_SCHEMA
    with pytest.raises(SchemaError, match="missing"):
        conform(table.drop_columns(["decision"]), RESULT_SCHEMA)
    with pytest.raises(SchemaError, match="null/NaN"):
        conform(pa.Table.from_pylist([_result_row(e_hull_pred=math.nan)]), RESULT_SCHEMA)
    with pytest.raises(SchemaError, match="cast"):
        conform(pa.Table.from_pylist([_result_row(nsites="many")]), RESULT_SCHEMA)


def test_split_output_routes_rows() -> None:
    res = _result_row() | {"kind": "valid", "source": "x", "occurrence": 0, "t_infer": 0.5}
    rej = {"structure_id": "s2", "source": "x", "kind": "reject", "occurrence": 1,
           "reason": "duplicate_id", "message": "m", "t_validate": 0.25}
    results, rejects, stats = split_output(pd.DataFrame([res, rej]), run_id="r1")
    assert results.schema == RESULT_SCHEMA and results.num_rows == 1
    assert rejects.schema == SCREEN_REJECT_SCHEMA and rejects.num_rows == 1
    assert rejects.column("run_id").to_pylist() == ["r1"]
    assert stats["t_infer"] == 0.5 and stats["t_validate"] == 0.25 and stats["rows"] == 2


def test_screen_writer_gathers_batches_into_file_pairs_and_sums_stats(tmp_path) -> None:
    import pyarrow.parquet as pq

    res = _result_row() | {"kind": "valid", "source": "x", "occurrence": 0, "t_infer": 0.5,
                           "reason": None, "message": None}  # every pipeline batch has all columns
    rej = {"structure_id": "s2", "source": "x", "kind": "reject", "occurrence": 0,
           "reason": "invalid_structure", "message": "m", "t_validate": 0.25}
    w = ScreenWriter(results_uri=str(tmp_path / "res"), rejects_uri=str(tmp_path / "rej"),
                     run_id="r1", attempt="a", rows_per_file=3)
    w.write(pd.DataFrame([res, rej]))
    assert not (tmp_path / "res").exists()  # 2 of 3 rows gathered: nothing written yet
    w.write(pd.DataFrame([res | {"structure_id": "s3"}]))  # 3 rows: the first file pair
    w.write(pd.DataFrame([res | {"structure_id": "s4"}]))  # results only: no rejects file
    w.write(pd.DataFrame())  # nothing to write, no file, no count
    assert [p.name for p in (tmp_path / "res").iterdir()] == ["part-a-000000.parquet"]
    w.flush()
    w.flush()  # nothing gathered: no empty file
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == [
        "part-a-000000.parquet", "part-a-000001.parquet"]
    assert [p.name for p in (tmp_path / "rej").iterdir()] == ["part-a-000000.parquet"]
    assert pq.read_table(tmp_path / "res" / "part-a-000000.parquet").column(
        "structure_id").to_pylist() == [res["structure_id"], "s3"]
    assert pq.read_table(tmp_path / "res" / "part-a-000001.parquet").column(
        "structure_id").to_pylist() == ["s4"]
    assert pq.read_table(tmp_path / "rej" / "part-a-000000.parquet").schema == SCREEN_REJECT_SCHEMA
    assert (w.stats["rows"], w.stats["results"], w.stats["rejects"]) == (4, 3, 1)
    assert w.stats["t_infer"] == 1.5 and w.stats["t_validate"] == 0.25
    with pytest.raises(ValueError, match="rows_per_file"):
        ScreenWriter(results_uri=str(tmp_path), rejects_uri=str(tmp_path), run_id="r", rows_per_file=0)


def test_read_results_and_rejects_of_one_run_or_every_run(tmp_path) -> None:
    """What pd.read_parquet("DEST/results") cannot do (run_id is a column and a folder)."""
    dest = str(tmp_path / "dest")
    res = _result_row() | {"kind": "valid", "source": "x", "occurrence": 0, "reason": None,
                           "message": None}
    rej = {"structure_id": "bad", "source": "x", "kind": "reject", "occurrence": 0,
           "reason": "unparseable", "message": "m"}
    for run_id, n in (("ra", 2), ("rb", 1)):
        paths = runs.RunPaths(dest=dest, run_id=run_id)
        w = ScreenWriter(results_uri=paths.results, rejects_uri=paths.rejects, run_id=run_id,
                         rows_per_file=10)
        w.write(pd.DataFrame([res | {"structure_id": f"{run_id}-{i}", "run_id": run_id}
                              for i in range(n)] + [rej]))
        w.flush()
    with pytest.raises(pa.ArrowTypeError, match="run_id"):
        pd.read_parquet(f"{dest}/results")
    every = runs.read_results(dest).to_pandas()
    assert sorted(every["structure_id"]) == ["ra-0", "ra-1", "rb-0"]
    assert sorted(every["run_id"]) == ["ra", "ra", "rb"]
    assert runs.read_results(dest).schema == RESULT_SCHEMA
    assert runs.read_results(dest, "rb").column("structure_id").to_pylist() == ["rb-0"]
    rejects = runs.read_rejects(dest)
    assert rejects.schema == SCREEN_REJECT_SCHEMA and sorted(rejects["run_id"].to_pylist()) == ["ra", "rb"]
    assert runs.read_results(str(tmp_path / "empty")).num_rows == 0  # no output yet: empty table


def test_screen_writer_stops_once_the_run_lock_is_taken_over(tmp_path) -> None:
    import json

    from cathode_ray.screen.runs import RunLock
    from cathode_ray.screen.state import LockLost

    uri = str(tmp_path / "_runs" / "r1.lock")
    mine = RunLock(uri=uri, run_id="r1", ttl_s=60, heartbeat=False).acquire()
    row = _result_row() | {"kind": "valid", "source": "x", "occurrence": 0, "reason": None,
                           "message": None}
    w = ScreenWriter(results_uri=str(tmp_path / "res"), rejects_uri=str(tmp_path / "rej"),
                     run_id="r1", attempt="a", rows_per_file=1, check=mine.check)
    w.write(pd.DataFrame([row]))  # still this run's lock: written
    held = json.loads((tmp_path / "_runs" / "r1.lock").read_text())
    held["expires_at"] = 0.0  # heartbeats failed past the ttl ...
    (tmp_path / "_runs" / "r1.lock").write_text(json.dumps(held))
    other = RunLock(uri=uri, run_id="r1", ttl_s=60, heartbeat=False).acquire()  # ... a resume took it
    with pytest.raises(LockLost):
        w.write(pd.DataFrame([row | {"structure_id": "s9"}]))
    assert [p.name for p in (tmp_path / "res").iterdir()] == ["part-a-000000.parquet"]
    other.release()


def test_run_lock_is_exclusive_and_released(tmp_path) -> None:
    uri = str(tmp_path / "_runs" / "r.lock")
    with runs.RunLock(uri=uri, run_id="r"):
        held = json.loads(open(uri).read())
        assert held["pid"] == os.getpid()
        with pytest.raises(runs.RunLockedError):
            runs.RunLock(uri=uri, run_id="r").acquire()
        runs.RunLock(uri=str(tmp_path / "_runs" / "other.lock"), run_id="other").acquire().release()
    assert not os.path.exists(uri)


def test_abandoned_lock_is_taken_over(tmp_path) -> None:
    uri = str(tmp_path / "_runs" / "r.lock")
    runs.write_json(uri, {"owner": "ghost", "host": "elsewhere", "pid": 1, "expires_at": 0})
    lock = runs.RunLock(uri=uri, run_id="r").acquire()
    assert json.loads(open(uri).read())["owner"] == lock.owner
    lock.release()


def test_run_paths_and_ids() -> None:
    p = runs.RunPaths(dest="s3://b/pre", run_id="r1")
    assert p.results == "s3://b/pre/results/run_id=r1"
    assert p.lock == "s3://b/pre/_runs/r1.lock"
    assert runs.check_run_id(runs.new_run_id())
    with pytest.raises(ValueError):
        runs.check_run_id("../x")


@pytest.mark.parametrize("bad", ["abc\n", "abc\nx", "\nabc", "abc\r", "", "a" * 129])
def test_run_ids_with_a_newline_or_out_of_bounds_are_refused(bad: str) -> None:
    """``$`` also matches before a trailing newline: "abc\\n" used to pass into paths and keys."""
    with pytest.raises(ValueError, match="must be 1-128 characters"):
        runs.check_run_id(bad)
    with pytest.raises(ValueError, match="must be 1-128 characters"):
        ScreenConfig(library="demo", model="m", out="o", references="mp", run_id=bad)
    assert runs.check_run_id("a" * 128) == "a" * 128


def test_screen_config_validation() -> None:
    base = {"library": "demo", "model": "m", "out": "o", "references": "snapshot:x"}
    ScreenConfig(**base)
    with pytest.raises(ValueError):
        ScreenConfig(**base, resume=True)
    with pytest.raises(ValueError):
        ScreenConfig(**base, cpu_actors=0)
    with pytest.raises(ValueError):
        ScreenConfig(**base, max_edges_per_batch=0)
    with pytest.raises(ValueError):
        ScreenConfig(**base, object_store_mb=0)
    assert ScreenConfig(**base, object_store_mb=None).object_store_mb is None
    with pytest.raises(ValueError, match="inference_batch_rows"):
        ScreenConfig(**base, inference_batch_rows=0)
    with pytest.raises(ValueError, match="inference_calls_per_actor"):
        ScreenConfig(**base, inference_calls_per_actor=0)
    # pyarrow writes gs:// too, but the run lock would be a cwd-relative local file there
    with pytest.raises(ValueError, match="not gs://"):
        ScreenConfig(**{**base, "out": "gs://bucket/screens"})
    for out in ("s3://b/p", "S3://b/p", "file:///tmp/x", "relative/dir", "C:\\screens"):
        ScreenConfig(**{**base, "out": out})


def test_the_library_fingerprint_depends_on_the_spec_that_names_the_ids(tmp_path) -> None:
    """One folder given as ``lib`` or ``lib/cifs``: same files, other fallback ids. A resume
    under the other spec passed the check and screened every file again under new ids."""
    from cathode_ray.screen.pipeline import plan_source
    from tests.data.badfiles import licoo2

    (tmp_path / "lib" / "cifs").mkdir(parents=True)
    for name in ("a.cif", "b.cif"):
        (tmp_path / "lib" / "cifs" / name).write_text(str(licoo2().to(fmt="cif")))
    base = {"model": "m", "out": "o", "references": "snapshot:x"}
    parent, child = (plan_source(ScreenConfig(library=str(tmp_path / spec), **base))
                     for spec in ("lib", "lib/cifs"))
    assert parent.files == child.files and parent.labels != child.labels
    assert parent.fingerprint != child.fingerprint


def test_screen_config_inference_batches_follow_the_actor_kind() -> None:
    base = {"library": "demo", "model": "m", "out": "o", "references": "snapshot:x"}
    cpu, gpu = ScreenConfig(**base), ScreenConfig(**base, gpu_actors=1)
    assert (cpu.batch_rows, cpu.edge_budget) == (seedcard.INFERENCE_BATCH_ROWS_CPU,
                                                 seedcard.MAX_EDGES_PER_BATCH_CPU)
    assert (gpu.batch_rows, gpu.edge_budget) == (seedcard.INFERENCE_BATCH_ROWS_GPU,
                                                 seedcard.MAX_EDGES_PER_BATCH_GPU)
    assert gpu.batch_rows > cpu.batch_rows and gpu.edge_budget > cpu.edge_budget
    assert (cpu.calls_per_actor, gpu.calls_per_actor) == (seedcard.INFERENCE_CALLS_PER_ACTOR_CPU,
                                                          seedcard.INFERENCE_CALLS_PER_ACTOR_GPU)
    explicit = ScreenConfig(**base, gpu_actors=1, inference_batch_rows=8, max_edges_per_batch=123,
                            inference_calls_per_actor=3)
    assert (explicit.batch_rows, explicit.edge_budget, explicit.calls_per_actor) == (8, 123, 3)


def test_screen_config_cpu_stages_scale_with_gpu_actors() -> None:
    base = {"library": "demo", "model": "m", "out": "o", "references": "snapshot:x"}
    cpu = ScreenConfig(**base, cpu_actors=2)
    assert (cpu.graph_pool, cpu.light_pool) == (1, 1)  # the 2-core measurements' best
    gpu = ScreenConfig(**base, gpu_actors=4)
    assert (gpu.graph_pool, gpu.light_pool) == (4 * seedcard.GRAPH_ACTORS_PER_GPU,
                                                4 * seedcard.LIGHT_TASKS_PER_GPU)
    explicit = ScreenConfig(**base, gpu_actors=4, graph_actors=3, light_tasks=2)
    assert (explicit.graph_pool, explicit.light_pool) == (3, 2)
    for name in ("graph_actors", "light_tasks"):
        with pytest.raises(ValueError, match=name):
            ScreenConfig(**base, **{name: 0})


def test_read_file_chunks_streams_bounded_blocks_in_input_order(tmp_path) -> None:
    import pyarrow.parquet as pq

    n = 23
    pq.write_table(pa.table({"structure_id": [f"s{i}" for i in range(n)],
                             "structure_json": ["{}"] * n}), tmp_path / "a.parquet")
    (tmp_path / "b.cif").write_text("not a cif")
    items = pd.DataFrame({"path": [str(tmp_path / "a.parquet"), str(tmp_path / "b.cif")],
                          "file_index": [0, 1]})
    chunks = list(read_file_chunks(items, chunk_rows=10))
    assert [len(c) for c in chunks] == [10, 10, 3, 1]  # one file's chunks never mix with the next
    rows = pd.concat(chunks, ignore_index=True)
    assert list(rows.columns) == ["structure_id", "source", "fmt", "payload", "error", "order"]
    assert rows["structure_id"].tolist()[:n] == [f"s{i}" for i in range(n)]
    assert rows["order"].tolist() == [order_key(0, i) for i in range(n)] + [order_key(1, 0)]
    # the index pass sees exactly the same ids and orders
    ids = [r for _, item in items.iterrows() for r in read_file_ids(item.to_dict())]
    assert [(r["structure_id"], r["order"]) for r in ids] == list(
        zip(rows["structure_id"], rows["order"], strict=True))
    counts = count_rows_per_file(pd.DataFrame(ids))
    assert dict(zip(counts["file_index"], counts["rows"], strict=True)) == {0: n, 1: 1}


@pytest.mark.parametrize(("limit", "expected"), [(0.0, "float32"), (1.0, "bf16")])
def test_inference_stage_checks_reduced_precision_on_first_batch(
        tiny_model, monkeypatch: pytest.MonkeyPatch, limit: float, expected: str) -> None:
    """bf16 is measured against float32 on the first sub-batch; above the bound the actor falls
    back to float32 (limit 0: any deviation is too much), within it bf16 is kept."""
    from cathode_ray import seedcard
    from cathode_ray.screen.stages import InferenceStage
    from tests.chgnet_data import layered_cells

    monkeypatch.setattr(seedcard, "PRECISION_MAX_DEVIATION", limit)
    stage = InferenceStage(model=str(tiny_model), run_id="t", precision="bf16")
    bb = stage.ensemble.backbone
    df = pd.DataFrame({"graph": [bb.build_graph(s) for s in layered_cells(3)],
                       "hull_pa": [-6.0] * 3, "corr_pa": [0.0] * 3, "has_ref": [True, True, False]})
    pred = stage._predict(df, [0, 1, 2])
    assert stage.ensemble.precision == expected
    assert pred.q50.shape == (len(stage.ensemble.members), 3)


def test_screen_config_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision"):
        ScreenConfig(library="demo", model="m", out="o", references="snapshot:x", precision="fp16")


def test_screen_config_rejects_stacked_members_and_compiling_together() -> None:
    with pytest.raises(ValueError, match="alternatives"):
        ScreenConfig(library="demo", model="m", out="o", references="snapshot:x", stack_members=True,
                     compile_model=True)


@pytest.mark.slow
@pytest.mark.skipif(not cxx_compiler_available(),
                    reason="TorchInductor needs a C++ compiler (g++/clang++) on the CPU")
def test_inference_stage_with_compiled_model_equals_uncompiled(tiny_model) -> None:
    """The screen's actor with ``compile_model``: the tiny CHGNet ensemble's trunk and last blocks
    run compiled (no fallback) and predict what the uncompiled actor predicts."""
    from cathode_ray.screen.stages import InferenceStage
    from tests.chgnet_data import layered_cells

    compiled = InferenceStage(model=str(tiny_model), run_id="t", compile_model=True)
    plain = InferenceStage(model=str(tiny_model), run_id="t")
    bb = plain.ensemble.backbone
    df = pd.DataFrame({"graph": [bb.build_graph(s) for s in layered_cells(3)],
                       "hull_pa": [-6.0] * 3, "corr_pa": [0.0] * 3, "has_ref": [True, True, False]})
    got, ref = compiled._predict(df, [0, 1, 2]), plain._predict(df, [0, 1, 2])
    ens = compiled.ensemble
    assert not ens.compile_failures and ens._compiled is not None and ens._compiled_trunk is not None
    for k in ("q10", "q50", "q90", "p_stable", "p_metastable"):
        np.testing.assert_allclose(getattr(got, k), getattr(ref, k), atol=1e-5)


def test_read_items_split_large_parquet_into_ranges_that_read_like_the_whole_file(tmp_path) -> None:
    import pyarrow.parquet as pq

    n = 25
    pq.write_table(pa.table({"structure_id": [f"s{i}" for i in range(n)],
                             "structure_json": ["{}"] * n}), tmp_path / "big.parquet", row_group_size=7)
    (tmp_path / "one.cif").write_text("not a cif")
    files = [str(tmp_path / "big.parquet"), str(tmp_path / "one.cif")]
    items = read_items(files, {0: n, 1: 1}, task_rows=10)
    assert [(i["file_index"], i["row_start"], i["row_stop"]) for i in items] == [
        (0, 0, 10), (0, 10, 20), (0, 20, 25), (1, 0, -1)]
    ranged = [r for item in items for r in iter_file_rows(item)]
    whole = [r for i, f in enumerate(files) for r in iter_file_rows({"path": f, "file_index": i})]
    assert ranged == whole and len(whole) == n + 1
    # small files and non-Parquet files stay one task each
    assert [i["row_stop"] for i in read_items(files, {0: n, 1: 1}, task_rows=100)] == [-1, -1]


def test_screen_reads_the_same_fallback_ids_as_the_library(tmp_path) -> None:
    """Same-named files in subfolders keep distinct fallback ids through the screen's read tasks
    (the labels planned from the library root ride along in every read item)."""
    from cathode_ray.data.library import iter_library
    from cathode_ray.screen.pipeline import ScreenConfig, plan_source
    from tests.data.badfiles import licoo2, limn2o4

    for sub, s in (("a", licoo2()), ("b", limn2o4())):
        (tmp_path / "lib" / sub).mkdir(parents=True)
        s.to(filename=str(tmp_path / "lib" / sub / "s.cif"))
    config = ScreenConfig(library=str(tmp_path / "lib"), model="m", out=str(tmp_path / "o"),
                          references="snapshot:x")
    source = plan_source(config)
    items = read_items(source.files, {}, labels=source.labels)
    ids = [r["structure_id"] for item in items for r in iter_file_rows(item)]
    assert ids == [r["structure_id"] for r in iter_library(str(tmp_path / "lib"))]
    assert ids == ["a/s.cif#0", "b/s.cif#0"]


def test_small_files_share_read_tasks_and_large_ones_get_their_own() -> None:
    """One task per file cost ~25 ms each: a folder of 1,326 CIFs spent 33 s in the index pass."""
    from cathode_ray.screen.pipeline import read_tasks

    assert read_tasks(1, 10) == 1
    assert read_tasks(1326, 1326 * 3_000) == 21  # small CIFs: 64 a task
    assert read_tasks(8, 8 * (1 << 30)) == 8  # 1 GB Parquet files: one a task
    assert read_tasks(200, 200 * (1 << 20)) == 13  # 1 MB files: 16 MB a task
    assert read_tasks(10**6, 10**6 * 3_000) == 1000  # a huge library: spread over 1,000 tasks


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_inference_without_a_cuda_device_is_a_clear_error() -> None:
    from cathode_ray.screen.stages import check_device

    check_device("cpu")
    with pytest.raises(RuntimeError, match="sees no CUDA device.*install a CUDA build of torch"):
        check_device("cuda")


def test_a_resume_with_other_references_is_refused_before_ray_starts(tmp_path) -> None:
    from cathode_ray.screen import pipeline

    out = str(tmp_path / "dest")
    paths = runs.RunPaths(dest=out, run_id="r1")
    runs.write_json(paths.start, {"run_id": "r1", "references": "snapshot:/refs/a.jsonl.gz"})
    same = ScreenConfig(library="demo", model="m", out=out, references="snapshot:/refs/a.jsonl.gz",
                        run_id="r1", resume=True)
    pipeline._refuse_other_references(paths, same)
    with pytest.raises(ValueError, match="was started with references 'snapshot:/refs/a.jsonl.gz'"):
        pipeline._refuse_other_references(paths, replace(same, references="mp"))
