"""Packing efficiency (useful tokens / token slots) and, with --cost, the CPU training cost per
useful token of each way of batching the same examples.

    nice .venv/bin/python bench/packing.py              # efficiencies + summary.json check (~2 min)
    nice .venv/bin/python bench/packing.py --cost       # + cost per token of each batching (~10 min)

Efficiency is measured on the batches the real collators build, in the order the Trainer's
random sampler feeds them (batch 8), on Alpaca-like examples (bench/_common.py):
  pad-longest   DataCollatorForLanguageModeling(mlm=False), padded to the longest of 8
  pad-512       the same, padded to 512
  grouped       the same, with HF's length-grouped sampler (Trainer train_sampling_strategy
                group_by_length): batches of similar lengths, no packing
  packed xB     sft_job.data.tokenize.pack (TRL BFD into 512-token rows) + the job's
                PackedCollator, B rows per batch ([B, longest row], sdpa with a block-diagonal
                mask; the job's layout for models without varlen_sdpa support)
  flattened x2  the same rows flattened into one padding-free row: the job's CPU default,
                trained with varlen_sdpa (per-sample sdpa); --cost also times it with plain
                sdpa, whose block-diagonal mask over the whole row is quadratic
and compared with sft_job.data.tokenize.slot_efficiency, the estimate the job writes to
summary.json (`packing_efficiency`, `efficiency_by_mode`); the smoke job is then run for two
steps to show the figures in its summary.json (skip with --no-job).
--cost trains the random ~20M Llama for a few steps on each batching (fwd + bwd + AdamW, one
thread, process CPU time) and prints useful tokens per CPU-second; it also tries PyTorch flex
attention (block-sparse masks) and reports why it cannot train on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

BATCH = 8
MAX_LEN = 512


def tokenized(n: int, tok: Any) -> list[dict[str, list[int]]]:
    """Alpaca-like examples through the job's own formatting and tokenization."""
    from sft_job.data.formats import to_example
    from sft_job.data.load import Record
    from sft_job.data.tokenize import tokenize_all
    from sft_job.spec import DataSpec

    spec = DataSpec(train="x", format="alpaca", max_length=MAX_LEN)
    rows = c.alpaca_rows(n, seed=1, tokenizer=tok)
    examples = [to_example(Record(r, f"row{i}"), "alpaca", spec, tok) for i, r in enumerate(rows)]
    out, _ = tokenize_all(examples, tok, MAX_LEN)
    return out


def batchings(rows: list[dict[str, list[int]]], tok: Any, seed: int = 0
              ) -> dict[str, list[dict[str, Any]]]:
    """Every batching's collated batches, in sampler order."""
    import torch
    from transformers import DataCollatorForLanguageModeling
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from sft_job.data.tokenize import make_collator, pack

    plain = [{"input_ids": r["input_ids"]} for r in rows]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    g = torch.Generator().manual_seed(seed)
    grouped = list(LengthGroupedSampler(BATCH, lengths=[len(r["input_ids"]) for r in rows],
                                        generator=g))
    longest = DataCollatorForLanguageModeling(tok, mlm=False)
    to512 = DataCollatorForLanguageModeling(tok, mlm=False, pad_to_multiple_of=MAX_LEN)
    packed = pack(rows, MAX_LEN)
    prow = list(range(len(packed)))
    random.Random(seed).shuffle(prow)
    pcol = make_collator(tok.pad_token_id, packing=True, flatten=False)
    flat = make_collator(tok.pad_token_id, packing=True, flatten=True)

    def chunks(idx: list[int], src: list[dict[str, Any]], col: Any, b: int) -> list[Any]:
        out = []
        for k in range(0, len(idx), b):
            part = [src[i] for i in idx[k:k + b]]
            batch = col(part)
            batch["_useful"] = sum(len(r["input_ids"]) for r in part)
            out.append(batch)
        return out

    return {
        "pad-longest": chunks(order, plain, longest, BATCH),
        "pad-512": chunks(order, plain, to512, BATCH),
        "grouped": chunks(grouped, plain, longest, BATCH),
        "packed x8": chunks(prow, packed, pcol, 8),
        "packed x2": chunks(prow, packed, pcol, 2),
        "flattened x2": chunks(prow, packed, flat, 2),  # the job's CPU default (varlen_sdpa)
    }


def efficiency(batches: list[dict[str, Any]], useful: int) -> float:
    return useful / sum(int(b["input_ids"].numel()) for b in batches)


def efficiency_table(rows: list[dict[str, list[int]]], tok: Any) -> dict[str, Any]:
    from sft_job.data.tokenize import slot_efficiency

    lengths = [len(r["input_ids"]) for r in rows]
    useful = sum(lengths)
    b = batchings(rows, tok)
    measured = {k: efficiency(v, useful) for k, v in b.items()}
    logged = {m: slot_efficiency(lengths, BATCH, MAX_LEN, m) for m in ("longest", "max", "packed")}
    print(c.table(
        ["batching (batch 8 unless xB)", "batches", "useful / slots", "vs pad-longest",
         "summary.json estimate"],
        [[k, len(b[k]), f"{v:.3f}", f"{v / measured['pad-longest']:.2f}x",
          {"pad-longest": f"{logged['longest']:.3f} (longest)", "pad-512": f"{logged['max']:.3f} (max)",
           "packed x8": f"{logged['packed']:.3f} (packed)"}.get(k, "")]
         for k, v in measured.items()]))
    return {"measured": measured, "summary_estimate": logged, "batches": {k: len(v) for k, v in b.items()}}


