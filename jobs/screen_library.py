"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/screen_library.py ...``.

Same options as ``cathode-ray screen``; connects to the cluster that runs the job (RAY_ADDRESS).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # working-dir checkout

app = typer.Typer(add_completion=False)


@app.command()
def main(
    library: str = typer.Option(..., help="file/dir/glob/s3 prefix, 'mp' or 'demo'"),
    model: str = typer.Option(..., help="calibrated model directory (local or s3://)"),
    out: str = typer.Option(..., help="DEST: local path or s3://bucket/prefix"),
    references: str = typer.Option("mp", help="snapshot:PATH or mp"),
    address: str | None = typer.Option(None, help="Ray address (default: RAY_ADDRESS)"),
    run_id: str | None = typer.Option(None, help="run id (resume needs the same one)"),
    resume: bool = typer.Option(False, help="skip inputs already written for --run-id"),
    gpu_actors: int = typer.Option(0, help="inference actors with one GPU each"),
    gpu_wait_s: float | None = typer.Option(
        None, help="seconds to wait for the GPU pool to scale up before failing clearly (default 900)"),
    cpu_actors: int = typer.Option(1, help="CPU inference actors (when no GPU actors)"),
    inference_threads: int | None = typer.Option(
        None, help="torch threads per inference actor (default: the CPUs an actor reserves on a cluster)"),
    graph_actors: int | None = typer.Option(
        None, help="most graph-building CPU actors (default: 1 CPU, 8 per GPU actor)"),
    light_tasks: int | None = typer.Option(
        None, help="most concurrent read/validate tasks (default: 1 CPU, 2 per GPU actor)"),
    max_edges_per_batch: int | None = typer.Option(
        None, help="edge budget per inference sub-batch (default: 12,500 CPU, 400,000 GPU)"),
    inference_batch_rows: int | None = typer.Option(
        None, help="rows per inference call (default: 32 CPU, 256 GPU)"),
    inference_calls_per_actor: int | None = typer.Option(
        None, help="concurrent calls per inference actor (default: 1 CPU, 2 GPU)"),
    object_store_mb: float | None = typer.Option(
        None, help="object-store budget (MB) of queued blocks (default: ScreenConfig's)"),
    precision: str = typer.Option("float32", help="float32 | tf32 | bf16 (checked vs float32)"),
    stack_members: bool = typer.Option(False, help="one vectorised call for all members (GPU option)"),
    compile_model: bool = typer.Option(False, help="trunk and members' last blocks through torch.compile"),
    demo_size: int = typer.Option(2000, help="structures of the demo library"),
) -> None:
    """Screen a library and print the summary table."""
    from cathode_ray.screen.pipeline import ScreenConfig, run

    run(ScreenConfig(library=library, model=model, out=out, references=references,
                     address=address, run_id=run_id, resume=resume, gpu_actors=gpu_actors,
                     cpu_actors=cpu_actors, inference_threads=inference_threads,
                     graph_actors=graph_actors, light_tasks=light_tasks,
                     max_edges_per_batch=max_edges_per_batch,
                     inference_batch_rows=inference_batch_rows,
                     inference_calls_per_actor=inference_calls_per_actor,
                     **({} if object_store_mb is None else {"object_store_mb": object_store_mb}),
                     precision=precision, stack_members=stack_members, compile_model=compile_model,
                     **({} if gpu_wait_s is None else {"gpu_wait_s": gpu_wait_s}),
                     demo_size=demo_size))


if __name__ == "__main__":
    app()
