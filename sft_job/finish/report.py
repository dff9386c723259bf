"""Run reports: the loss curve PNG, summary.json, the model card and the end-of-run screen."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sft_job.spec import JobSpec, dump_spec


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_plot(metrics: list[dict[str, Any]], out: Path) -> None:
    """loss.png: training loss per logged step, eval loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def model_card(spec: JobSpec, summary: dict[str, Any], samples_md: str) -> str:
    """README.md for the model folder / Hub repo."""
    m = spec.method
    front = ["---", "library_name: transformers"]
    if not spec.model.base.startswith("builtin:"):
        front.append(f"base_model: {spec.model.base.removeprefix('hf://')}")
    lines = [
        *front,
        "tags: [sft, sft-job" + (", lora" if m.kind != "full" else "") + "]",
        "---",
        "",
        f"# {spec.name}",
        "",
        f"Fine-tuned from `{spec.model.base}` with sft-job ({m.kind}"
        + (f", r={m.r}, alpha={m.alpha}, targets={m.target_modules}" if m.kind != "full" else "")
        + ").",
        "",
        "## Data",
        "",
        f"- train: `{spec.data.train}` ({summary.get('data', {}).get('format')} format, "
        f"{summary.get('data', {}).get('train_examples')} examples)",
        f"- eval: `{spec.data.eval or f'{spec.data.eval_fraction:.0%} of train'}`",
        f"- max_length {spec.data.max_length}, packing {spec.data.packing}, "
        f"loss on {'all tokens' if spec.data.train_on_prompt else 'responses only'}",
        "",
        "## Hyperparameters",
        "",
        "```yaml",
        dump_spec(spec).strip(),
        "```",
        "",
        "## Results",
        "",
        f"- train loss: {_f(summary.get('train_loss'))} (last logged steps), "
        f"{_f(summary.get('train_loss_mean'))} (mean over the run)",
        f"- eval loss per trained token: {_before_after(summary)} (base model -> fine-tuned), "
        f"perplexity {_f(summary.get('eval_perplexity'), 2)}",
        f"- steps: {summary.get('steps')}, tokens/s: {summary.get('tokens_per_s')}",
        "",
        samples_md.replace("# Samples", "## Samples", 1),
    ]
    return "\n".join(lines)


def end_screen(summary: dict[str, Any], output_uri: str) -> str:
    """The one-screen summary printed at the end of a run."""
    rows = [
        ("output", output_uri),
        ("model", summary.get("model_uri") or "-"),
        ("adapter", summary.get("adapter_uri") or "-"),
        ("steps", summary.get("steps")),
        ("train loss", f"{_f(summary.get('train_loss'))} last logged steps, "
                       f"{_f(summary.get('train_loss_mean'))} mean"),
        ("eval loss", f"{_before_after(summary)} (base -> fine-tuned, per trained token)"),
        ("eval perplexity", _f(summary.get("eval_perplexity"), 2)),
        ("tokens/s", summary.get("tokens_per_s")),
        ("packing efficiency", summary.get("packing_efficiency")),
        ("wall time (s)", summary.get("wall_s")),
    ]
    if summary.get("hub_repo"):
        rows.append(("hub", summary["hub_repo"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "=" * 60, " sft-job: done", "=" * 60]
                     + [f" {k:<{width}}  {v}" for k, v in rows] + ["=" * 60])


def _f(v: Any, digits: int = 4) -> str:
    """A number for people: fixed digits, '-' when absent."""
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, (int, float)) else str(v)


def _before_after(summary: dict[str, Any]) -> str:
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss")
    return f"{_f(before)} -> {_f(after)}" if before is not None else _f(after)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
