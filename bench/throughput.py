"""Training throughput: the seeds' recipe against the job's default data path, same run.

    nice .venv/bin/python bench/throughput.py                    # quick: ~5 min idle, ~15 loaded
    nice .venv/bin/python bench/throughput.py --full --json r.json   # the RESULTS.md run

Arms, on the same random Llama (hidden 512), the same Alpaca-like examples (one epoch, the
same examples seen) and the same optimizer settings (AdamW, lr, cosine, warmup, clip, seed):
  seed-longest  HF Trainer + DataCollatorForLanguageModeling(mlm=False), batch 8, padded to
                the longest row of each batch (the seeds' recipe; loss on every token)
  seed-512      the same, padded to 512 (pad-to-max-length), run for --max512-steps of the
                same batches in the same order: its per-step losses are checked against
                seed-longest (padding is masked, so they must match) and its eval loss is then
                seed-longest's
  ours          the job's own assembly, sft_job.prepare.assemble + trainer_for: the data
                step (tokenize, completion-only labels, BFD packing into 512-token rows) and
                the job's SFTTrainer (the CPU backend flattens each batch of packed rows into
                one row and runs varlen_sdpa: causal sdpa per sample, no mask, no cross-sample
                attention); every ours-* arm is a spec field or assemble's lm_head
  ours-unpacked the job with data.packing: false: batches of 8 samples, as the seeds' (same
                steps, same examples per step), flattened into one padding-free row and run
                with varlen_sdpa
  ours-rows     (--arms ...,ours-rows) model.attn_implementation: sdpa: the packed rows kept
                as [batch, 512] with plain sdpa and the per-sample block-diagonal mask
                transformers builds (the CPU default before varlen_sdpa)
  ours-prompt   (--arms ...,ours-prompt) ours with data.train_on_prompt: true, the seeds' loss
                on every token: separates the cost of the batching from that of the objective
Useful tokens = the real tokens of the examples (prompt + response + EOS), the same for every
arm; throughput = useful tokens / seconds of trainer.train(), in wall time and in process CPU
time (on a shared machine CPU time moves much less with other people's load). Both trained
models are then scored by one function on the same held-out examples: mean NLL of response
tokens (the SFT objective) and of all tokens.
Fairness: packing puts ~5 examples in a 512-token row, so at the job's default batch of 8 rows
an optimizer step would see ~40 examples and the epoch would have ~5x fewer steps. Here ours
uses the fewest rows per step that hold >= 8 examples on average (--ours-batch auto: 2 rows,
~11 examples), so it makes about as many updates as the seed arm (~0.75x: fewer, never more)
over the same examples; its loss is not helped by extra updates.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

if TYPE_CHECKING:
    from sft_job.train.backends import LmHead

BATCH = 8
MAX_LEN = 512
ARMS = ["seed-longest", "seed-512", "trl-packed", "trl-defaults", "ours", "ours-unpacked",
        "ours-rows", "ours-prompt", "ours-fp32", "ours-trlhead", "ours-base", "ours-d0"]
# the job's arms: train_ours keyword arguments (the job's defaults unless set)
OURS = {"ours": {}, "ours-unpacked": {"packing": False}, "ours-rows": {"attn": "sdpa"},
        "ours-prompt": {"train_on_prompt": True}, "ours-fp32": {"precision": "fp32"},
        "ours-trlhead": {"lm_head": "trl"}, "ours-base": {"precision": "fp32", "lm_head": "trl"},
        "ours-d0": {"dropout": 0.0}}
BASELINES = ["seed-longest", "seed-512", "trl-packed", "trl-defaults"]


def method(args: argparse.Namespace, dropout: float = 0.05) -> dict[str, Any]:
    """Full fine-tuning of the random models; LoRA (the job's default settings, all-linear)
    of a real one."""
    if args.model not in c.REAL_MODELS:
        return {"kind": "full"}
    return {"kind": "lora", "r": 16, "alpha": 32, "dropout": dropout, "target_modules": "all-linear"}


def lora(args: argparse.Namespace, mdir: Path) -> Any:
    """The same PEFT LoraConfig for every baseline arm (None for full fine-tuning); the job's
    arms get theirs from the spec (method())."""
    from transformers import AutoConfig

    from sft_job.models.load import lora_config
    from sft_job.spec import MethodSpec

    config = AutoConfig.from_pretrained(str(mdir))  # all-linear: the config is all it reads
    return lora_config(MethodSpec(**method(args)), SimpleNamespace(config=config))


def job_spec(mdir: Path, data: Path, out: Path, args: argparse.Namespace, seed: int,
             packing: bool, batch: int, train_on_prompt: bool = False, precision: str = "auto",
             dropout: float = 0.05, attn: str = "auto") -> Any:
    from sft_job.spec import JobSpec

    return JobSpec.model_validate({
        "name": "bench-throughput",
        "model": {"base": str(mdir), "attn_implementation": attn},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                 "format": "alpaca", "max_length": MAX_LEN, "packing": packing, "seed": seed,
                 "train_on_prompt": train_on_prompt},
        "method": method(args, dropout),
        "train": {"epochs": 1, "learning_rate": args.lr, "batch_size": batch,
                  "lr_scheduler": "cosine", "warmup_ratio": 0.1, "weight_decay": 0.0,
                  "max_grad_norm": 1.0, "logging_steps": 1, "seed": seed,
                  "precision": precision},
        "backend": "cpu",
        "output": {"uri": str(out)},
    })


class LossLog:
    """Per-step losses, and the clocks from the end of step 1 to the end of training, so the
    first step's one-off costs (allocator, kernels' first use) are left out of every arm."""

    @staticmethod
    def make(stop_after: int | None = None) -> Any:
        import time

        from transformers import TrainerCallback

        class _Log(TrainerCallback):
            def __init__(self) -> None:
                self.losses: list[float] = []
                self.t0 = self.t1 = (0.0, 0.0)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 1:
                    self.t0 = (time.perf_counter(), time.process_time())
                if stop_after and state.global_step >= stop_after:
                    control.should_training_stop = True

            def on_train_end(self, args, state, control, **kw):
                self.t1 = (time.perf_counter(), time.process_time())

        return _Log()


def train_ours(mdir: Path, data: Path, work: Path, args: argparse.Namespace, seed: int,
               batch: int, attn: str = "auto", packing: bool = True,
               train_on_prompt: bool = False, precision: str = "auto",
               lm_head: LmHead | None = None, dropout: float = 0.05) -> dict[str, Any]:
    """The job's assembly (sft_job.prepare.assemble + trainer_for) on this arm's spec."""
    import torch

    from sft_job.prepare import assemble, trainer_for

    spec = job_spec(mdir, data, work / "out", args, seed, packing=packing, batch=batch,
                    train_on_prompt=train_on_prompt, precision=precision, dropout=dropout,
                    attn=attn)
    job = assemble(spec, work / "data", lm_head=lm_head)
    log = LossLog.make()
    built = trainer_for(job, work / "trainer", [log])
    trainer = built.trainer
    collator = trainer.data_collator = _Counting(trainer.data_collator)
    torch.manual_seed(seed)
    trainer.train()
    assert built.collator.tokens == sum(collator.tokens)  # one epoch, every row once
    r = _figures(trainer, collator, log, job.bundle.stats["train_examples"], job.tokenizer)
    r["precision"], r["lm_head"] = precision_of(trainer), built.lm_head
    return r


def precision_of(trainer: Any) -> str:
    from sft_job.train.trainer import precision

    return precision(trainer)


def _figures(trainer: Any, collator: _Counting, log: Any, examples: int, tok: Any) -> dict[str, Any]:
    """Steady-state figures: steps 2..n (the dataloader may collate one batch ahead)."""
    n = trainer.state.global_step
    return {"steps": n, "examples": examples, "tokens": sum(collator.tokens[1:n]),
            "slots": sum(collator.slots[1:n]), "slots_all": sum(collator.slots[:n]),
            "tokens_all": sum(collator.tokens[:n]),
            "wall": log.t1[0] - log.t0[0], "cpu": log.t1[1] - log.t0[1],
            "losses": log.losses, "model": trainer.model, "tok": tok}


class _Counting:
    """Collator wrapper: useful tokens and padded slots of every batch handed out."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.tokens, self.slots = inner, [], []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        self.tokens.append(sum(len(e["input_ids"]) for e in examples))
        self.slots.append(int(batch["input_ids"].numel()))
        return batch


