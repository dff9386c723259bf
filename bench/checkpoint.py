"""Checkpoint cost while training: step time with a checkpoint upload in flight vs none, and the
time from SIGTERM to a committed checkpoint.

    .venv/bin/python bench/checkpoint.py                      # ~25M-param Llama, full FT, CPU
    git archive COMMIT | tar -x -C /tmp/old                   # the code to compare with, then:
    .venv/bin/python bench/checkpoint.py --baseline-code /tmp/old --seeds 3

`sft-job run` subprocesses with the same spec (a random Llama built here, the bundled polite
data), outputs to moto's S3 server on loopback:
  A  no periodic checkpoint (output.save_every_steps unset)
  B  output.save_every_steps=K: each checkpoint saved locally, uploaded in the background
  C  (with --baseline-code DIR) B run with the code in DIR, e.g. the in-process upload thread
     this replaced
Each seed (train.seed) runs A, B, C in turn, so the arms are interleaved; every run gets
SIGTERM after step N and commits a stop checkpoint. A step's time is the gap between two
"step n/" log lines as this process reads them (steps 1-2, warm-up, are left out); after a
save step, the blocking local save (up to the start of its upload) is taken out of the gap and
reported on its own. Uploads are timed by the job's own "checkpoint step-N committed ... in
Xs" lines. In B and C a step is "during upload" when an upload covers at least half of its
training time, else "no upload": both medians come from the same run, so their ratio is the
slowdown. Alongside wall time, the training process's own CPU seconds per step (sampled from
/proc every 20 ms) show whether upload work runs inside it. SIGTERM -> committed is the signal
to the stop checkpoint's "committed" line. Medians over seeds are printed with their range.
moto is one Python process on the same cores as the training: on a 2-core box the upload
(moto, the uploader, MD5 and CRC32 checksums) competes for CPU with training and with whatever
else runs there (the load average is printed); there is no network. `--store-nice 19` runs
moto at the lowest priority, a model of a store on other hardware. One intra-op thread by
default (--threads): on a shared 2-core machine, OpenMP threads that spin while another
process holds a core make step times erratic.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
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


class CpuSampler(threading.Thread):
    """(time.monotonic(), user+system CPU seconds) of one process, every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.samples.append((time.monotonic(), _cpu_seconds(self.pid)))
            except (OSError, IndexError, ValueError):
                return
            time.sleep(0.02)

    def at(self, t: float) -> float:
        """CPU seconds at time t, interpolated between samples."""
        times = [x for x, _ in self.samples]
        i = bisect.bisect_left(times, t)
        if i <= 0 or i >= len(times):
            return self.samples[min(max(i, 0), len(times) - 1)][1]
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


def run_one(label: str, s3: Any, opts: argparse.Namespace, model_dir: Path, tmp: Path,
            save_every: int | None, seed: int, code: Path = REPO) -> dict[str, Any]:
    prefix = f"run-{label}-{seed}-{int(time.time())}"
    sets = [f"output.uri=s3://{BUCKET}/{prefix}", f"model.base={model_dir}",
            f"method.kind={opts.method}", "train.logging_steps=1", "train.max_steps=10000",
            f"train.batch_size={opts.batch}", f"data.max_length={opts.max_length}",
            "eval.num_samples=0", "output.stop_budget_seconds=600", "output.merge=false",
            f"train.seed={seed}"]
    if save_every:
        sets += [f"output.save_every_steps={save_every}", "output.keep_checkpoints=2"]
    args = ["run", str(REPO / "jobs/smoke-cpu.yaml")] + [a for s in sets for a in ("--set", s)]
    env = {**s3.env, "SFT_JOB_WORKDIR": str(tmp / f"{label}-{seed}"),
           "PYTHONPATH": str(code)}
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    cpu0 = _cpu_seconds(s3.pid)
    j = Job(args, Path(opts.cache), env, cwd=code)
    sampler = CpuSampler(j.proc.pid)
    sampler.start()
    try:
        j.wait_step(opts.steps, timeout=3600)
        t_sig = time.monotonic()
        j.send(signal.SIGTERM)
        rc = j.wait(1200)
        t_exit = time.monotonic()
    finally:
        sampler.done.set()
        j.kill()
    if rc != 75:
        raise SystemExit(f"run {label}: exit {rc}, expected 75\n{j.tail()}")
    stop = int(PREEMPTED.search(j.stderr).group(2))  # type: ignore[union-attr]
    uploads = _uploads(j)
    return {"label": label, "seed": seed, "steps": j.step_times(), "uploads": uploads,
            "stop": stop, "sig_to_commit": uploads[stop][1] - t_sig,
            "sig_to_exit": t_exit - t_sig, "size": _checkpoint_size(s3, prefix, stop),
            "save_every": save_every, "moto_cpu_s": _cpu_seconds(s3.pid) - cpu0,
            "cpu": sampler, "load": os.getloadavg()[0]}


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


