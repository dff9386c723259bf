"""The `sft-job` command line: parse arguments, dispatch, and map errors to exit codes.

    sft-job run jobs/smoke-cpu.yaml --set train.epochs=1

The commands live in job.py (run, validate, status, schema), model.py (merge, generate) and
data.py (data synth, data convert). This package is the only place that imports typer and the
only one that exits the process. Heavy libraries (torch, transformers, trl, peft) are imported
inside the commands that use them so `--help` and `validate` stay fast.
"""

from __future__ import annotations

import os
import sys

import typer

from sft_job.cli import job, model
from sft_job.cli.app import app
from sft_job.cli.data import data_app
from sft_job.errors import EXIT_BUG, EXIT_RETRY, SftJobError

__all__ = ["app", "main"]

for _command in (job.run, job.validate, model.merge, model.generate, job.status, job.schema):
    app.command()(_command)  # in this order in `sft-job --help`
app.add_typer(data_app, name="data", help="Make and convert training data.")


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
    except typer.TyperException as err:
        # usage errors (bad option, missing argument; typer's click exceptions derive from
        # it): one line and exit 2 instead of a boxed usage screen
        msg = err.format_message()
        if msg:  # empty when the help screen was the answer (no arguments at all)
            typer.echo(f"error: {msg} (see sft-job --help)", err=True)
        sys.exit(err.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        typer.echo("error: unexpected failure (a bug): please report it with the traceback above",
                   err=True)
        sys.exit(EXIT_BUG)
