"""The `sft-job` command line: parse arguments, dispatch, and map errors to exit codes.

    sft-job run jobs/smoke-cpu.yaml --set train.epochs=1

This is the only module that exits the process. Heavy libraries (torch, transformers, trl,
peft) are imported inside the functions that use them so `--help` and `validate` stay fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from sft_job import __version__
from sft_job.errors import EXIT_BUG, EXIT_RETRY, SftJobError

app = typer.Typer(
    name="sft-job",
    help="Supervised fine-tuning as a batch job: one YAML spec in, a trained model out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec field: --set train.epochs=1 (repeatable)."),
]
SpecArg = Annotated[str, typer.Argument(help="Job spec: a local YAML path or s3://, gs:// URI.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sft-job {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    """Supervised fine-tuning as a batch job: one YAML spec in, a trained model out."""


@app.command()
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


@app.command()
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


@app.command()
def merge(
    base: Annotated[str, typer.Argument(help="Base model (same kinds as model.base).")],
    adapter: Annotated[str, typer.Argument(help="PEFT adapter folder or URI.")],
    out: Annotated[str, typer.Argument(help="Where the merged model goes (path or URI).")],
) -> None:
    """Merge a LoRA adapter into its base model, shard by shard, and save safetensors."""
    from sft_job.finish.merge import merge_cli

    merge_cli(base, adapter, out)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Model folder or URI (merged or base).")],
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=32_768, help="Tokens to generate.")] = 64,
    adapter: Annotated[str | None, typer.Option(help="Apply this adapter on top.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send each prompt as is, unformatted.")] = False,
) -> None:
    """Generate from a model (greedy) to eyeball it. Prompts are formatted as the job trained:
    the run's format (job.yaml beside an sft-job output), else the model's chat template."""
    from sft_job.finish.evaluate import generate_cli

    generate_cli(model, prompt, max_new_tokens=max_new_tokens, adapter=adapter, raw=raw)


@app.command()
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


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option("--markdown", help="A Markdown field reference.")] = False,
) -> None:
    """Print the JSON schema of a job spec (or its Markdown reference, docs/spec.md)."""
    from sft_job.spec import json_schema, markdown_reference

    typer.echo(markdown_reference() if markdown else json.dumps(json_schema(), indent=2), nl=False)
    typer.echo("")


def _add_data_commands() -> None:
    from sft_job.synth.commands import data_app

    app.add_typer(data_app, name="data", help="Make and convert training data.")


with contextlib.suppress(ImportError):  # the synth package is optional while it is being built
    _add_data_commands()


def main() -> None:
    """Console entrypoint: the one error boundary of the program."""
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except SftJobError as err:
        if os.environ.get("SFT_JOB_DEBUG"):
            raise
        msg = str(err).replace("\n", " ")
        typer.echo(f"error: {msg}", err=True)
        if err.exit_code == EXIT_RETRY:
            # preempted: the checkpoint is committed; don't spend the grace period on
            # interpreter teardown (seconds of garbage collection with a model in memory)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_RETRY)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as err:
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):
            # click's usage errors (bad option, missing argument; typer vendors click, so match
            # by shape): one line and exit 2 instead of a boxed usage screen
            msg = err.format_message()
            if msg:  # empty when the help screen was the answer (no arguments at all)
                typer.echo(f"error: {msg} (see sft-job --help)", err=True)
            sys.exit(err.exit_code)
        if type(err).__name__ == "Abort":
            typer.echo("error: aborted", err=True)
            sys.exit(130)
        import traceback

        traceback.print_exc()
        typer.echo("error: unexpected failure (a bug): please report it with the traceback above",
                   err=True)
        sys.exit(EXIT_BUG)