def label_steps(r: dict[str, Any]) -> tuple[dict[str, list[tuple[float, float]]], list[float]]:
    """(wall, training-process CPU) seconds of each step by kind (see the module docstring),
    and the blocking local save times. After a save step, the save runs from that step's log
    line to the start of its upload (the uploader starts as soon as the folder is handed
    over); the rest of the next gap is that step's training."""
    out: dict[str, list[tuple[float, float]]] = {"none": [], "idle": [], "upload": []}
    saves: list[float] = []
    times = dict(r["steps"])
    k = r["save_every"]
    spans = {s: v for s, v in r["uploads"].items() if s != r["stop"]}
    cpu = r["cpu"]
    for n in sorted(times):
        if n < 3 or n - 1 not in times or n > r["stop"]:
            continue
        a, b = times[n - 1], times[n]
        if k and (n - 1) in spans:
            saves.append(spans[n - 1][0] - a)
            a = max(a, spans[n - 1][0])
        step = (b - a, cpu.at(b) - cpu.at(a))
        if not k:
            out["none"].append(step)
        elif sum(max(0.0, min(b, u1) - max(a, u0)) for u0, u1 in spans.values()) >= 0.5 * (b - a):
            out["upload"].append(step)
        else:
            out["idle"].append(step)
    return out, saves


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _range(xs: list[float], fmt: str = "{:.2f}") -> str:
    if not xs:
        return "-"
    return f"{fmt.format(_med(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """One run's figures: medians of wall and CPU per step by kind, and their ratios."""
    kinds, saves = label_steps(r)
    f: dict[str, Any] = {"label": r["label"], "seed": r["seed"], "stop": r["stop"],
                         "sig_to_commit": r["sig_to_commit"], "sig_to_exit": r["sig_to_exit"],
                         "moto_cpu_s": r["moto_cpu_s"], "load": r["load"],
                         "save_s": _med(saves),
                         "upload_s": _med([u1 - u0 for s, (u0, u1) in r["uploads"].items()
                                           if s != r["stop"]])}
    for kind, steps in kinds.items():
        f[f"n_{kind}"] = len(steps)
        f[f"wall_{kind}"] = _med([w for w, _ in steps])
        f[f"cpu_{kind}"] = _med([c for _, c in steps])
    f["wall_ratio"] = f["wall_upload"] / f["wall_idle"]
    f["cpu_ratio"] = f["cpu_upload"] / f["cpu_idle"]
    return f


