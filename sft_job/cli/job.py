"""The job's commands: `run`, `validate`, `status`, `schema`.

    sft-job run jobs/smoke-cpu.yaml --set train.epochs=1
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from sft_job.cli.app import SetOpt, SpecArg


def run(
    spec: SpecArg,
    set_: SetOpt = None,
    allow_changed: Annotated[
        bool,
        typer.Option("--allow-changed", help="Resume even if the spec or data changed since "
                     "the last checkpoint."),
    ] = False,
) -> None:
    """Run the job: fetch data and model, train, evaluate, merge, push. Exit codes: 0 done,
    2 bad spec/data, 3 storage access, 75 preempted or transient (retry)."""
    from sft_job.specload import load_spec
    from sft_job.train.launch import launch, plan

    job = load_spec(spec, set_)
    ranks = plan(job)
    if ranks is not None:  # several devices: become the launcher of one rank per device
        from sft_job.pipeline import setup_logging

        setup_logging()
        code = launch(ranks, sys.argv[1:])
        if code:
            typer.echo(f"error: a rank exited with {code} (see the rank logs above)", err=True)
        sys.exit(code)
    from sft_job.pipeline import run_job

    run_job(job, allow_changed=allow_changed)


def validate(
    spec: SpecArg,
    set_: SetOpt = None,
    samples: Annotated[int, typer.Option(min=0, max=1000,
                                         help="Render N samples as training sees them.")] = 2,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write a machine-readable report here.")
    ] = None,
) -> None:
    """Check the spec, storage access and data without training; exit 2 if the job would fail."""
    from sft_job.preflight import preflight
    from sft_job.specload import load_spec

    job = load_spec(spec, set_)
    preflight(job, samples=samples, json_out=json_out)


def status(
    uri: Annotated[str, typer.Argument(help="The run's output.uri: a path, s3://, gs:// ...")],
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object (per refresh).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until done or failed.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (--watch).")] = 30.0,
    stale_minutes: Annotated[
        float, typer.Option(help="No progress for this long while running: phase 'stalled'.")
    ] = 30.0,
) -> None:
    """Where a run is: phase, step, last committed checkpoint, losses, speed, ETA. Exit 2 when
    there is no run at URI, 3 when it cannot be read."""
    from sft_job.status import status_cli

    status_cli(uri, as_json=json_out, watch=watch, interval=max(interval, 0.1),
               stale_minutes=stale_minutes)


def schema(
    markdown: Annotated[bool, typer.Option("--markdown", help="A Markdown field reference.")] = False,
) -> None:
    """Print the JSON schema of a job spec (or its Markdown reference, docs/spec.md)."""
    from sft_job.spec import json_schema, markdown_reference

    typer.echo(markdown_reference() if markdown else json.dumps(json_schema(), indent=2), nl=False)
    typer.echo("")