def train_seed(mdir: Path, rows: list[dict[str, list[int]]], work: Path,
               args: argparse.Namespace, seed: int, pad_to: int | None,
               stop_after: int | None) -> dict[str, Any]:
    """The seeds' recipe (bench/_common.seed_trainer), the shared optimizer settings."""
    import torch
    from transformers import TrainingArguments

    targs = TrainingArguments(
        output_dir=str(work / "seed"), per_device_train_batch_size=BATCH, num_train_epochs=1,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
        max_grad_norm=1.0, seed=seed, data_seed=seed, use_cpu=True, report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=1, dataloader_num_workers=0,
        disable_tqdm=True)
    log = LossLog.make(stop_after)
    trainer, collator, tok = c.seed_trainer(mdir, rows, targs, [log], _Counting, pad_to=pad_to,
                                            peft=lora(args, mdir))
    torch.manual_seed(seed)
    trainer.train()
    return _figures(trainer, collator, log, len(rows), tok)


def eval_losses(model: Any, rows: list[dict[str, list[int]]], pad_id: int) -> tuple[float, float]:
    """Mean NLL over response tokens (labels from the job's masking) and over all tokens."""
    import torch
    import torch.nn.functional as F

    model.eval()
    resp = [0.0, 0]
    full = [0.0, 0]
    with torch.no_grad():
        for i in range(0, len(rows), BATCH):
            ids, mask, lab = c.padded(rows[i:i + BATCH], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            m_resp = lab[:, 1:] != -100
            m_all = mask[:, 1:].bool()
            resp[0] += float(nll[m_resp].sum())
            resp[1] += int(m_resp.sum())
            full[0] += float(nll[m_all].sum())
            full[1] += int(m_all.sum())
    return resp[0] / resp[1], full[0] / full[1]


def prepare(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Any, list, list, dict]:
    """Model folder, data files and the tokenized (unpacked) train/eval rows."""
    from transformers import AutoTokenizer

    from sft_job.data import build as build_data

    mdir = c.model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(str(mdir))
    if args.pretrain_examples:
        mdir = pretrained(mdir, tok, args, root)
    data = root / "data"
    c.write_jsonl(data / "train.jsonl", c.alpaca_rows(args.examples, seed=1, tokenizer=tok))
    c.write_jsonl(data / "eval.jsonl", c.alpaca_rows(args.eval_examples, seed=2, tokenizer=tok))
    spec = job_spec(mdir, data, root / "o", args, 42, packing=False, batch=BATCH)
    bundle = build_data(spec.data, tok, root / "prep")
    train, ev = bundle.train.to_list(), bundle.eval.to_list()  # the seed arms take lists
    prompt = [sum(1 for x in r["labels"] if x == -100) for r in train]
    stats = c.length_stats(prompt, [len(r["input_ids"]) - p for r, p in zip(train, prompt,
                                                                          strict=True)])
    stats["truncated"] = bundle.stats["truncated"]
    return mdir, data, tok, train, ev, stats


def pretrained(mdir: Path, tok: Any, args: argparse.Namespace, root: Path) -> Path:
    """The random model after one epoch of plain LM training (every token, the seeds' recipe)
    on --pretrain-examples other generated examples, so every arm starts from a model that
    already knows the language, as SFT does; cached next to the random model."""
    import os
    import tempfile

    from sft_job.data import build as build_data

    d = mdir.parent / f"{mdir.name}-pre{args.pretrain_examples}"
    if (d / "config.json").is_file():
        return d
    src = root / "pretrain"
    c.write_jsonl(src / "train.jsonl", c.alpaca_rows(args.pretrain_examples, seed=3, tokenizer=tok))
    spec = job_spec(mdir, src, root / "po", args, 7, packing=False, batch=BATCH, train_on_prompt=True)
    rows = build_data(spec.data.model_copy(update={"eval": None, "eval_fraction": 0.0}), tok,
                      root / "pprep").train.to_list()
    print(f"pre-training {mdir.name} on {len(rows)} examples (all tokens) ...", flush=True)
    r = train_seed(mdir, rows, root / "pretrain-run", args, 7, None, None)
    tmp = Path(tempfile.mkdtemp(prefix=".pre-", dir=mdir.parent))
    r["model"].save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, d)
    return d


