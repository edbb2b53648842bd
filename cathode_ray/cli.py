"""``cathode-ray`` command line: parse options, build a config, call one ``run(config)``.

Every command is a thin wrapper over a Python API a notebook can call directly:

    ingest           cathode_ray.data.dataset.run(IngestConfig)
    library generate cathode_ray.data.generate.run(GenerateConfig)
    train            cathode_ray.train.ensemble.run(EnsembleTrainConfig)
    calibrate        cathode_ray.train.ensemble.recalibrate(RecalibrateConfig)
    report           cathode_ray.report.run.run(ReportConfig)
    screen           cathode_ray.screen.pipeline.run(ScreenConfig)
    rescreen         cathode_ray.screen.rescreen.run(RescreenConfig)

``--config FILE.yaml`` (where offered) supplies defaults; options given on the command line win.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import click
import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.split("\n")[0])
library_app = typer.Typer(no_args_is_help=True, help="Candidate libraries.")
app.add_typer(library_app, name="library")

_CHECKOUT = Path(__file__).resolve().parents[1]
#: Default references: the offline snapshot beside the checkout (``../shared/data``), found from
#: any working directory.
DEFAULT_REFERENCES = f"snapshot:{_CHECKOUT.parent / 'shared' / 'data' / 'mp_reference_entries.jsonl.gz'}"
#: The bundled model, shipped in the repository.
BUNDLED_MODEL = str(_CHECKOUT / "artifacts" / "models" / "chgnet-litmo-v1")


#: click's command-line converters, used for YAML strings given for typed fields ("2" -> 2).
_CLICK_TYPES: dict[type, click.ParamType] = {bool: click.BOOL, int: click.INT, float: click.FLOAT}


def _yaml_value(where: str, value: Any, hint: Any) -> Any:
    """A YAML value for a field annotated ``hint``: a string converts as the same option would on
    the command line (click's types), a list becomes the tuple or frozenset a field holds; other
    values are returned as they are, for the config's own type checks."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if isinstance(value, str) and str not in kinds:
        for kind in kinds:
            if kind in _CLICK_TYPES:
                try:
                    return _CLICK_TYPES[kind].convert(value, None, None)
                except click.BadParameter as e:
                    raise ValueError(f"{where}: {e.message}") from None
    if isinstance(value, list) and typing.get_origin(hint) in (tuple, frozenset):
        return typing.get_origin(hint)(value)
    return value


def _hints(config_cls: type) -> dict[str, Any]:
    """Field annotations of a dataclass (``Any`` for all, where one cannot be resolved)."""
    try:
        return typing.get_type_hints(config_cls)
    except NameError:
        return {f.name: Any for f in dataclasses.fields(config_cls)}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a union of str/bool/int/float/None (an int is a float, a bool is
    not an int); other annotations are not checked here."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if not all(k in (str, bool, int, float, type(None)) for k in kinds):
        return True
    if isinstance(value, bool):
        return bool in kinds
    return any(value is None if k is type(None) else isinstance(value, (int, float) if k is float else k)
               for k in kinds)


def _yaml_fields(where: str, data: Any, config_cls: type, what: str) -> dict[str, Any]:
    """``data`` (a YAML mapping of ``what``) checked against the fields of the dataclass
    ``config_cls``: unknown keys are an error that names them and the valid ones, values are
    converted (:func:`_yaml_value`) and type-checked (:func:`_fits`)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of {what}, got a YAML {type(data).__name__}")
    hints = _hints(config_cls)
    valid = [f.name for f in dataclasses.fields(config_cls)]
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            raise ValueError(f"{where}: unknown key {str(key)!r}"
                             f"{f' (did you mean {close[0]!r}?)' if close else ''}; valid keys: "
                             f"{', '.join(valid)}")
        value = _yaml_value(f"{where}: {name}", value, hints[name])
        if not _fits(value, hints[name]):
            kind = getattr(hints[name], "__name__", hints[name])
            raise ValueError(f"{where}: {name} must be {kind}, got {type(value).__name__} {value!r}")
        out[name] = value
    return out


def _yaml_defaults(path: Path | None, config_cls: type) -> dict[str, Any]:
    """Defaults from a ``--config`` YAML file for the dataclass ``config_cls``: its top-level keys
    are field names (``-`` or ``_``), a dataclass-typed field (``validation:``) takes a nested
    mapping of that class's fields. Any mistake is a ValueError naming the file and the key."""
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    out = _yaml_fields(str(path), {} if data is None else data, config_cls,
                       "option names to values (e.g. 'gpu_actors: 2')")
    hints = _hints(config_cls)
    for name, value in out.items():
        nested = hints[name]
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            fields = _yaml_fields(f"{path}: {name}", value, nested,
                                  f"{nested.__name__} fields to values (e.g. 'max_atoms: 200')")
            try:
                out[name] = nested(**fields)
            except TypeError as e:  # a comparison in the class's own checks
                raise ValueError(f"{path}: {name}: {e}") from None
    return out


def _merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Command-line values (not None) override YAML defaults."""
    out = dict(defaults)
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command()
def ingest(
    source: Annotated[str, typer.Option(help="'mp' (live MP via mp-api, MP_API_KEY) or 'snapshot:PATH'")],
    out: Annotated[str, typer.Option(help="dataset directory to write")],
    seed: Annotated[int, typer.Option(help="split seed")] = 42,
    loco_cluster: Annotated[int | None, typer.Option(help="held-out SOAP cluster (default: ~10% cluster; -1 none)")] = None,
) -> None:
    """Read MP documents, validate, SOAP-cluster and split them into a dataset directory."""
    from cathode_ray.data.dataset import IngestConfig, run

    result = run(IngestConfig(source=source, out=out, seed=seed, loco_cluster=loco_cluster))
    typer.echo(f"{result.n_rows} rows, {result.n_rejects} rejects -> {result.out}")


@library_app.command("generate")
def library_generate(
    from_: Annotated[str, typer.Option("--from", help="parent structures: snapshot JSON lines or a library")],
    n: Annotated[int, typer.Option(help="number of distinct candidates")],
    out: Annotated[str, typer.Option(help="output directory (Parquet shards), local or s3://")],
    seed: int = 0,
    shard_size: int = 10_000,
    workers: Annotated[int, typer.Option(help="processes (0 = one per core)")] = 0,
    overwrite: bool = False,
) -> None:
    """Generate candidates by TM substitution, Li vacancies and strain from real parents."""
    from cathode_ray.data.generate import GenerateConfig, run

    r = run(GenerateConfig(source=from_, n=n, out=out, seed=seed, shard_size=shard_size,
                           workers=workers, overwrite=overwrite))
    typer.echo(f"{r.n_candidates} candidates from {r.n_parents} parents in {r.seconds:.1f} s "
               f"({r.structures_per_s:.0f}/s), {len(r.shards)} shards -> {r.out}")


@app.command()
def train(
    data: Annotated[str, typer.Option(help="dataset directory from `cathode-ray ingest`")],
    out: Annotated[str, typer.Option(help="model directory to write (local or s3://)")],
    backbone: Annotated[str, typer.Option(help="chgnet | mace-mp-0-medium | mace:PATH")] = "chgnet",
    members: int = 5,
    references: Annotated[str, typer.Option(help="snapshot:PATH or mp")] = DEFAULT_REFERENCES,
    head_mode: Annotated[str, typer.Option(help="delta (zero-shot + correction) or embedding")] = "delta",
    head_only: Annotated[bool, typer.Option(help="members differ only in their heads")] = False,
    max_epochs: int = 200,
    patience: int = 12,
    runner: Annotated[str, typer.Option(help="ray (concurrent members) or local (sequential)")] = "ray",
    address: Annotated[str | None, typer.Option(help="Ray address (default: local Ray)")] = None,
    gpus_per_member: float = 0.0,
    cpus_per_member: float = 1.0,
    early_stopping: Annotated[str, typer.Option(
        help="val (seed card: val stops and calibrates) | holdout (15% of train stops; val only calibrates)")] = "val",
    verbose: bool = True,
) -> None:
    """Train the ensemble (members concurrently on Ray Train), calibrate, write MODEL_DIR."""
    from cathode_ray.train.ensemble import EnsembleTrainConfig, run

    _setup_logging(verbose)
    manifest = run(EnsembleTrainConfig(
        data=data, out=out, backbone=backbone, members=members, references=references,
        head_mode=head_mode, train_last_block=not head_only, max_epochs=max_epochs,  # type: ignore[arg-type]
        patience=patience, runner=runner, address=address, gpus_per_member=gpus_per_member,  # type: ignore[arg-type]
        cpus_per_member=cpus_per_member, early_stopping=early_stopping,  # type: ignore[arg-type]
    ))
    typer.echo(json.dumps({"model_id": manifest["model_id"], "members": manifest["members"]}, indent=2))


@app.command()
def calibrate(
    model: Annotated[str, typer.Option(help="model directory to recalibrate (members untouched)")],
    data: Annotated[str, typer.Option(help="dataset directory; its val split calibrates")],
    references: str = DEFAULT_REFERENCES,
    zero_shot_fallback: Annotated[bool, typer.Option(
        help="new chemical systems take the backbone's zero-shot E_hull (cathode_ray.calibrate.fallback)")] = True,
) -> None:
    """Refit conformal intervals, OOD gates, the backbone fallback and triage thresholds of an existing model."""
    from cathode_ray.calibrate.calibrator import CalibratorConfig
    from cathode_ray.train.ensemble import RecalibrateConfig, recalibrate

    manifest = recalibrate(RecalibrateConfig(
        model=model, data=data, references=references,
        calibration=CalibratorConfig(zero_shot_fallback=zero_shot_fallback)))
    typer.echo(f"recalibrated {model}: model_id {manifest['model_id']}")


@app.command()
def report(
    model: Annotated[str, typer.Option(help="model directory")],
    data: Annotated[str, typer.Option(help="labelled dataset directory")],
    out: Annotated[str, typer.Option(help="report directory")],
    split: Annotated[str, typer.Option(help="splits (val+test+loco) | val | test | loco | all")] = "splits",
    references: str = DEFAULT_REFERENCES,
    compare: Annotated[list[str] | None, typer.Option(
        help="other model dirs on the same data (e.g. last-block vs head-only): cost/accuracy table")] = None,
) -> None:
    """Governance report: six seed-card checks, metrics per split, plots."""
    from cathode_ray.report.run import ReportConfig, run

    rep = run(ReportConfig(model=model, data=data, out=out, split=split, references=references,  # type: ignore[arg-type]
                           compare=tuple(compare or ())))
    for c in rep["checks"]:
        typer.echo(f"{'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {c['value']:.4g} {c['op']} {c['threshold']}")
    split = rep["evaluation_split"]
    for m in rep.get("ensemble_modes", []):
        t = m["metrics"].get(split, {})
        typer.echo(f"{m['mode']:>10} {m['model_id']}: members {m['members_ms_per_structure']:.2f} ms/structure, "
                   f"{split} spearman {t.get('spearman', float('nan')):.3f} mae {t.get('mae', float('nan')):.4f} "
                   f"coverage {t.get('coverage', float('nan')):.3f}")
    typer.echo(f"report -> {out}")


@app.command()
def screen(
    library: Annotated[str | None, typer.Option(help="file/dir/glob/s3:// prefix of CIF, POSCAR, vasprun.xml, extxyz, AIRSS .res, ASE .db/.traj, JSON(L) or Parquet files; 'mp' or 'demo'")] = None,
    model: Annotated[str | None, typer.Option(help="model directory (default: bundled)")] = None,
    out: Annotated[str | None, typer.Option(help="DEST: local directory or s3://bucket/prefix")] = None,
    references: Annotated[str | None, typer.Option(help="snapshot:PATH or mp")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: local Ray)")] = None,
    run_id: Annotated[str | None, typer.Option(help="run id (default: generated)")] = None,
    resume: Annotated[bool | None, typer.Option(help="continue RUN_ID, skipping finished structures")] = None,
    gpu_actors: int | None = None,
    gpu_wait_s: Annotated[float | None, typer.Option(help="seconds to wait for GPUs on a cluster before failing clearly (default 900; a local Ray fails at once)")] = None,
    cpu_actors: int | None = None,
    inference_threads: Annotated[int | None, typer.Option(help="torch threads per inference actor (default: on the screen's own local Ray, the machine's cores shared by the CPU actors; else the CPUs an actor reserves)")] = None,
    graph_actors: Annotated[int | None, typer.Option(help="most graph-building CPU actors (default: 1 CPU, 8 per GPU actor)")] = None,
    light_tasks: Annotated[int | None, typer.Option(help="most concurrent read/validate tasks (default: 1 CPU, 2 per GPU actor)")] = None,
    max_edges_per_batch: Annotated[int | None, typer.Option(help="edge budget per inference sub-batch (default: 12,500 CPU, 400,000 GPU)")] = None,
    inference_batch_rows: Annotated[int | None, typer.Option(help="rows per inference call (default: 32 CPU, 256 GPU)")] = None,
    inference_calls_per_actor: Annotated[int | None, typer.Option(help="concurrent calls per inference actor; batching overlaps the model (default: 1 CPU, 2 GPU)")] = None,
    object_store_mb: Annotated[float | None, typer.Option(help="object-store budget (MB) of blocks queued between stages")] = None,
    precision: Annotated[str | None, typer.Option(help="float32 | tf32 | bf16 (checked vs float32)")] = None,
    stack_members: Annotated[bool | None, typer.Option(help="one vectorised call for all members (off: measured slower on CPU)")] = None,
    compile_model: Annotated[bool | None, typer.Option(help="trunk and members' last blocks through torch.compile (each actor compiles first; pays off on large screens)")] = None,
    demo_size: int | None = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with defaults for these options")] = None,
) -> None:
    """Screen a library: validate, build graphs, ensemble inference, calibrate, triage, write Parquet."""
    from cathode_ray.screen.pipeline import ScreenConfig, run

    opts = _merge({"library": "demo", "model": BUNDLED_MODEL, "out": "out/screen",
                   "references": DEFAULT_REFERENCES, **_yaml_defaults(config, ScreenConfig)},
                  {"library": library, "model": model, "out": out, "references": references,
                   "address": address, "run_id": run_id, "resume": resume, "gpu_actors": gpu_actors,
                   "gpu_wait_s": gpu_wait_s, "cpu_actors": cpu_actors, "inference_threads": inference_threads, "graph_actors": graph_actors, "light_tasks": light_tasks,
                   "max_edges_per_batch": max_edges_per_batch,
                   "inference_batch_rows": inference_batch_rows,
                   "inference_calls_per_actor": inference_calls_per_actor, "object_store_mb": object_store_mb, "precision": precision, "stack_members": stack_members, "compile_model": compile_model, "demo_size": demo_size})
    run(ScreenConfig(**opts))


@app.command()
def rescreen(
    model: Annotated[str, typer.Option(help="model directory")],
    out: Annotated[str, typer.Option(help="DEST: local directory or s3://bucket/prefix")],
    source: Annotated[str, typer.Option(help="'mp' (live Materials Project)")] = "mp",
    state: Annotated[str | None, typer.Option(help="state URI (default DEST/_state)")] = None,
    references: Annotated[str, typer.Option(help="mp (same release) or snapshot:PATH")] = "mp",
    force: bool = False,
    address: str | None = None,
) -> None:
    """Re-screen what changed since the last Materials Project release that was screened."""
    from cathode_ray.screen.rescreen import RescreenBusy, RescreenConfig, run

    try:
        outcome = run(RescreenConfig(source=source, model=model, out=out, state=state,
                                     references=references, force=force, address=address))
    except RescreenBusy as e:
        typer.echo(f"busy: {e}", err=True)
        raise typer.Exit(code=3) from e
    typer.echo(outcome.message)


def _says_what_to_do(exc: BaseException) -> bool:
    """Errors this package raises for bad input or a bad environment, with a message that names
    the problem and the fix (a missing library, a tampered model, no GPUs, a locked run, S3 or MP
    unreachable). Anything else is a bug, and keeps its traceback."""
    from cathode_ray.data.references import NoReferenceError
    from cathode_ray.data.sources import SourceError
    from cathode_ray.model.artifact import ArtifactIntegrityError
    from cathode_ray.model.backbones.mace import BackboneUnavailableError, WeightsMismatchError
    from cathode_ray.screen.pipeline import NoGPUError
    from cathode_ray.screen.runs import RunLockedError
    from cathode_ray.screen.state import LockLost, StateError

    return isinstance(exc, (OSError, ValueError, NoReferenceError, ArtifactIntegrityError,
                            BackboneUnavailableError, WeightsMismatchError, NoGPUError,
                            RunLockedError, LockLost, StateError, SourceError))


def main() -> None:
    """Console entry: such errors print as one line and exit 1 (``CATHODE_RAY_DEBUG=1``: the
    traceback), instead of a 60-line traceback around a message that says what to do."""
    try:
        app()
    except Exception as exc:
        if os.environ.get("CATHODE_RAY_DEBUG") or not _says_what_to_do(exc):
            raise
        typer.echo(f"error: {type(exc).__name__}: {exc}\n(set CATHODE_RAY_DEBUG=1 for the "
                   "traceback)", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
