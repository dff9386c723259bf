"""GPU figures (one H100/H200): full fine-tuning throughput and MFU of a random ~0.8B Llama at
sequence length 2048, the seeds' recipe against the job's default path in the same run, and
QLoRA of a 1.1B model (peak memory, seconds per 30-example epoch).

    python bench/gpu.py --json gpu.json      # one CUDA GPU, ~5-10 min
    python bench/gpu.py --smoke              # tiny shapes on CPU: checks this script runs

Without a CUDA GPU (and without --smoke) it says so and exits 0.

A. Full fine-tuning, bf16, the same Alpaca-like examples (bench/_common.py), one epoch each:
   seed   HF Trainer + DataCollatorForLanguageModeling(mlm=False), batch 8 padded to the
          longest, sdpa attention; the model in bf16 like ours (--seed-fp32: fp32 weights +
          bf16 autocast, the seed's literal recipe)
   ours   the job's assembly on its CUDA backend (sft_job.prepare.assemble + trainer_for):
          BFD packing into rows of data.max_length=2048, the job's SFTTrainer; with
          flash-attn installed the backend uses padding-free rows (varlen kernels), else
          packed rows with sdpa and per-sample masks
   Steps after --warmup-steps are timed (with CUDA syncs). Useful tokens = real tokens.
   MFU = useful FLOPs / (time x peak), useful FLOPs per sample of n tokens = 6*N*n + 6*L*d*n^2
   (N = parameters without the input embedding; the second term is causal attention,
   12*L*d*n^2/2, counted per sample: padding and cross-sample attention are not useful work).
   Peak bf16 dense: 989 TFLOP/s for H100 SXM and H200 (--peak-tflops to change).
B. QLoRA: jobs/tinyllama-polite-qlora.yaml (NF4, double quant, LoRA r=8 all-linear, gradient
   checkpointing, batch 2 x 8 accumulation) with its base replaced by a random model of
   TinyLlama-1.1B's shape and 30 polite examples (no eval split): seconds per epoch of each of
   its 3 epochs and peak CUDA memory (allocated and reserved).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

GPU_MODEL = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000)
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
SMOKE_MODEL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, vocab_size=4096)


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> dict[str, float]:
    from sft_job.train.trainer import peak_memory

    return peak_memory()


def make_model(out: Path, shape: dict[str, Any], dtype: str) -> Path:
    """Tokenizer (the benchmark BPE) + random Llama weights of `shape` in `dtype`."""
    tok = c.build_tokenizer(out, 4096)
    c.write_random_llama(out, {**shape, "bos_token_id": tok.bos_token_id,
                               "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                               "max_position_embeddings": 4096, "tie_word_embeddings": False},
                         dtype, shard_mb=2000)
    return out


class StepClock:
    """A TrainerCallback factory: clocks (after a CUDA sync) at the end of step `warmup` and at
    the end of training, and the start/end of every epoch."""

    @staticmethod
    def make(warmup: int) -> Any:
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self) -> None:
                self.t0 = self.t1 = 0.0
                self.epochs: list[float] = []
                self._e0 = 0.0

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == warmup:
                    _sync()
                    self.t0 = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                _sync()
                self.t1 = time.perf_counter()

            def on_epoch_begin(self, args, state, control, **kw):
                _sync()
                self._e0 = time.perf_counter()

            def on_epoch_end(self, args, state, control, **kw):
                _sync()
                self.epochs.append(time.perf_counter() - self._e0)

        return _Clock()


class _Counting:
    """Collator wrapper: each batch's sample lengths (per sample, inside packed rows too) and
    its token slots."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.lengths, self.slots = inner, [], []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        lens = []
        for e in examples:  # packed rows carry each sample's length in seq_lengths
            lens += list(e.get("seq_lengths") or [len(e["input_ids"])])
        self.lengths.append(lens)
        self.slots.append(int(batch["input_ids"].numel()))
        return batch


def _flops(lengths: list[int], n_params: int, layers: int, hidden: int) -> float:
    return sum(6 * n_params * n + 6 * layers * hidden * n * n for n in lengths)


def _spec(mdir: Path, data: Path, out: Path, args: argparse.Namespace, backend: str) -> Any:
    from sft_job.spec import JobSpec

    return JobSpec.model_validate({
        "name": "bench-gpu", "model": {"base": str(mdir)},
        "data": {"train": str(data), "format": "alpaca", "max_length": args.seq_len,
                 "packing": True},
        "method": {"kind": "full"},
        "train": {"epochs": 1, "learning_rate": 1e-5, "batch_size": args.ours_batch,
                  "logging_steps": 50, "warmup_ratio": 0.0},
        "backend": backend, "output": {"uri": str(out)},
    })


