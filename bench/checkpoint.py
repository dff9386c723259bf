"""Checkpoint cost while training: step time with a checkpoint upload running in the background
vs no upload, and the time from SIGTERM to a committed checkpoint.

    .venv/bin/python bench/checkpoint.py                      # ~25M-param Llama, full FT, CPU
    .venv/bin/python bench/checkpoint.py --method lora --steps 24 --save-every 4

Two `sft-job run` subprocesses with the same spec (a random Llama built here, the bundled polite
data), outputs to moto's S3 server on loopback:
  A  no periodic checkpoint (output.save_every_steps unset)
  B  output.save_every_steps=K: each checkpoint saved locally, uploaded by the background thread
Both get SIGTERM after step N and commit a stop checkpoint. A step's time is the gap between
two "step n/" log lines as this process reads them (steps 1-2, warm-up, are left out); after a
save step, the blocking local save (up to the start of its upload) is taken out of the gap
and reported on its own. Uploads are timed by the job's own "checkpoint step-N committed ... in
Xs" lines. In B a step is "during upload" when an upload covers at least half of its training
time, else "no upload": those two medians come from the same run, so their ratio is the
slowdown; A is a second reference. SIGTERM -> committed is the signal to the stop checkpoint's
"committed" line. moto is one Python process on the same cores as the training: on a 2-core
box the upload (moto, the uploader's threads, MD5 and CRC32 checksums) competes for CPU, which
is most of what the slowdown measures here (the CPU seconds moto used are printed); there is
no network. One intra-op thread by default (--threads): on a shared 2-core machine, OpenMP
threads that spin while another process holds a core make step times erratic.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.preempt_helpers import PREEMPTED, Job  # noqa: E402
from tests.servers import s3_server  # noqa: E402

BUCKET = "bench-ckpt"
MB = 1 << 20


def build_model(out: Path, hidden: int, layers: int, inter: int) -> int:
    """A random Llama with the builtin tokenizer; returns its parameter count."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_job.models.builtin import build_builtin

    tok_dir = build_builtin("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    for f in tok_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return sum(p.numel() for p in model.parameters())


def run_one(label: str, s3: Any, opts: argparse.Namespace, model_dir: Path, tmp: Path,
            save_every: int | None) -> dict[str, Any]:
    prefix = f"run-{label}-{int(time.time())}"
    sets = [f"output.uri=s3://{BUCKET}/{prefix}", f"model.base={model_dir}",
            f"method.kind={opts.method}", "train.logging_steps=1", "train.max_steps=10000",
            f"train.batch_size={opts.batch}", f"data.max_length={opts.max_length}",
            "eval.num_samples=0", "output.stop_budget_seconds=600", "output.merge=false"]
    if save_every:
        sets += [f"output.save_every_steps={save_every}", "output.keep_checkpoints=2"]
    args = ["run", "jobs/smoke-cpu.yaml"] + [a for s in sets for a in ("--set", s)]
    env = {**s3.env, "SFT_JOB_WORKDIR": str(tmp / label)}
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    cpu0 = _cpu_seconds(s3.pid)
    j = Job(args, Path(opts.cache), env)
    try:
        j.wait_step(opts.steps, timeout=3600)
        t_sig = time.monotonic()
        j.send(signal.SIGTERM)
        rc = j.wait(1200)
        t_exit = time.monotonic()
    finally:
        j.kill()
    if rc != 75:
        raise SystemExit(f"run {label}: exit {rc}, expected 75\n{j.tail()}")
    stop = int(PREEMPTED.search(j.stderr).group(2))  # type: ignore[union-attr]
    uploads = _uploads(j)
    return {"steps": j.step_times(), "uploads": uploads, "stop": stop,
            "sig_to_commit": uploads[stop][1] - t_sig, "sig_to_exit": t_exit - t_sig,
            "size": _checkpoint_size(s3, prefix, stop), "save_every": save_every,
            "moto_cpu_s": _cpu_seconds(s3.pid) - cpu0}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _uploads(j: Job) -> dict[int, tuple[float, float]]:
    """step -> (upload start, commit) from the job's own "checkpoint step-N committed ... in
    Xs" lines (read time minus the duration it reports)."""
    rx = re.compile(r"checkpoint step-(\d+) committed to \S+ in ([\d.]+)s")
    out = {}
    for line, t in zip(j.lines, j.times, strict=True):
        m = rx.search(line)
        if m:
            out[int(m.group(1))] = (t - float(m.group(2)), t)
    return out


def _checkpoint_size(s3: Any, prefix: str, step: int) -> tuple[int, int]:
    body = s3.client().get_object(Bucket=BUCKET,
                                  Key=f"{prefix}/checkpoints/step-{step:06d}/COMMITTED")["Body"]
    files = json.loads(body.read())["files"]
    return sum(files.values()), len(files)


def label_steps(r: dict[str, Any]) -> tuple[dict[str, list[float]], list[float]]:
    """Training time of each step by kind (see the module docstring), and the blocking local
    save times. After a save step, the save runs from that step's log line to the first PUT of
    its upload (the uploader starts as soon as the folder is handed over); the rest of the
    next gap is that step's training."""
    out: dict[str, list[float]] = {"none": [], "idle": [], "upload": []}
    saves: list[float] = []
    times = dict(r["steps"])
    k = r["save_every"]
    spans = {s: v for s, v in r["uploads"].items() if s != r["stop"]}
    for n in sorted(times):
        if n < 3 or n - 1 not in times or n > r["stop"]:
            continue
        a, b = times[n - 1], times[n]
        if k and (n - 1) in spans:
            saves.append(spans[n - 1][0] - a)
            a = spans[n - 1][0]
        if not k:
            out["none"].append(b - a)
        elif sum(max(0.0, min(b, u1) - max(a, u0)) for u0, u1 in spans.values()) >= 0.5 * (b - a):
            out["upload"].append(b - a)
        else:
            out["idle"].append(b - a)
    return out, saves


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f}" if xs else "-"