def report(opts: argparse.Namespace, params: int, runs: list[dict[str, Any]]) -> None:
    figs = [summarize(r) for r in runs]
    size, nfiles = next(r["size"] for r in runs if r["save_every"])
    print(f"\nmodel: Llama {params / 1e6:.1f}M params, {opts.method}, batch {opts.batch} x "
          f"{opts.max_length} tokens (packed), OMP_NUM_THREADS={opts.threads or 'default'}, "
          f"{os.cpu_count()} CPUs; checkpoint {size / MB:.0f} MB in {nfiles} files, every "
          f"{opts.save_every} steps, SIGTERM after step {opts.steps}, moto at nice "
          f"{opts.store_nice}")
    print(f"\n{'run':<9}{'load':>6}{'steps idle/upl':>16}{'wall idle':>10}{'upload':>8}"
          f"{'ratio':>7}{'cpu idle':>10}{'upload':>8}{'ratio':>7}{'save s':>8}{'upload s':>10}"
          f"{'SIGTERM->commit':>17}{'moto cpu':>10}")
    for f in figs:
        n = f"{f['n_idle']}/{f['n_upload']}" if f["label"] != "a" else f"{f['n_none']} (none)"
        wi, ci = (f["wall_idle"], f["cpu_idle"]) if f["label"] != "a" else (f["wall_none"],
                                                                            f["cpu_none"])
        print(f"{f['label'].upper() + ' ' + str(f['seed']):<9}{f['load']:>6.1f}{n:>16}{wi:>10.3f}"
              f"{f['wall_upload']:>8.3f}{f['wall_ratio']:>7.2f}{ci:>10.3f}{f['cpu_upload']:>8.3f}"
              f"{f['cpu_ratio']:>7.2f}{f['save_s']:>8.2f}{f['upload_s']:>10.1f}"
              f"{f['sig_to_commit']:>17.1f}{f['moto_cpu_s']:>10.1f}")
    print("\nmedian over seeds [range]:")
    for label, name in (("a", "A  no periodic checkpoint"), ("b", "B  this code"),
                        ("c", "C  --baseline-code")):
        fs = [f for f in figs if f["label"] == label]
        if not fs:
            continue
        line = f"  {name:<28} SIGTERM -> committed {_range([f['sig_to_commit'] for f in fs], '{:.1f}')} s"
        if label != "a":
            line += (f"; step time during an upload / without one: wall "
                     f"{_range([f['wall_ratio'] for f in fs])}, training-process CPU "
                     f"{_range([f['cpu_ratio'] for f in fs])}")
        print(line)


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
    ap.add_argument("--seeds", type=int, default=3, help="runs of each arm, interleaved")
    ap.add_argument("--baseline-code", type=Path, default=None,
                    help="a checkout of other code to run B's spec with (arm C)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (0: torch default)")
    ap.add_argument("--store-nice", type=int, default=0,
                    help="nice value for the moto server: 19 models a store on other hardware "
                         "(it then yields these cores to the job)")
    ap.add_argument("--json", type=Path, default=None, help="Also write the raw timings here")
    ap.add_argument("--cache", default=os.environ.get(
        "SFT_JOB_CACHE", str(Path.home() / ".cache" / "sft-job")))
    opts = ap.parse_args()
    os.environ["SFT_JOB_CACHE"] = opts.cache
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as d, \
            s3_server(buckets=[BUCKET]) as s3:
        tmp = Path(d)
        if opts.store_nice:  # its request threads, started later, inherit it
            os.setpriority(os.PRIO_PROCESS, s3.pid, opts.store_nice)
        params = build_model(tmp / "model", opts.hidden, opts.layers, opts.inter)
        print(f"built a random Llama with {params / 1e6:.1f}M parameters", flush=True)
        arms = [("a", None, REPO), ("b", opts.save_every, REPO)]
        if opts.baseline_code:
            arms.append(("c", opts.save_every, opts.baseline_code.resolve()))
        for seed in range(opts.seeds):
            for label, every, code in arms:
                r = run_one(label, s3, opts, tmp / "model", tmp, every, 42 + seed, code)
                print(f"{label.upper()} seed {seed}: stop at step {r['stop']}, SIGTERM -> "
                      f"committed {r['sig_to_commit']:.1f}s", flush=True)
                runs.append(r)
        report(opts, params, runs)
        if opts.json:
            opts.json.write_text(json.dumps([{**summarize(r), "steps": r["steps"],
                                              "uploads": r["uploads"]} for r in runs],
                                            indent=1, default=str))


if __name__ == "__main__":
    main()
