"""Evaluation: eval loss and perplexity, and greedy generations for the before/after samples."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of each prompt (special tokens kept out of the text)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    outs = []
    with torch.no_grad():
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt").to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 use_cache=True, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
            new = ids[0, enc["input_ids"].shape[1]:]
            outs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return outs


def perplexity(loss: float | None) -> float | None:
    """exp(loss), or None when there is no loss (or it overflows)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def sample_prompts(eval_prompts: list[str] | None, examples: list[Any], n: int,
                   fmt: str, data_spec: Any, tokenizer: Any) -> list[tuple[str, str]]:
    """(label, prompt text) pairs: eval.prompts formatted like the data, else the first rows."""
    from sft_job.data.formats import prompt_for

    if eval_prompts:
        return [(p, prompt_for(p, fmt, data_spec, tokenizer)) for p in eval_prompts]
    out = []
    for ex in examples[:n]:
        prompt = ex.prompt or "".join(t for t, _ in ex.segments)[:60]
        out.append((ex.source, prompt))
    return out


def samples_markdown(pairs: list[tuple[str, str]], before: list[str], after: list[str]) -> str:
    """samples.md: the same prompts before and after training, side by side."""
    lines = ["# Samples before and after fine-tuning", "",
             "Greedy decoding, same prompts, same settings.", ""]
    for i, ((label, prompt), b, a) in enumerate(zip(pairs, before, after, strict=True), 1):
        lines += [f"## {i}. {label}", "", "**Prompt**", "", "```", prompt, "```", "",
                  "**Before**", "", "```", b or "(empty)", "```", "",
                  "**After**", "", "```", a or "(empty)", "```", ""]
    return "\n".join(lines)


def generate_cli(model_uri: str, prompts: list[str], max_new_tokens: int,
                 adapter: str | None) -> None:
    """`sft-job generate`: load a model (and adapter) from a folder or URI and print completions."""
    import tempfile

    import typer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_job.models.load import resolve_model_dir

    model_dir = resolve_model_dir(model_uri)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        from sft_job.data.load import fetch

        adapter_dir = fetch(adapter, Path(tempfile.mkdtemp(prefix="sft-job-")))
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    for p, out in zip(prompts, generate(model, tok, prompts, max_new_tokens), strict=True):
        typer.echo(f"### {p}\n{out}\n")
