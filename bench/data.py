"""The data step at the sizes users train on: the job as it was (a baseline commit) against this
checkout, in the same run, on generated Alpaca-like and chat data.

    nice .venv/bin/python bench/data.py --native --json data.json         # the RESULTS.md run
    nice .venv/bin/python bench/data.py --rows 20000 --big-rows 100000 --chat-rows 20000 --reps 1

Every arm is a real `sft-job run` of jobs/smoke-cpu.yaml (builtin tiny Llama, LoRA, CPU) in a
fresh process with data.train pointed at the generated file (data.max_length=512,
eval_fraction=0.001, train.max_steps=3). The baseline arm runs the code of `--baseline-ref`
(default: main before issue 16) from a `git worktree` of it, with the same virtualenv. A
monitor samples the job's process tree (the job and its worker processes) every 0.1 s:
CPU seconds (live processes plus reaped children) and memory (sum of PSS, so pages that forked
workers share are counted once; and the largest single RSS). The data step is the window from
process start to the job's last data log line (it includes the start-up imports and the
tokenizer-free row scan, which the old path runs too). Arms are interleaved, `--reps` times.

Arms: old@N (baseline, N rows), new@N cold (empty cache), new@BIG cold, then SIGTERM after
its first committed checkpoint and a rerun (`warm`: process start -> first optimizer step,
loading the committed cache), chat@CHAT cold (with --old-chat the baseline too), with --native old/new@N with
data.template=native (Alpaca's own template: no chat template to render), and once: 2 ranks on
this machine (NPROC_PER_NODE=2), new@N cold, where rank 0 prepares and rank 1 waits.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

DATA_END = re.compile(r"data: (prepared in|using the prepared data|\S+ format, \d+ train)|"
                      r"data: \S+ ready after waiting")
PHASE_START = re.compile(r"INFO (?:\[rank 0\] )?job \S+: backend")  # just before the data step
STEP = re.compile(r"INFO (?:\[rank 0\] )?step (\d+)/(\d+)")
COMMITTED = re.compile(r"checkpoint step-(\d+) committed")


# ---------------------------------------------------------------- data

def alpaca_file(n: int, root: Path) -> Path:
    """n Alpaca-like rows (bench/_common.alpaca_rows, lengths in the job tokenizer's tokens),
    generated in blocks, cached."""
    path = root / f"alpaca-{n}.jsonl"
    if path.exists():
        return path
    tok = _tokenizer()
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i, start in enumerate(range(0, n, 50_000)):
            for r in c.alpaca_rows(min(50_000, n - start), seed=1000 + i, tokenizer=tok):
                f.write(json.dumps(r) + "\n")
    tmp.rename(path)
    return path


def chat_file(n: int, root: Path) -> Path:
    """n conversations: 1-3 user/assistant turns (Alpaca-like lengths each), a system turn on
    a third of them."""
    import random

    path = root / f"chat-{n}.jsonl"
    if path.exists():
        return path
    tok = _tokenizer()
    rng = random.Random(7)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i, start in enumerate(range(0, n, 20_000)):
            k = min(20_000, n - start)
            pool = c.alpaca_rows(3 * k, seed=5000 + i, tokenizer=tok)
            for j in range(k):
                msgs = [{"role": "system", "content": "You are a helpful assistant."}] \
                    if rng.random() < 0.33 else []
                for r in pool[3 * j:3 * j + rng.randint(1, 3)]:
                    user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
                    msgs += [{"role": "user", "content": user},
                             {"role": "assistant", "content": r["output"]}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    tmp.rename(path)
    return path


def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    from sft_job.models.builtin import build_builtin

    return AutoTokenizer.from_pretrained(build_builtin("builtin:tiny-llama"))


# ---------------------------------------------------------------- one job, watched

class Watched:
    """A `sft-job run` subprocess with its stderr lines timed and its process tree sampled."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        import psutil

        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        self.lines: list[tuple[float, str]] = []
        self.samples: list[tuple[float, float, float, float]] = []  # t, cpu s, pss GB, rss GB
        self.marks: dict[str, tuple[float, float]] = {}  # name -> (t, cpu s) at a log line
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._sample, daemon=True)]
        for t in self._threads:
            t.start()

    def _tree(self) -> tuple[float, float, float]:
        import psutil

        cpu = pss = rss = 0.0
        try:
            procs = [self.ps, *self.ps.children(recursive=True)]
        except psutil.Error:
            return 0.0, 0.0, 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                cpu += t.user + t.system + t.children_user + t.children_system
                m = p.memory_full_info()
                pss += m.pss
                rss = max(rss, m.rss)
            except psutil.Error:
                continue
        return cpu, pss / 1e9, rss / 1e9

    def _sample(self) -> None:
        while not self._done.is_set():
            cpu, pss, rss = self._tree()
            if cpu or pss:
                self.samples.append((time.perf_counter() - self.t0, cpu, pss, rss))
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            t = time.perf_counter() - self.t0
            self.lines.append((t, line.rstrip("\n")))
            if DATA_END.search(line):  # the last one ends the data step
                self.marks["data_end"] = (t, self._tree()[0])
            elif PHASE_START.search(line):
                self.marks["data_start"] = (t, self._tree()[0])

    def wait_for(self, rx: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None:
                return None
            time.sleep(0.1)
        return None

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self._threads[0].join(10)
        self._done.set()
        self._threads[1].join(5)
        return rc

    def first(self, rx: re.Pattern[str]) -> float | None:
        return next((t for t, line in self.lines if rx.search(line)), None)

    def data_window(self) -> dict[str, float]:
        """Wall, CPU and peak memory from process start to the last data log line."""
        t_end, cpu_end = self.marks.get("data_end", (float("nan"), float("nan")))
        inside = [s for s in self.samples if s[0] <= t_end] or self.samples[:1]
        t_start, cpu_start = self.marks.get("data_start", (float("nan"), float("nan")))
        return {"wall_s": round(t_end, 2), "cpu_s": round(cpu_end, 2),
                "phase_wall_s": round(t_end - t_start, 2),
                "phase_cpu_s": round(cpu_end - cpu_start, 2),
                "peak_pss_gb": round(max(s[2] for s in inside), 3),
                "peak_rss_gb": round(max(s[3] for s in inside), 3)}

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def job_argv(code: Path, data: Path, out: Path, fmt: str, extra: list[str]) -> list[str]:
    sets = [f"data.train={data}", f"data.format={fmt}", "data.max_length=512",
            "data.eval_fraction=0.001", "train.max_steps=3", "train.logging_steps=1",
            "eval.num_samples=1", "eval.max_new_tokens=4", f"output.uri={out}", *extra]
    argv = [sys.executable, "-m", "sft_job", "run", str(code / "jobs" / "smoke-cpu.yaml")]
    for s in sets:
        argv += ["--set", s]
    return argv


def run_arm(name: str, code: Path, data: Path, rows: int, fmt: str, work: Path,
            extra: list[str] | None = None, env_extra: dict[str, str] | None = None,
            sigterm_after_commit: bool = False) -> tuple[dict[str, Any], Path]:
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code),
           "SFT_JOB_WORKDIR": str(work / f"scratch-{name}"), **(env_extra or {})}
    extra = list(extra or [])
    if sigterm_after_commit:
        extra += ["output.save_every_steps=1"]
    load0 = os.getloadavg()[0]
    w = Watched(job_argv(code, data, out, fmt, extra), code, env)
    if sigterm_after_commit:
        if w.wait_for(COMMITTED, 3600) is None:
            w.finish(60)
            sys.exit(f"{name}: no checkpoint was committed\n{w.tail()}")
        w.proc.send_signal(signal.SIGTERM)
    rc = w.finish(7200)
    want = 75 if sigterm_after_commit else 0
    if rc != want:
        sys.exit(f"{name}: exit {rc}, expected {want}\n{w.tail()}")
    res = {"arm": name, "rows": rows, "rc": rc, "load_before": round(load0, 2),
           "load_after": round(os.getloadavg()[0], 2), **w.data_window(),
           "first_step_s": w.first(STEP),
           "prepared_lines": sum("data: preparing" in line for _, line in w.lines)}
    res["rows_per_s"] = round(rows / res["wall_s"], 1)
    res["cpu_ms_per_row"] = round(1000 * res["cpu_s"] / rows, 4)
    res["phase_rows_per_s"] = round(rows / res["phase_wall_s"], 1)
    summary = out / "metrics" / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        res["ranks"] = [{k: r.get(k) for k in ("rank", "prepared_data", "waited_for_data_s")}
                        for r in s.get("ranks", [])]
        res["phases_s"] = s.get("timings_s")
    if "first_step_s" in res and res["first_step_s"] is not None:
        res["first_step_s"] = round(res["first_step_s"], 2)
    print(f"  {name}: data step {res['wall_s']}s wall, {res['cpu_s']} CPU s, "
          f"{res['rows_per_s']} rows/s, peak PSS {res['peak_pss_gb']} GB, "
          f"first step at {res['first_step_s']}s (load {load0:.1f})", flush=True)
    return res, out


