"""Evaluation for the report: perplexity, greedy generations for the before/after samples, and
the model and prompts of `sft-job generate` (its command is sft_job/cli/model.py). The eval
loss itself is train/evaluate.py (the trainer's callback runs it too)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
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
    from sft_job.data.tokenize import adds_bos

    with torch.no_grad():
        for p in prompts:
            enc = tokenizer(p, return_tensors="pt", add_special_tokens=adds_bos(tokenizer, p)
                            ).to(device)
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


@dataclass
class Generation:
    """`sft-job generate`: a model (and adapter) from a folder or URI, and the prompts
    formatted the way the job trained (see `training_format`)."""

    model_uri: str
    model_dir: Path
    adapter: str | None
    adapter_dir: Path | None
    tokenizer: Any
    texts: list[str]
    how: str  # how the prompts were formatted, for the user

    @classmethod
    def prepare(cls, model_uri: str, prompts: list[str], adapter: str | None = None,
                raw: bool = False) -> Generation:
        """Fetch the model (and adapter), load the tokenizer (the adapter's when it has one:
        the run's) and format the prompts; no weights are loaded yet."""
        import tempfile

        from transformers import AutoTokenizer

        from sft_job.data.formats import prompt_for
        from sft_job.data.load import fetch
        from sft_job.models.load import loading
        from sft_job.models.source import resolve_model_dir

        model_dir = resolve_model_dir(model_uri)
        with loading("model", f"the tokenizer of {model_uri}"):
            tok = AutoTokenizer.from_pretrained(model_dir)
        adapter_dir = None
        if adapter:
            adapter_dir = fetch(adapter, Path(tempfile.mkdtemp(prefix="sft-job-")))
            if (adapter_dir / "tokenizer_config.json").is_file():  # the run's tokenizer
                with loading("--adapter", f"the tokenizer of {adapter}"):
                    tok = AutoTokenizer.from_pretrained(adapter_dir)
        fmt, data_spec, how = ("text", None, "as given (--raw)") if raw else \
            training_format(adapter or model_uri, tok)
        texts = [p if data_spec is None else prompt_for(p, fmt, data_spec, tok) for p in prompts]
        return cls(model_uri, model_dir, adapter, adapter_dir, tok, texts, how)

    def outputs(self, max_new_tokens: int) -> list[str]:
        """Load the weights (and the adapter on top) and complete every prompt greedily."""
        from transformers import AutoModelForCausalLM

        from sft_job.models.load import loading

        with loading("model", self.model_uri):
            model = AutoModelForCausalLM.from_pretrained(self.model_dir)
        if self.adapter_dir is not None:
            from peft import PeftModel

            with loading("--adapter", f"{self.adapter} onto {self.model_uri} (is it for this "
                         "model?)"):
                model = PeftModel.from_pretrained(model, str(self.adapter_dir))
        return generate(model, self.tokenizer, self.texts, max_new_tokens)


def training_format(uri: str, tokenizer: Any) -> tuple[str, Any, str]:
    """(format, DataSpec, description) to render a prompt as training did: the run's format
    from job.yaml and metrics/summary.json beside the model folder (an sft-job output), else
    the model's chat template, else the text as given."""
    import yaml

    from sft_job import storage
    from sft_job.errors import SftJobError
    from sft_job.spec import DataSpec

    root = uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."
    try:
        job = yaml.safe_load(storage.read_text(storage.join(root, "job.yaml")))
        summary = json.loads(storage.read_text(storage.join(root, "metrics/summary.json")))
        data = summary.get("data", {})
        spec = DataSpec(**{**job["data"], "template": data.get("template") or "auto"})
        fmt = data.get("format") or spec.format
        return fmt, spec, f"as the run in {root} trained ({fmt} format, job.yaml)"
    except (SftJobError, OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        pass
    if getattr(tokenizer, "chat_template", None):
        return "chat", DataSpec(train="-"), "with the model's chat template (--raw: as given)"
    return "text", None, "as given (the model has no chat template and no job.yaml beside it)"
