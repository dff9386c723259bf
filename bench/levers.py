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
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

VARIANTS = {"base": ("fp32", "trl", 0.05), "+head": ("fp32", "trained", 0.05),
            "+bf16": ("bf16", "trl", 0.05), "+head+bf16": ("bf16", "trained", 0.05),
            "+head+bf16-d0": ("bf16", "trained", 0.0)}


def trainer_for(variant: str, data: Path, work: Path, args: argparse.Namespace) -> Any:
    from sft_job.data import build as build_data
    from sft_job.models.load import load_model, load_tokenizer
    from sft_job.models.source import resolve_model_dir
    from sft_job.spec import JobSpec
    from sft_job.train.backends import model_attn, resolve
    from sft_job.train.trainer import build_trainer

    prec, head, dropout = VARIANTS[variant]
    spec = JobSpec.model_validate({
        "name": "levers", "model": {"base": args.model}, "backend": "cpu",
        "data": {"train": str(data), "format": "alpaca", "max_length": args.max_length,
                 "eval_fraction": 0.0},
        "method": {"kind": "lora", "dropout": dropout, "target_modules": "all-linear"},
        "train": {"max_steps": 100, "batch_size": args.batch, "precision": prec, "seed": 0},
        "output": {"uri": str(work / "out")}})
    backend = dataclasses.replace(resolve(spec), lm_head=head)
    mdir = resolve_model_dir(spec.model.base)
    tok = load_tokenizer(spec.model, mdir, need_chat_template=False)
    bundle = build_data(spec.data, tok, work / "data")
    model = load_model(spec.model, spec.method, mdir, backend.torch_dtype(),
                       model_attn(mdir, backend.attn, spec.data.max_length))
    trainer = build_trainer(spec, backend, model, tok, bundle, work / "trainer", []).trainer
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
    import torch

    torch.set_num_threads(1)
    from sft_job.pipeline import setup_logging

    setup_logging()
    import logging

    logging.getLogger("sft_job").setLevel(logging.WARNING)
    info = c.machine()
    c.print_machine(info)
    from sft_job.models.load import load_tokenizer
    from sft_job.models.source import resolve_model_dir
    from sft_job.spec import ModelSpec

    tok = load_tokenizer(ModelSpec(base=args.model), resolve_model_dir(args.model), False)
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
