"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/train_ensemble.py ...``.

Same options as ``cathode-ray train``; members run as concurrent Ray Train runs on the cluster
that runs the job (RAY_ADDRESS, or ``--address``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # working-dir checkout

app = typer.Typer(add_completion=False)


@app.command()
def main(
    data: str = typer.Option(..., help="dataset directory from `cathode-ray ingest`"),
    out: str = typer.Option(..., help="model directory to write (local or s3://)"),
    backbone: str = typer.Option("chgnet", help="chgnet | mace-mp-0-medium | mace:PATH"),
    members: int = typer.Option(5, help="ensemble members (seeds 42, 43, ...)"),
    references: str = typer.Option("mp", help="snapshot:PATH or mp"),
    head_mode: str = typer.Option("delta", help="delta or embedding"),
    head_only: bool = typer.Option(False, help="members differ only in their heads"),
    max_epochs: int = typer.Option(200),
    patience: int = typer.Option(12),
    address: str | None = typer.Option(None, help="Ray address (default: RAY_ADDRESS / local)"),
    gpus_per_member: float = typer.Option(0.0, help="1 = a GPU each, 0.2 = five share one"),
    cpus_per_member: float = typer.Option(1.0),
    early_stopping: str = typer.Option("val", help="val (stops and calibrates) | holdout (15% of train stops)"),
) -> None:
    """Train, calibrate and write the ensemble; print its model id and member metrics."""
    from cathode_ray.train.ensemble import EnsembleTrainConfig, run

    manifest = run(EnsembleTrainConfig(
        data=data, out=out, backbone=backbone, members=members, references=references,
        head_mode=head_mode, train_last_block=not head_only, max_epochs=max_epochs,  # type: ignore[arg-type]
        patience=patience, runner="ray", address=address, gpus_per_member=gpus_per_member,
        cpus_per_member=cpus_per_member, early_stopping=early_stopping,  # type: ignore[arg-type]
    ))
    print(json.dumps({"model_id": manifest["model_id"], "members": manifest["members"]}, indent=2))


if __name__ == "__main__":
    app()
