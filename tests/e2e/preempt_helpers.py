"""Helpers for tests/e2e/test_preempt.py: the CLI as a live subprocess whose log can be waited
on and signalled, a recording/slowing wrapper around tests.servers.fault_proxy, and checks of
what is in the bucket (committed checkpoints against their COMMITTED manifest)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import REPO, cli_env
from tests.servers import FaultProxy, fault_proxy

STEP_LINE = re.compile(r" step (\d+)/(\d+) ")
PREEMPTED = re.compile(r"preempted by (\w+) at step (\d+)")
RESUMED = re.compile(r"resuming from committed checkpoint (\S+) \(step (\d+)\)")


class Job:
    """`python -m sft_job ARGS` running in the background; stderr is collected line by line so
    a test can wait for a log line, then signal the process."""

    def __init__(self, args: list[str], cache: Path, env: dict[str, str],
                 cwd: Path = REPO) -> None:
        self.args = args
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() when each stderr line was read
        self._cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "sft_job", *args], cwd=cwd,
                                     env=cli_env(cache, **env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self._out: list[str] = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stderr, True),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stdout, False),
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, is_err: bool) -> None:
        for line in stream:
            with self._cond:
                if is_err:
                    self.lines.append(line.rstrip("\n"))
                    self.times.append(time.monotonic())
                else:
                    self._out.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    @property
    def stdout(self) -> str:
        with self._cond:
            return "\n".join(self._out)

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 300, start: int = 0,
                 pred: Any = None) -> re.Match[str]:
        """The first stderr line (from index `start`) matching `pattern` (and `pred(match)`);
        fails on timeout or if the process ends without printing it."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m and (pred is None or pred(m)):
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise AssertionError(f"exited {self.proc.returncode} before logging "
                                         f"{rx.pattern!r}:\n{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {rx.pattern!r} within {timeout}s:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def wait_step(self, n: int, timeout: float = 300) -> None:
        """Wait for the log line of optimizer step n (or a later one)."""
        self.wait_for(STEP_LINE, timeout, pred=lambda m: int(m.group(1)) >= n)

    def step_times(self) -> list[tuple[int, float]]:
        """(step, time the step's log line was read) for every logged optimizer step."""
        with self._cond:
            return [(int(m.group(1)), t) for ln, t in zip(self.lines, self.times, strict=True)
                    if (m := STEP_LINE.search(ln))]

    def line_time(self, pattern: str) -> float:
        """When the first stderr line matching `pattern` was read (time.monotonic())."""
        with self._cond:
            found = [t for ln, t in zip(self.lines, self.times, strict=True)
                     if re.search(pattern, ln)]
        assert found, f"no {pattern!r} in:\n{self.tail()}"
        return found[0]

    def steps_logged(self) -> list[int]:
        return [int(m.group(1)) for ln in self.stderr.splitlines() if (m := STEP_LINE.search(ln))]

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout}s:\n{self.tail()}") from None
        for t in self._threads:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def tail(self, n: int = 4000) -> str:
        return self.stderr[-n:]


@contextlib.contextmanager
def job(args: list[str], cache: Path, env: dict[str, str]) -> Iterator[Job]:
    """A Job that is SIGKILLed (by its own PID) if the test leaves it running."""
    j = Job(args, cache, env)
    try:
        yield j
    finally:
        j.kill()


# ------------------------------------------------------------------------------ proxy


@dataclass
class Recorder:
    """Wraps a FaultProxy's per-request decision: records every request (time, method, path,
    injected fault) and can delay matching requests before they are forwarded."""

    proxy: FaultProxy
    delay_s: float = 0.0
    delay_match: str = r"^PUT .*/checkpoints/"
    log: list[tuple[float, str, str, str | None]] = field(default_factory=list)
    seen: threading.Event = field(default_factory=threading.Event)
    seen_match: str = r"^$"
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> None:
        inner = self.proxy.decide

        def decide(method: str, path: str) -> str | None:
            fault = inner(method, path)
            req = f"{method} {path}"
            with self._lock:
                self.log.append((time.monotonic(), method, path, fault))
                if re.search(self.seen_match, req):
                    self.seen.set()
                delay = self.delay_s if re.search(self.delay_match, req) else 0.0
            if delay and fault is None:
                time.sleep(delay)
            return fault

        self.proxy.decide = decide  # type: ignore[method-assign]

    def watch(self, pattern: str) -> threading.Event:
        """An Event set when a request matching `pattern` ("METHOD /bucket/key?query") arrives."""
        with self._lock:
            self.seen = threading.Event()
            self.seen_match = pattern
            return self.seen

    def forwarded(self) -> list[tuple[str, str]]:
        """(method, path) of the requests passed on to S3, in arrival order."""
        with self._lock:
            return [(m, p) for _, m, p, f in self.log if f is None]