def report(opts: argparse.Namespace, params: int, a: dict[str, Any], b: dict[str, Any]) -> None:
    (la, _), (lb, saves) = label_steps(a), label_steps(b)
    size, nfiles = b["size"]
    ups = [u1 - u0 for s, (u0, u1) in b["uploads"].items() if s != b["stop"]]
    print(f"\nmodel: Llama {params / 1e6:.1f}M params, {opts.method}, batch {opts.batch} x "
          f"{opts.max_length} tokens (packed), OMP_NUM_THREADS={opts.threads or 'default'}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"checkpoint: {size / MB:.0f} MB in {nfiles} files; local save (blocks training) "
          f"median {_med(saves)}s; background upload to moto (loopback) median {_med(ups)}s"
          + (f" = {size / MB / statistics.median(ups):.0f} MB/s" if ups else ""))
    idle = statistics.median(lb["idle"]) if lb["idle"] else float("nan")
    ref = statistics.median(la["none"]) if la["none"] else float("nan")
    print(f"\n{'step time (training only)':<46}{'n':>4}{'median s':>10}{'vs B idle':>10}"
          f"{'vs A':>7}")
    rows = [("A  no periodic checkpoint", la["none"]),
            (f"B  every {b['save_every']}: no upload in flight", lb["idle"]),
            (f"B  every {b['save_every']}: during a background upload", lb["upload"])]
    for name, xs in rows:
        med = statistics.median(xs) if xs else float("nan")
        print(f"{name:<46}{len(xs):>4}{_med(xs):>10}{med / idle:>10.2f}{med / ref:>7.2f}")
    print(f"\n{'SIGTERM ->':<46}{'A':>10}{'B':>10}")
    print(f"{'  stop checkpoint committed (s)':<46}{a['sig_to_commit']:>10.1f}"
          f"{b['sig_to_commit']:>10.1f}")
    print(f"{'  exit 75 (s)':<46}{a['sig_to_exit']:>10.1f}{b['sig_to_exit']:>10.1f}")
    print(f"{'CPU seconds used by the moto server':<46}{a['moto_cpu_s']:>10.1f}"
          f"{b['moto_cpu_s']:>10.1f}")
    print(f"(stop steps: A {a['stop']}, B {b['stop']}; in B the stop checkpoint waits behind "
          "any periodic upload still in flight)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--method", choices=["full", "lora"], default="full")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=24, help="SIGTERM after this step")
    ap.add_argument("--save-every", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (0: torch default)")
    ap.add_argument("--json", type=Path, default=None, help="Also write the raw timings here")
    ap.add_argument("--cache", default=os.environ.get(
        "SFT_JOB_CACHE", str(Path.home() / ".cache" / "sft-job")))
    opts = ap.parse_args()
    os.environ["SFT_JOB_CACHE"] = opts.cache
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as d, \
            s3_server(buckets=[BUCKET]) as s3:
        tmp = Path(d)
        params = build_model(tmp / "model", opts.hidden, opts.layers, opts.inter)
        print(f"built a random Llama with {params / 1e6:.1f}M parameters", flush=True)
        a = run_one("a", s3, opts, tmp / "model", tmp, None)
        print(f"A done: stop at step {a['stop']}", flush=True)
        b = run_one("b", s3, opts, tmp / "model", tmp, opts.save_every)
        print(f"B done: stop at step {b['stop']}", flush=True)
        report(opts, params, a, b)
        if opts.json:
            opts.json.write_text(json.dumps({"a": a, "b": b}, indent=1, default=str))


if __name__ == "__main__":
    main()
