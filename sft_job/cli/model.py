"""Model commands: `merge` (an adapter into its base, shard by shard) and `generate`.

    sft-job generate out/demo/model "What is the capital of France?"
"""

from __future__ import annotations

from typing import Annotated

import typer


def merge(
    base: Annotated[str, typer.Argument(help="Base model (same kinds as model.base).")],
    adapter: Annotated[str, typer.Argument(help="PEFT adapter folder or URI.")],
    out: Annotated[str, typer.Argument(help="Where the merged model goes (path or URI).")],
) -> None:
    """Merge a LoRA adapter into its base model, shard by shard, and save safetensors."""
    from sft_job.finish.merge import merge_to

    merge_to(base, adapter, out)
    typer.echo(f"merged model written to {out}")


def generate(
    model: Annotated[str, typer.Argument(help="Model folder or URI (merged or base).")],
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, max=32_768, help="Tokens to generate.")] = 64,
    adapter: Annotated[str | None, typer.Option(help="Apply this adapter on top.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send each prompt as is, unformatted.")] = False,
) -> None:
    """Generate from a model (greedy) to eyeball it. Prompts are formatted as the job trained:
    the run's format (job.yaml beside an sft-job output), else the model's chat template."""
    import sys

    from sft_job.finish.evaluate import Generation
    from sft_job.pipeline import setup_logging

    setup_logging()
    gen = Generation.prepare(model, prompt, adapter=adapter, raw=raw)
    typer.echo(f"prompts formatted {gen.how}", err=True)
    for p, out in zip(prompt, gen.outputs(max_new_tokens), strict=True):
        typer.echo(f"### {p}\n{out}\n")
    sys.stdout.flush()