@contextlib.contextmanager
def recording_proxy(upstream: str, **faults: Any) -> Iterator[tuple[FaultProxy, Recorder]]:
    with fault_proxy(upstream, **faults) as proxy:
        rec = Recorder(proxy)
        rec.install()
        yield proxy, rec


# ----------------------------------------------------------------------------- bucket


def list_objects(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Every object under `prefix/`, by key relative to it."""
    p = prefix.strip("/") + "/"
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p):
        for o in page.get("Contents", []):
            out[o["Key"][len(p):]] = o
    return out


def step_dirs(client: Any, bucket: str, prefix: str) -> dict[int, dict[str, dict[str, Any]]]:
    """Every checkpoints/step-N/ folder under the run prefix (committed or not), by N."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for rel, o in list_objects(client, bucket, f"{prefix}/checkpoints").items():
        m = re.fullmatch(r"step-(\d+)/(.+)", rel)
        assert m, f"unexpected object checkpoints/{rel}"
        out.setdefault(int(m.group(1)), {})[m.group(2)] = o
    return out


def check_checkpoints(client: Any, bucket: str, prefix: str) -> tuple[list[int], list[int]]:
    """Assert each committed checkpoint holds exactly the files (and sizes) its COMMITTED
    manifest lists, and a trainer_state.json at its own step; return (committed, partial)
    step numbers, ascending."""
    committed, partial = [], []
    for step, objs in sorted(step_dirs(client, bucket, prefix).items()):
        if "COMMITTED" not in objs:
            partial.append(step)
            continue
        committed.append(step)
        man = json.loads(read(client, bucket, f"{prefix}/checkpoints/step-{step:06d}/COMMITTED"))
        have = {k: o["Size"] for k, o in objs.items() if k != "COMMITTED"}
        assert have == man["files"], f"step-{step:06d}: objects {have} != manifest {man['files']}"
        for must in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                     "sft_job_state.json"):
            assert must in have, f"step-{step:06d} is committed without {must}"
        state = json.loads(read(client, bucket,
                                f"{prefix}/checkpoints/step-{step:06d}/trainer_state.json"))
        assert state["global_step"] == step
    return committed, partial


def read(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def final_weights(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """sha256 of the merged model's and the adapter's safetensors in the bucket."""
    return {k: sha256(read(client, bucket, f"{prefix}/{k}"))
            for k in ("model/model.safetensors", "adapter/adapter_model.safetensors")}


def loss_sequence(client: Any, bucket: str, prefix: str) -> list[tuple[int, float, float, float]]:
    """(step, loss, grad_norm, learning_rate) of every training log record in metrics.jsonl."""
    text = read(client, bucket, f"{prefix}/metrics/metrics.jsonl").decode()
    recs = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    return [(r["step"], r["loss"], r["grad_norm"], r["learning_rate"]) for r in recs
            if "loss" in r]


def copy_prefix(client: Any, bucket: str, src: str, dest: str) -> None:
    """Server-side copy of every object under src/ to dest/ (the marker last)."""
    objs = sorted(list_objects(client, bucket, src), key=lambda k: k.endswith("COMMITTED"))
    for rel in objs:
        client.copy_object(Bucket=bucket, Key=f"{dest}/{rel}",
                           CopySource={"Bucket": bucket, "Key": f"{src}/{rel}"})


def env_threads() -> dict[str, str]:
    """One intra-op thread: on a busy 2-core machine this is faster, and every run (baseline
    and resumed) must use the same setting for bitwise-equal results."""
    return {"OMP_NUM_THREADS": os.environ.get("SFT_JOB_TEST_THREADS", "1")}