def warm_rerun(name: str, code: Path, data: Path, rows: int, fmt: str, work: Path,
               out: Path) -> dict[str, Any]:
    """The rerun of a SIGTERM'd job on a fresh scratch folder: it resumes from its checkpoint
    and loads the committed prepared data."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(code),
           "SFT_JOB_WORKDIR": str(work / f"scratch-{name}")}
    load0 = os.getloadavg()[0]
    w = Watched(job_argv(code, data, out, fmt, ["output.save_every_steps=1"]), code, env)
    rc = w.finish(3600)
    if rc != 0:
        sys.exit(f"{name}: exit {rc}\n{w.tail()}")
    res = {"arm": name, "rows": rows, "rc": rc, "load_before": round(load0, 2),
           **w.data_window(), "first_step_s": round(w.first(STEP) or float("nan"), 2),
           "phases_s": _phases(out),
           "resumed": any("resuming from committed checkpoint" in x for _, x in w.lines),
           "prepared_lines": sum("data: preparing" in line for _, line in w.lines)}
    print(f"  {name}: process start -> first optimizer step {res['first_step_s']}s, data "
          f"{res['wall_s']}s, peak PSS {res['peak_pss_gb']} GB, resumed {res['resumed']}, "
          f"prepared {res['prepared_lines']}x (load {load0:.1f})", flush=True)
    return res


# ---------------------------------------------------------------- main

def _phases(out: Path) -> dict[str, float] | None:
    f = out / "metrics" / "summary.json"
    return json.loads(f.read_text()).get("timings_s") if f.is_file() else None


def baseline_tree(ref: str, work: Path) -> Path:
    dest = work / f"baseline-{ref}"
    if not dest.exists():
        subprocess.run(["git", "-C", str(c.REPO), "worktree", "add", "--detach", str(dest), ref],
                       check=True, capture_output=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="rows of old@N and new@N")
    ap.add_argument("--big-rows", type=int, default=1_000_000, help="rows of new@BIG")
    ap.add_argument("--chat-rows", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline-ref", default="c4ba75a", help="commit of the old data step")
    ap.add_argument("--no-two-ranks", action="store_true")
    ap.add_argument("--native", action="store_true",
                    help="also old/new@N with data.template=native (no chat template rendering)")
    ap.add_argument("--old-chat", action="store_true",
                    help="also the baseline on the chat rows (old-chat@CHAT)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    info = c.machine()
    c.print_machine(info)
    cache = Path(os.environ.get("SFT_JOB_CACHE", Path.home() / ".cache" / "sft-job")) / "bench"
    data_dir = cache / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    big = alpaca_file(args.big_rows, data_dir)
    small = _head(big, args.rows, data_dir / f"alpaca-{args.rows}.jsonl")
    chat = chat_file(args.chat_rows, data_dir)
    print(f"data ready in {time.perf_counter() - t0:.0f}s: {big} ({big.stat().st_size / 1e6:.0f} "
          f"MB), {chat} ({chat.stat().st_size / 1e6:.0f} MB)", flush=True)
    work = Path(tempfile.mkdtemp(prefix="sft-job-bench-data-"))
    old = baseline_tree(args.baseline_ref, work)
    new = c.REPO
    results: list[dict[str, Any]] = []
    try:
        for rep in range(args.reps):
            print(f"rep {rep + 1}/{args.reps}", flush=True)
            r, _ = run_arm(f"old@{args.rows}", old, small, args.rows, "alpaca", work)
            results.append({**r, "rep": rep})
            r, _ = run_arm(f"new@{args.rows}", new, small, args.rows, "alpaca", work)
            results.append({**r, "rep": rep})
            r, out = run_arm(f"new@{args.big_rows}", new, big, args.big_rows, "alpaca", work,
                             sigterm_after_commit=True)
            results.append({**r, "rep": rep})
            results.append({**warm_rerun(f"warm@{args.big_rows}", new, big, args.big_rows,
                                         "alpaca", work, out), "rep": rep})
            shutil.rmtree(out, ignore_errors=True)
            for arm, code in ((("old-chat", old),) if args.old_chat else ()) + (("chat", new),):
                r, out = run_arm(f"{arm}@{args.chat_rows}", code, chat, args.chat_rows, "chat",
                                 work)
                results.append({**r, "rep": rep})
                shutil.rmtree(out, ignore_errors=True)
            if args.native:  # alpaca rows in their own template (no chat template to render)
                for arm, code in (("old", old), ("new", new)):
                    r, out = run_arm(f"{arm}-native@{args.rows}", code, small, args.rows,
                                     "alpaca", work, extra=["data.template=native"])
                    results.append({**r, "rep": rep})
                    shutil.rmtree(out, ignore_errors=True)
        if not args.no_two_ranks:
            r, _ = run_arm(f"2ranks@{args.rows}", new, small, args.rows, "alpaca", work,
                           env_extra={"NPROC_PER_NODE": "2",
                                      "MASTER_PORT": str(29500 + os.getpid() % 1000)})
            results.append({**r, "rep": 0})
    finally:
        subprocess.run(["git", "-C", str(c.REPO), "worktree", "remove", "--force", str(old)],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    c.write_json(args.json, {"machine": info, "args": vars(args), "results": results})


def _head(src: Path, n: int, dest: Path) -> Path:
    if not dest.exists():
        with src.open() as f, dest.open("w") as g:
            for _, line in zip(range(n), f, strict=False):
                g.write(line)
    return dest


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["arm"], []).append(r)

    def col(rs: list[dict[str, Any]], k: str) -> str:
        return c.spread([r[k] for r in rs if r.get(k) is not None])

    rows = [[arm, f"{rs[0]['rows']:,}", col(rs, "wall_s"), col(rs, "rows_per_s"),
             col(rs, "cpu_s"), col(rs, "phase_wall_s"), col(rs, "phase_rows_per_s"),
             col(rs, "peak_pss_gb"), col(rs, "peak_rss_gb"), col(rs, "first_step_s"),
             col(rs, "load_before")] for arm, rs in by.items()]
    print()
    print(c.table(["arm", "rows", "start -> data done s", "rows/s", "CPU s", "data phase s",
                   "rows/s (phase)", "peak PSS GB", "peak RSS GB (1 proc)",
                   "start -> 1st step s", "load"], rows))
    old, new, bign = (by.get(f"old@{args.rows}", []), by.get(f"new@{args.rows}", []),
                      by.get(f"new@{args.big_rows}", []))
    compare = [(f"new@{args.rows}", old, new), (f"new@{args.big_rows}", old, bign),
               (f"new-native@{args.rows}", by.get(f"old-native@{args.rows}", []),
                by.get(f"new-native@{args.rows}", [])),
               (f"chat@{args.chat_rows}", by.get(f"old-chat@{args.chat_rows}", []),
                by.get(f"chat@{args.chat_rows}", []))]
    for label, base, other in compare:
        if base and other:  # same rep; the first arm of that name in it (BIG may equal N)
            first = {r["rep"]: r for r in reversed(other)}
            pairs = [(o, first[o["rep"]]) for o in base if o["rep"] in first]
            print(f"{label} vs {base[0]['arm']}, per rep (min/med/max): rows/s x"
                  f"{c.spread([n['rows_per_s'] / o['rows_per_s'] for o, n in pairs])}, "
                  f"data-phase rows/s x"
                  f"{c.spread([n['phase_rows_per_s'] / o['phase_rows_per_s'] for o, n in pairs])}"
                  f", CPU per row x"
                  f"{c.spread([o['cpu_ms_per_row'] / n['cpu_ms_per_row'] for o, n in pairs])}")
    if new and bign:
        growth = [b["peak_pss_gb"] - a["peak_pss_gb"] for a, b in zip(new, bign, strict=False)]
        print(f"peak PSS growth {args.rows:,} -> {args.big_rows:,} rows: {c.spread(growth)} GB")
    two = by.get(f"2ranks@{args.rows}")
    if two:
        print(f"2 ranks: 'data: preparing' logged {two[0]['prepared_lines']}x; ranks: "
              f"{two[0].get('ranks')}")


if __name__ == "__main__":
    main()
