"""Each speed lever alone and together at the step level: the CPU seconds of one optimizer
step (forward + backward + AdamW) of the job's trainer on the same batch, variants interleaved.

    nice .venv/bin/python bench/levers.py --rounds 3          # SmolLM2-135M LoRA, 2 x 512 tokens

Variants (the job's code, CPU backend, varlen_sdpa): `base` (fp32, TRL's LM head, LoRA
dropout 0.05: the job before issue 19), `+head` (the LM head over trained positions),
`+bf16` (bf16 autocast), `+head+bf16` (the job's defaults on a CPU with native bf16),
`+head+bf16-d0` (and LoRA dropout 0). Each round runs every variant once, in a rotated order;
the median over rounds is printed with min/max and the ratios to `base`. Quicker than
throughput.py on a loaded machine (no epoch, no eval), and blind to data-loading costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

if TYPE_CHECKING:
    from sft_job.train.backends import LmHead

# variant -> train.precision, LM head, method.dropout
VARIANTS: dict[str, tuple[str, LmHead, float]] = {
    "base": ("fp32", "trl", 0.05), "+head": ("fp32", "trained", 0.05),
    "+bf16": ("bf16", "trl", 0.05), "+head+bf16": ("bf16", "trained", 0.05),
    "+head+bf16-d0": ("bf16", "trained", 0.0)}


def trainer_for(variant: str, data: Path, work: Path, args: argparse.Namespace) -> Any:
    """The job's trainer (sft_job.prepare.assemble + trainer_for) for `variant`, its
    optimizer made and one batch ready."""
    from sft_job import prepare
    from sft_job.spec import JobSpec

    prec, head, dropout = VARIANTS[variant]
    spec = JobSpec.model_validate({
        "name": "levers", "model": {"base": args.model}, "backend": "cpu",
        "data": {"train": str(data), "format": "alpaca", "max_length": args.max_length,
                 "eval_fraction": 0.0},
        "method": {"kind": "lora", "dropout": dropout, "target_modules": "all-linear"},
        "train": {"max_steps": 100, "batch_size": args.batch, "precision": prec, "seed": 0},
        "output": {"uri": str(work / "out")}})
    job = prepare.assemble(spec, work / "data", lm_head=head)
    trainer = prepare.trainer_for(job, work / "trainer").trainer
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by train()'s loop otherwise
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return trainer, batch


def step(trainer: Any, batch: dict[str, Any]) -> float:
    t0 = time.process_time()
    trainer.model.train()
    with trainer.accelerator.autocast():
        trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step")
    args = ap.parse_args()
    c.start(1)
    from sft_job.prepare import model_files
    from sft_job.spec import ModelSpec

    _, tok = model_files(ModelSpec(base=args.model))
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        data = c.write_jsonl(Path(tmp) / "train.jsonl", c.alpaca_rows(200, seed=1, tokenizer=tok))
        built = {v: trainer_for(v, data, Path(tmp) / v.strip("+"), args) for v in args.variants}
        tokens = int(next(iter(built.values()))[1]["input_ids"].numel())
        for tr, b in built.values():
            step(tr, b)  # warm-up, not timed
        for r in range(args.rounds):
            k = r % len(args.variants)
            for v in args.variants[k:] + args.variants[:k]:
                times[v].append(step(*built[v]))
                print(f"  round {r + 1} {v}: {times[v][-1]:.2f} CPU-s", flush=True)
    print(f"\n{args.model} LoRA, {tokens} tokens per step, load avg at end "
          f"{[round(x, 2) for x in __import__('os').getloadavg()]}")
    base = statistics.median(times[args.variants[0]])
    print(c.table(["variant", "CPU-s per step (min / median / max)", f"speed vs {args.variants[0]}"],
                  [[v, c.spread(t), f"{base / statistics.median(t):.2f}x"] for v, t in times.items()]))


if __name__ == "__main__":
    main()