def arm_ours(mdir: Path, data: Path, work: Path, args: argparse.Namespace, backend: str) -> dict:
    from sft_job.prepare import assemble, trainer_for
    from sft_job.train.backends import flattens

    job = assemble(_spec(mdir, data, work / "out", args, backend), work / "data")
    clock = StepClock.make(args.warmup_steps)
    trainer = trainer_for(job, work / "trainer", [clock]).trainer
    col = trainer.data_collator = _Counting(trainer.data_collator)
    _reset_memory()
    trainer.train()
    out = _figures(trainer, col, clock, args)
    out.update({"attention": job.backend.attn, "flattened": flattens(job.model),
                "dtype": job.backend.dtype,
                "batch": f"{args.ours_batch} packed rows of <= {args.seq_len}"})
    del trainer, job
    return out


def arm_seed(mdir: Path, rows: list[dict[str, list[int]]], work: Path, args: argparse.Namespace,
             on_gpu: bool) -> dict:
    """The seeds' recipe (bench/_common.seed_trainer), batch 8, in bf16 on the GPU."""
    from transformers import TrainingArguments

    dtype = "float32" if (args.seed_fp32 or not on_gpu) else "bfloat16"
    targs = TrainingArguments(
        output_dir=str(work / "seed"), per_device_train_batch_size=8, num_train_epochs=1,
        learning_rate=1e-5, bf16=on_gpu, use_cpu=not on_gpu, report_to="none", save_strategy="no",
        logging_steps=50, dataloader_num_workers=0, disable_tqdm=True, seed=42)
    clock = StepClock.make(args.warmup_steps)
    trainer, col, _ = c.seed_trainer(mdir, rows, targs, [clock], _Counting, dtype=dtype)
    _reset_memory()
    trainer.train()
    out = _figures(trainer, col, clock, args)
    out.update({"attention": "sdpa", "flattened": False, "dtype": dtype,
                "batch": "8 rows padded to the longest"})
    del trainer
    return out


def _figures(trainer: Any, col: _Counting, clock: Any, args: argparse.Namespace) -> dict:
    n = trainer.state.global_step
    w = args.warmup_steps
    if n <= w:
        sys.exit(f"only {n} steps: use more --examples or fewer --warmup-steps")
    lengths = [x for b in col.lengths[w:n] for x in b]
    cfg = trainer.model.config
    n_params = sum(p.numel() for p in trainer.model.parameters()) - cfg.vocab_size * cfg.hidden_size
    secs = clock.t1 - clock.t0
    flops = _flops(lengths, n_params, cfg.num_hidden_layers, cfg.hidden_size)
    return {"steps": n, "timed_steps": n - w, "useful_tokens": sum(lengths),
            "slot_efficiency": sum(lengths) / sum(col.slots[w:n]), "seconds": secs,
            "tokens_per_s": sum(lengths) / secs, "tflops": flops / secs / 1e12,
            "n_params_no_embed": n_params, **_peak_gb()}