def auto_batch(train: list[dict[str, list[int]]]) -> int:
    """Packed rows per step that hold at least BATCH examples on average (rounded up: ours
    then makes fewer, larger updates than the seed arm, never more)."""
    import math

    from sft_job.data.tokenize import pack

    rows = pack(train, MAX_LEN)
    return max(1, math.ceil(BATCH * len(rows) / len(train)))


def one_run(i: int, args: argparse.Namespace, mdir: Path, data: Path, train: list, ev: list,
            pad_id: int, ours_batch: int, root: Path) -> dict[str, dict[str, Any]]:
    seed = 42 + i
    arms = args.arms
    order = arms[i % len(arms):] + arms[:i % len(arms)]  # rotate: slow spells hit every arm
    out: dict[str, dict[str, Any]] = {}
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    for arm in order:
        work = root / f"run{i}-{arm}"
        print(f"  run {i + 1}: {arm} ...", flush=True)
        # each arm in a fresh process: its peak RSS is its own (freed memory of an earlier arm
        # stays in a process's heap), and no arm warms caches for the next
        with spawn.Pool(1) as pool:
            r = pool.apply(_arm_alone, (arm, i, args, mdir, data, train, ev, pad_id, work, seed,
                                        ours_batch))
        r["tps_wall"], r["tps_cpu"] = r["tokens"] / r["wall"], r["tokens"] / r["cpu"]
        print(f"    {r['steps']} steps, {r['tokens']} useful tokens, {r['wall']:.1f} s wall, "
              f"{r['cpu']:.1f} s CPU: {r['tps_wall']:.1f} tok/s, {r['tps_cpu']:.1f} tok/CPU-s, "
              f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        out[arm] = r
    lo, mx = out["seed-longest"], out["seed-512"]
    k = len(mx["losses"])
    mx["loss_match"] = max(abs(a - b) for a, b in zip(mx["losses"], lo["losses"][:k], strict=True))
    if "eval_resp" not in mx:
        mx["eval_resp"], mx["eval_all"] = lo["eval_resp"], lo["eval_all"]
    return out


def _arm_alone(arm: str, i: int, args: argparse.Namespace, mdir: Path, data: Path, train: list,
               ev: list, pad_id: int, work: Path, seed: int, ours_batch: int) -> dict[str, Any]:
    """One arm of one run in its own process: train, evaluate, and report the process's peak
    resident size (what the arm costs, imports included: the same for every arm)."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    r = _arm(arm, i, args, mdir, data, train, work, seed, ours_batch)
    if arm != "seed-512" or not args.max512_steps:
        r["eval_resp"], r["eval_all"] = eval_losses(r["model"], ev, pad_id)
    del r["model"], r["tok"]
    r["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return r


def _arm(arm: str, i: int, args: argparse.Namespace, mdir: Path, data: Path, train: list,
         work: Path, seed: int, ours_batch: int) -> dict[str, Any]:
    """Train one arm of one run."""
    if arm in OURS:
        return train_ours(mdir, data, work, args, seed,
                          BATCH if arm == "ours-unpacked" else ours_batch, **OURS[arm])
    if arm.startswith("trl"):
        from _peers import train_trl

        return train_trl(mdir, train, work, args, seed, arm == "trl-packed",
                         ours_batch if arm == "trl-packed" else BATCH, lora(args, mdir), _figures,
                         LossLog.make(), _Counting, MAX_LEN)
    return train_seed(mdir, train, work, args, seed, MAX_LEN if arm == "seed-512" else None,
                      args.max512_steps if arm == "seed-512" and args.max512_steps else None)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-20m", choices=sorted(c.MODELS) + sorted(c.REAL_MODELS))
    ap.add_argument("--examples", type=int, default=128, help="training examples (one epoch)")
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs in parallel, one process each (1 thread each); every ratio is "
                    "still taken within one run")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max512-steps", type=int, default=4,
                    help="steps of the pad-to-512 arm (0: the whole epoch)")
    ap.add_argument("--ours-batch", default="auto", help="packed rows per step (auto: ~8 examples)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--pretrain-examples", type=int, default=0,
                    help="first train the random model on N other examples, every token (cached), "
                    "so the arms start from a model that knows the language, as SFT does")
    ap.add_argument("--arms", default="seed-longest,seed-512,trl-packed,trl-defaults,ours",
                    type=lambda s: [a for a in s.split(",") if a],
                    help=f"comma-separated, among {','.join(ARMS)} (seed-longest and seed-512 "
                    "are needed)")
    ap.add_argument("--full", action="store_true",
                    help="the RESULTS.md run: 1600 examples (200 seed steps), 200 eval, 16 pad-512 steps, "
                    "3 runs in parallel")
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--only-run", type=int, help=argparse.SUPPRESS)  # a child of --jobs
    args = ap.parse_args()
    if not {"seed-longest", "seed-512"} <= set(args.arms) or not set(args.arms) <= set(ARMS):
        ap.error(f"--arms: choose among {','.join(ARMS)}, seed-longest and seed-512 included")
    if args.full:
        args.examples, args.max512_steps, args.jobs = max(args.examples, 1600), 16, args.runs
        args.eval_examples = max(args.eval_examples, 200)
    info = c.start(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        root = Path(tmp)
        mdir, data, tok, train, ev, stats = prepare(args, root)
        ours_batch = auto_batch(train) if args.ours_batch == "auto" else int(args.ours_batch)
        from transformers import AutoConfig

        n_params = _count(AutoConfig.from_pretrained(str(mdir)))
        print(f"data: {stats}; ours: {ours_batch} packed rows per step", flush=True)
        if args.only_run is not None:
            run = one_run(args.only_run, args, mdir, data, train, ev, tok.pad_token_id,
                          ours_batch, root)
            c.write_json(args.json, run)
            return
        if args.jobs > 1:
            runs = _parallel(args, root)
        else:
            runs = [one_run(i, args, mdir, data, train, ev, tok.pad_token_id, ours_batch, root)
                    for i in range(args.runs)]
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    from _report import report

    c.write_json(args.json, report(runs, stats, info, args, ours_batch, n_params))


def _parallel(args: argparse.Namespace, root: Path) -> list[dict[str, dict[str, Any]]]:
    """Each run in its own process (same arguments plus --only-run i); their figures back."""
    import json
    import subprocess

    argv = [a for a in sys.argv[1:] if a not in ("--full",)]
    argv = _drop_opt(_drop_opt(argv, "--json"), "--jobs")
    argv = _drop_opt(_drop_opt(argv, "--examples"), "--max512-steps")
    argv = _drop_opt(argv, "--eval-examples")
    argv += ["--examples", str(args.examples), "--max512-steps", str(args.max512_steps),
             "--eval-examples", str(args.eval_examples)]
    procs = []
    for i in range(args.runs):
        part = root / f"part{i}.json"
        log = (root / f"part{i}.log").open("w")
        procs.append((part, subprocess.Popen(
            [sys.executable, __file__, *argv, "--only-run", str(i), "--json", str(part)],
            stdout=log, stderr=subprocess.STDOUT)))
    print(f"{args.runs} runs started in parallel; logs in {root}/part*.log", flush=True)
    runs = []
    for i, (part, p) in enumerate(procs):
        if p.wait() != 0:
            sys.exit(f"run {i} failed:\n{(root / f'part{i}.log').read_text()[-4000:]}")
        runs.append(json.loads(part.read_text()))
    return runs


def _drop_opt(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def _count(cfg: Any) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return c.n_params(AutoModelForCausalLM.from_config(cfg))


if __name__ == "__main__":
    main()