def check_summary(tmp: Path) -> dict[str, Any]:
    """Run the smoke job for two steps and read the efficiency figures of its summary.json."""
    out = tmp / "smoke-out"
    env = {**os.environ, "SFT_JOB_WORKDIR": str(tmp / "work"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sft_job", "run", str(c.REPO / "jobs" / "smoke-cpu.yaml"),
           "--set", f"output.uri={out}", "--set", "train.max_steps=2",
           "--set", "eval.num_samples=0"]
    print("$ " + " ".join(cmd[2:]), flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=c.REPO)
    if p.returncode:
        sys.exit(f"smoke job failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads((out / "metrics" / "summary.json").read_text())
    keys = {k: summary.get(k) for k in ("packing_efficiency", "efficiency_by_mode")}
    print(f"summary.json: {json.dumps(keys)}")
    if summary.get("packing_efficiency") is None or not summary.get("efficiency_by_mode"):
        sys.exit("summary.json lacks packing_efficiency / efficiency_by_mode")
    return keys


def cost_table(rows: list[dict[str, list[int]]], tok: Any, n: int, steps512: int) -> dict[str, Any]:
    """Useful tokens per CPU-second of training on each batching of the first `n` examples."""
    import torch
    from transformers import AutoModelForCausalLM

    sub = rows[:n]
    useful = sum(len(r["input_ids"]) for r in sub)
    mdir = c.model_dir("llama-20m")
    b = batchings(sub, tok)
    from sft_job.train import varlen

    b["pad-512"] = b["pad-512"][:steps512]  # same cost per slot all along: a few steps do
    b["flattened x2, sdpa mask"] = b["flattened x2"]  # TRL's flattened row without varlen kernels
    attn = {"flattened x2": varlen.register()}
    out: dict[str, Any] = {}
    for name, batches in b.items():
        model = AutoModelForCausalLM.from_pretrained(str(mdir), attn_implementation=attn.get(name, "sdpa"),
                                                     dtype=torch.float32)
        model.config.use_cache = False
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        _step(model, opt, batches[0])  # first-use costs out of the timing
        tokens = sum(x["_useful"] for x in batches[1:])
        with c.Clock() as clk:
            for x in batches[1:]:
                _step(model, opt, x)
        out[name] = {"useful_per_cpu_s": tokens / clk.cpu, "useful_per_s": tokens / clk.wall,
                     "steps": len(batches) - 1, "cpu_s": clk.cpu}
        print(f"  {name}: {tokens} useful tokens in {clk.cpu:.1f} CPU-s "
              f"({tokens / clk.cpu:.0f}/CPU-s)", flush=True)
    out["flex_attention"] = _try_flex(mdir, b["packed x2"][0])
    base = out["pad-longest"]["useful_per_cpu_s"]
    print(f"\ncost per useful token, {n} examples ({useful} useful tokens), 1 thread")
    print(c.table(["batching", "timed steps", "useful tok/CPU-s", "vs pad-longest"],
                  [[k, v["steps"], f"{v['useful_per_cpu_s']:.0f}", f"{v['useful_per_cpu_s'] / base:.2f}x"]
                   for k, v in out.items() if isinstance(v, dict)]))
    print(f"flex attention (block-sparse mask): {out['flex_attention']}")
    return out


def _step(model: Any, opt: Any, batch: dict[str, Any]) -> None:
    out = model(**{k: v for k, v in batch.items() if not k.startswith("_")})
    out.loss.backward()
    opt.step()
    opt.zero_grad()


def _try_flex(mdir: Path, batch: dict[str, Any]) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(mdir), attn_implementation="flex_attention",
                                                     dtype=torch.float32)
        _step(model, torch.optim.AdamW(model.parameters()), batch)
    except Exception as e:  # what flex attention says on this machine, verbatim
        return f"cannot train here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return "trained one step (unexpected on CPU: measure it)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--cost", action="store_true", help="also time training on each batching")
    ap.add_argument("--cost-examples", type=int, default=240)
    ap.add_argument("--cost-512-steps", type=int, default=4)
    ap.add_argument("--no-job", action="store_true", help="skip the smoke job's summary.json check")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    info = c.machine()
    c.print_machine(info)
    tok = AutoTokenizer.from_pretrained(str(c.model_dir("llama-20m")))
    rows = tokenized(args.examples, tok)
    lengths = [len(r["input_ids"]) for r in rows]
    prompt = [sum(1 for x in r["labels"] if x == -100) for r in rows]
    stats = c.length_stats(prompt, [n - p for n, p in zip(lengths, prompt, strict=True)])
    print(f"{len(rows)} Alpaca-like examples, tokens: {stats}\n")
    doc: dict[str, Any] = {"machine": info, "data": stats, "efficiency": efficiency_table(rows, tok)}
    if not args.no_job:
        with tempfile.TemporaryDirectory(prefix="bench-pack-") as tmp:
            doc["summary_json"] = check_summary(Path(tmp))
    if args.cost:
        print()
        doc["cost"] = cost_table(rows, tok, args.cost_examples, args.cost_512_steps)
    c.write_json(args.json, doc)


if __name__ == "__main__":
    main()
