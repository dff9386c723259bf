"""The typer application and the argument types its commands share."""

from __future__ import annotations

from typing import Annotated

import typer

from sft_job import __version__

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
