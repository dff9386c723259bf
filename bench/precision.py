"""Eval loss of bf16 autocast vs fp32 (and LoRA dropout on/off) on the real model, over seeds.

    nice .venv/bin/python bench/precision.py --seeds 0,1,2 --json prec.json     # ~1-2 h here

The job's own assembly (sft_job.prepare.assemble + trainer_for, CPU backend, LM head over
trained positions) trains builtin:smollm2-135m with LoRA for --steps optimizer
steps on Alpaca-like examples, once per arm and seed; arms differ only in train.precision and
method.dropout. Every trained adapter is then scored by one function in fp32 on the same
held-out examples: sum of the per-token NLL of the response tokens / their number
(sft_job.train.loss.token_nll). bf16 may become the CPU default only if its mean eval loss
lies within the fp32 runs' seed-to-seed spread (min..max). Results go to --json after every
run, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

ARMS = {"fp32": ("fp32", 0.05), "bf16": ("bf16", 0.05), "bf16-d0": ("bf16", 0.0),
        "fp32-d0": ("fp32", 0.0)}


def spec_for(data: Path, out: Path, args: argparse.Namespace, arm: str, seed: int) -> Any:
    from sft_job.spec import JobSpec

    prec, dropout = ARMS[arm]
    return JobSpec.model_validate({
        "name": "bench-precision",
        "model": {"base": args.model},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                 "format": "alpaca", "max_length": args.max_length, "packing": True,
                 "seed": seed},
        "method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": dropout,
                   "target_modules": "all-linear"},
        "train": {"max_steps": args.steps, "learning_rate": args.lr, "batch_size": args.batch,
                  "lr_scheduler": "cosine", "warmup_ratio": 0.05, "logging_steps": 10,
                  "seed": seed, "precision": prec},
        "backend": "cpu",
        "output": {"uri": str(out)},
    })


def train_one(data: Path, work: Path, args: argparse.Namespace, arm: str, seed: int) -> dict:
    import torch

    from sft_job.prepare import assemble, trainer_for
    from sft_job.train.trainer import precision

    job = assemble(spec_for(data, work / "out", args, arm, seed), work / "data")
    tok, bundle = job.tokenizer, job.bundle
    built = trainer_for(job, work / "trainer")
    trainer = built.trainer
    assert precision(trainer) == ARMS[arm][0]
    torch.manual_seed(seed)
    w0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ev = eval_loss(trainer.model, bundle.eval.to_list(), tok.pad_token_id)  # Arrow -> rows
    return {"arm": arm, "seed": seed, "steps": trainer.state.global_step,
            "train_loss_mean": out.training_loss, "train_loss_last": losses[-1],
            "eval_loss": ev, "wall_s": wall, "cpu_s": cpu,
            "tokens": built.collator.tokens, "lm_head": built.lm_head,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def eval_loss(model: Any, rows: list[dict], pad_id: int, batch: int = 8) -> float:
    """Token-weighted NLL of the trained (response) tokens, fp32, samples padded per batch."""
    import torch

    from sft_job.train.loss import token_nll

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids, mask, lab = c.padded(rows[i:i + batch], pad_id)
            s, k = token_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": lab})
            total, count = total + float(s), count + int(k)
    return total / count


def summarize(results: list[dict]) -> dict[str, Any]:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["arm"], []).append(r)
    rows, out = [], {}
    for arm, rs in by.items():
        ev = [r["eval_loss"] for r in rs]
        tps = [r["tokens"] / r["cpu_s"] for r in rs]
        out[arm] = {"eval": ev, "mean": statistics.mean(ev), "tok_per_cpu_s": tps}
        rows.append([arm, len(rs), f"{statistics.mean(ev):.4f}", c.spread(ev),
                     f"{max(ev) - min(ev):.4f}", c.spread(tps)])
    print(c.table(["arm", "seeds", "eval loss mean", "min / median / max", "spread",
                   "tokens/CPU-s"], rows))
    base = out.get("fp32")
    if base and len(base["eval"]) > 1:
        lo, hi = min(base["eval"]), max(base["eval"])
        for arm, v in out.items():
            if arm != "fp32":
                inside = lo <= v["mean"] <= hi
                print(f"{arm}: mean {v['mean']:.4f} vs fp32 seed range [{lo:.4f}, {hi:.4f}] "
                      f"({v['mean'] - base['mean']:+.4f}): {'within' if inside else 'OUTSIDE'}")
                v["within_fp32_spread"] = inside
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--arms", default="fp32,bf16,bf16-d0", type=lambda s: s.split(","))
    ap.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per step")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="results file (rewritten after every run)")
    args = ap.parse_args()
    info = c.start(args.threads)
    from sft_job.prepare import model_files
    from sft_job.spec import ModelSpec

    _, tok = model_files(ModelSpec(base=args.model))
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-prec-") as tmp:
        data = Path(tmp) / "data"
        c.write_jsonl(data / "train.jsonl", c.alpaca_rows(args.examples, seed=1, tokenizer=tok))
        c.write_jsonl(data / "eval.jsonl", c.alpaca_rows(args.eval_examples, seed=2, tokenizer=tok))
        for seed in args.seeds:
            k = args.seeds.index(seed) % len(args.arms)
            for arm in args.arms[k:] + args.arms[:k]:  # interleaved, rotated per seed
                r = train_one(data, Path(tmp) / f"{arm}-{seed}", args, arm, seed)
                results.append(r)
                print(json.dumps(r), flush=True)
                c.write_json(args.json, {"machine": info, "args": vars(args), "runs": results})
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(results)
    c.write_json(args.json, {"machine": info, "args": vars(args), "runs": results,
                             "summary": summary})


if __name__ == "__main__":
    main()
