"""Ray job entrypoint for scheduled re-screens (``ray job submit ... -- python jobs/rescreen.py``).

Same options as ``cathode-ray rescreen``. Exit codes: 0 screened or up to date, 3 another
re-screen holds the lock (RescreenBusy), 1 any other failure (the next scheduled run resumes).
Inside a Ray job ``RAY_ADDRESS`` is set, so the screen runs on the job's cluster.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

BUSY_EXIT_CODE = 3

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    model: Annotated[str, typer.Option(help="calibrated model directory (local or s3://)")],
    out: Annotated[str, typer.Option(help="DEST: local directory or s3://bucket/prefix")],
    source: Annotated[str, typer.Option(help="materials source (only 'mp')")] = "mp",
    state: Annotated[str | None, typer.Option(help="state directory (default DEST/_state)")] = None,
    references: Annotated[str, typer.Option(help="reference hulls: mp or snapshot:PATH")] = "mp",
    force: Annotated[bool, typer.Option(help="re-screen everything even if nothing changed")] = False,
    address: Annotated[str | None, typer.Option(help="Ray address (default RAY_ADDRESS / local)")] = None,
    gpu_actors: Annotated[int, typer.Option(help="GPU inference actors (0 = CPU)")] = 0,
    cpu_actors: Annotated[int, typer.Option(help="CPU inference actors")] = 1,
    cpus_per_actor: Annotated[float, typer.Option(help="CPUs per CPU inference actor")] = 1.0,
) -> None:
    """Re-screen what changed in the Materials Project since the last run."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # working_dir without install
    from cathode_ray.screen.rescreen import RescreenBusy, RescreenConfig, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = RescreenConfig(source=source, model=model, out=out, state=state,
                            references=references, force=force, address=address,
                            gpu_actors=gpu_actors, cpu_actors=cpu_actors,
                            cpus_per_actor=cpus_per_actor, verbose=True)
    try:
        outcome = run(config)
    except RescreenBusy as exc:
        typer.echo(f"rescreen: {exc}", err=True)
        raise typer.Exit(BUSY_EXIT_CODE) from exc
    typer.echo(outcome.message)


if __name__ == "__main__":
    app()