def part_a(args: argparse.Namespace, tmp: Path, on_gpu: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from sft_job.data import build as build_data

    shape = SMOKE_MODEL if args.smoke else GPU_MODEL
    mdir = make_model(tmp / "model-a", shape, "bfloat16" if on_gpu else "float32")
    tok = AutoTokenizer.from_pretrained(str(mdir))
    data = c.write_jsonl(tmp / "alpaca.jsonl", c.alpaca_rows(args.examples, seed=1, tokenizer=tok))
    spec = _spec(mdir, data, tmp / "o", args, "cuda" if on_gpu else "cpu")
    rows = build_data(spec.data.model_copy(update={"packing": False}), tok,
                      tmp / "prep").train.to_list()
    res = {}
    for arm in ("seed", "ours"):
        print(f"  A: {arm} ...", flush=True)
        res[arm] = (arm_seed(mdir, rows, tmp / arm, args, on_gpu) if arm == "seed"
                    else arm_ours(mdir, data, tmp / arm, args, "cuda" if on_gpu else "cpu"))
        _reset_memory()
    peak = args.peak_tflops
    rows_t = [[k, v["dtype"], v["attention"] + (" varlen" if v["flattened"] else ""), v["batch"],
               f"{v['slot_efficiency']:.3f}", f"{v['tokens_per_s']:,.0f}", f"{v['tflops']:.1f}",
               f"{100 * v['tflops'] / peak:.1f} %",
               f"{v.get('peak_allocated_gb', v.get('peak_rss_gb', 0)):.1f}"] for k, v in res.items()]
    print(f"\nA. full fine-tuning, random Llama {res['ours']['n_params_no_embed'] / 1e6:,.0f}M "
          f"(+ embeddings), seq len {args.seq_len}, {args.examples} examples, "
          f"{args.warmup_steps} warm-up steps untimed")
    print(c.table(["arm", "dtype", "attention", "batch", "slot eff.", "useful tok/s",
                   "useful TFLOP/s", f"MFU (peak {peak:.0f})", "peak mem GB"], rows_t))
    ratio = res["ours"]["tokens_per_s"] / res["seed"]["tokens_per_s"]
    print(f"ours / seed useful tokens/s: {ratio:.2f}x")
    return {"arms": res, "ratio": ratio, "model": shape, "seq_len": args.seq_len}


def part_b(args: argparse.Namespace, tmp: Path, on_gpu: bool) -> dict[str, Any]:
    from sft_job.prepare import assemble, trainer_for
    from sft_job.specload import load_spec

    shape = SMOKE_MODEL if args.smoke else TINYLLAMA
    mdir = make_model(tmp / "model-b", shape, "bfloat16" if on_gpu else "float32")
    spec = load_spec(str(c.REPO / "jobs" / "tinyllama-polite-qlora.yaml"), [
        f"model.base={mdir}", "data.train=sft_job/sample_data/polite.jsonl",
        "data.max_samples=30", "data.eval_fraction=0", f"output.uri={tmp / 'qlora-out'}",
        f"backend={'cuda' if on_gpu else 'cpu'}", "train.logging_steps=1000"])
    _reset_memory()
    job = assemble(spec, tmp / "qlora-data")
    clock = StepClock.make(0)
    trainer = trainer_for(job, tmp / "qlora-trainer", [clock]).trainer
    print("  B: qlora ...", flush=True)
    trainer.train()
    res = {"epochs_s": clock.epochs, "examples": job.bundle.stats["train_examples"],
           "rows": len(job.bundle.train), "steps": trainer.state.global_step, **_peak_gb()}
    mem = (f"peak allocated {res.get('peak_allocated_gb', 0):.2f} GB, reserved "
           f"{res.get('peak_reserved_gb', 0):.2f} GB" if on_gpu else f"peak RSS {res['peak_rss_gb']:.2f} GB")
    print(f"\nB. QLoRA (NF4) of a random {'TinyLlama-1.1B-shaped' if not args.smoke else 'tiny'} "
          f"model, {res['examples']} examples ({res['rows']} packed rows), {res['steps']} steps: "
          f"seconds per epoch {', '.join(f'{x:.1f}' for x in clock.epochs)}; {mem}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=8000, help="part A examples (one epoch)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--ours-batch", type=int, default=8, help="packed rows per step (job default)")
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--seed-fp32", action="store_true", help="seed arm: fp32 weights + bf16 autocast")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak of the GPU")
    ap.add_argument("--skip-qlora", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    import torch

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        print("gpu.py: no CUDA GPU visible (torch.cuda.is_available() is False): skipped. "
              "Run it on an H100/H200 machine, or with --smoke to check the script on CPU.")
        return
    if args.smoke:
        args.examples, args.seq_len, args.ours_batch, args.warmup_steps = 96, 512, 2, 2
        torch.set_num_threads(1)
    info = c.machine()
    if on_gpu:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1024**3, 1),
                    cuda=torch.version.cuda, flash_attn=_has("flash_attn"),
                    bitsandbytes=_has("bitsandbytes"))
        print(f"# GPU {p.name} ({info['gpu_memory_gb']} GB), CUDA {torch.version.cuda}, "
              f"flash_attn {'yes' if info['flash_attn'] else 'no'}")
    c.print_machine(info)
    from sft_job.pipeline import setup_logging

    setup_logging()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        doc: dict[str, Any] = {"machine": info, "smoke": args.smoke}
        doc["full_ft"] = part_a(args, Path(tmp), on_gpu)
        if not args.skip_qlora:
            doc["qlora"] = part_b(args, Path(tmp), on_gpu)
    c.write_json(args.json, doc)


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


if __name__ == "__main__":
    main()
