"""Checkpoint uploads in a separate process, one per node, fed by a queue.

The training loop only saves locally; the callback hard-links the files into a staging
folder and puts it on the queue (a pipe: no locks, nothing left behind by a hard exit). This
process uploads, verifies and commits them (commit.py), so the work never holds the training
process's GIL; it runs at a lower CPU priority, so under contention the training process gets
the cores first. Checkpoints are
uploaded in order, except that the stop checkpoint goes before older ones still waiting.

A checkpoint whose upload fails is logged and left uncommitted (rotation deletes it once a
newer one is committed) and training goes on; MAX_FAILURES failed checkpoints in a row, or a
bug in the uploader, end the job with that failure's exit code (3 access, 75 transient, 1 bug).
A dead uploader process counts as a failure of what it had, and a new one takes the next
checkpoint. The process ignores SIGINT/SIGTERM (a launcher signals the whole process group:
the stop checkpoint still has to be uploaded) and dies with the training process (a second
signal, SIGKILL), before it can commit anything more.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.checkpoint import commit
from sft_job.errors import (
    EXIT_ACCESS,
    EXIT_BUG,
    EXIT_RETRY,
    AccessError,
    SftJobError,
    TransientError,
)

log = logging.getLogger(__name__)

MAX_FAILURES = 3  # failed checkpoints in a row that end the job
PART_WAIT_S = 600.0  # how long node 0 waits, after its own part, for the other nodes' parts
POLL_S = 0.5
NICE = 10


@dataclass(frozen=True)
class Config:
    checkpoints_uri: str
    keep: int
    node: int = 0
    nodes: int = 1
    world_size: int = 1
    part_wait_s: float = PART_WAIT_S
    parent_pid: int = 0


@dataclass(frozen=True)
class Job:
    step: int
    folder: str
    token: str
    extras: tuple[tuple[str, str], ...] = ()  # (uri, staged local path), node 0 only
    urgent: bool = False  # the stop checkpoint: older ones still waiting are skipped


@dataclass(frozen=True)
class Result:
    step: int
    status: str  # committed (node 0) | uploaded (other nodes) | skipped | failed
    exit_code: int = 0
    message: str = ""


class Uploader:
    """The training process's handle on its node's uploader process.

    `status[step]` says what became of each submitted checkpoint; `fatal` is the error that
    must end the job (MAX_FAILURES in a row, or a bug), once seen by `poll`/`wait`."""

    def __init__(self, checkpoints_uri: str, keep: int, node: int = 0, nodes: int = 1,
                 world_size: int = 1, part_wait_s: float = PART_WAIT_S) -> None:
        self.config = Config(checkpoints_uri, keep, node, nodes, world_size, part_wait_s,
                             os.getpid())
        self.status: dict[int, str] = {}
        self.fatal: SftJobError | None = None
        self._pending: set[int] = set()
        self._failures = 0
        self._proc: Any = None
        self._start()
        atexit.register(self.kill)  # before multiprocessing's own exit hook, which would join it

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # no fork of a process holding torch threads and sockets
        jobs_r, self._jobs = ctx.Pipe(duplex=False)
        self._results, results_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=serve, args=(self.config, jobs_r, results_w),
                                 name=f"ckpt-upload-node{self.config.node}")
        self._proc.start()
        jobs_r.close()  # the child's ends: closed here, so a dead child reads as end-of-file
        results_w.close()

    def submit(self, step: int, folder: Path, token: str = "",
               extras: dict[str, Path] | None = None, urgent: bool = False) -> None:
        """Queue a staged checkpoint folder (this node's part). `extras`: {uri: local file or
        folder} uploaded after the checkpoint is committed (node 0; folders without a commit
        marker); they are copied now, so they may change afterwards. `urgent`: the stop
        checkpoint, uploaded before older ones still waiting."""
        self.poll()
        if self._proc is None:
            self._start()
        staged = []
        for i, (uri, src) in enumerate(sorted((extras or {}).items())):
            dest = folder.parent / f"{folder.name}.extras" / str(i) / Path(src).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if Path(src).is_dir():
                shutil.copytree(src, dest)
            else:
                shutil.copy2(src, dest)
            staged.append((uri, str(dest)))
        self._pending.add(step)
        self._jobs.send(Job(step, str(folder), token, tuple(staged), urgent))

    def poll(self) -> None:
        """Take in the results that arrived; notice a dead uploader process."""
        self._drain()
        if self._proc is not None and self._proc.exitcode is not None:
            self._drain()
            code = self._proc.exitcode
            lost = sorted(self._pending)
            log.error("the checkpoint uploader (pid %d) died (%s); %s not committed",
                      self._proc.pid, f"signal {-code}" if code < 0 else f"exit {code}",
                      ", ".join(commit.step_name(s) for s in lost) or "nothing in flight")
            self.kill()
            for step in lost:
                self._record(Result(step, "failed", EXIT_RETRY, "the uploader process died"))

    def _drain(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while self._results.poll():
                self._record(self._results.recv())

    def _record(self, r: Result) -> None:
        self.status[r.step] = r.status
        self._pending.discard(r.step)
        if r.status in ("committed", "uploaded"):
            self._failures = 0
        if r.status != "failed":
            return
        self._failures += 1
        err = _error(r.exit_code, f"checkpoint {commit.step_name(r.step)}: {r.message}")
        if r.exit_code == EXIT_BUG or self._failures >= MAX_FAILURES:
            log.error("%d checkpoint upload(s) in a row failed; stopping the job", self._failures)
            self.fatal = self.fatal or err
        else:
            log.error("checkpoint %s was not committed; training goes on (%d of %d failures "
                      "in a row before the job stops)", commit.step_name(r.step), self._failures,
                      MAX_FAILURES)

    def failure_code(self) -> int:
        """The exit code of the failure that must end the job, 0 when there is none."""
        self.poll()
        return self.fatal.exit_code if self.fatal else 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted checkpoint is resolved (True) or `timeout` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if not self._pending:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            with contextlib.suppress(EOFError, OSError):
                if self._results.poll(0.1):
                    self._record(self._results.recv())
                    continue
            time.sleep(0.05)  # a dead child's pipe polls ready at once

    def close(self) -> None:
        """Let the process finish what it has and exit (killed if it takes over 60 s)."""
        if self._proc is None:
            return
        with contextlib.suppress(ValueError, OSError):
            self._jobs.send(None)
        self._proc.join(60)
        self.kill()

    def kill(self) -> None:
        """End the process now; whatever it was uploading stays uncommitted."""
        if self._proc is None:
            return
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join(10)
        for conn in (self._jobs, self._results):
            conn.close()
        self._proc = None


def _error(code: int, message: str) -> SftJobError:
    if code == EXIT_ACCESS:
        return AccessError(message)
    if code == EXIT_RETRY:
        return TransientError(message)
    err = SftJobError(f"{message} (a bug in the checkpoint uploader: see its traceback above)")
    err.exit_code = code or EXIT_BUG
    return err


# --------------------------------------------------------------- the uploader process


def serve(config: Config, jobs: Any, results: Any) -> None:
    """Main loop of the uploader process."""
    _detach(config.parent_pid)
    _setup_logging(config)
    log.info("checkpoint uploader started (pid %d)", os.getpid())
    try:  # imports, client, credentials and a connection now, not at the first checkpoint
        storage.list_keys(config.checkpoints_uri)
    except SftJobError as err:
        log.warning("%s", err)
    worker = _Worker(config, results)
    while True:
        batch = _take(jobs, block=not worker.pending)
        ckpts = [j for j in batch if j is not None]
        if ckpts and ckpts[-1].urgent:  # the stop checkpoint goes before older ones waiting
            for old in ckpts[:-1]:
                log.info("checkpoint %s skipped: the stop checkpoint %s goes first",
                         commit.step_name(old.step), commit.step_name(ckpts[-1].step))
                worker.done(old, Result(old.step, "skipped"))
            ckpts = ckpts[-1:]
        for job in ckpts:
            worker.upload(job)
            worker.check_pending()
        worker.check_pending()
        if None in batch:
            return


def _take(jobs: Any, block: bool) -> list[Job | None]:
    if not jobs.poll(None if block else POLL_S):
        return []
    items = []
    while jobs.poll():
        try:
            items.append(jobs.recv())
        except EOFError:  # the training process is gone
            items.append(None)
            break
    return items


@dataclass
class _Pending:
    job: Job
    own: dict[str, Any]
    t0: float
    deadline: float


class _Worker:
    def __init__(self, config: Config, results: Any) -> None:
        self.c = config
        self.results = results
        self.pending: dict[int, _Pending] = {}
        self.newest_committed = -1

    def uri(self, step: int) -> str:
        return storage.join(self.c.checkpoints_uri, commit.step_name(step))

    def done(self, job: Job, result: Result) -> None:
        self.pending.pop(job.step, None)
        shutil.rmtree(job.folder, ignore_errors=True)
        shutil.rmtree(f"{job.folder}.extras", ignore_errors=True)
        self.results.send(result)

    def fail(self, job: Job, err: BaseException) -> None:
        if isinstance(err, PermissionError):
            err = AccessError(f"{err.filename or ''}: permission denied ({err.strerror})")
        elif isinstance(err, OSError) and not isinstance(err, SftJobError):
            err = TransientError(f"{err.filename or ''}: {err.strerror or err}")
        if isinstance(err, SftJobError):
            log.error("checkpoint %s upload failed: %s", commit.step_name(job.step), err)
            result = Result(job.step, "failed", err.exit_code, str(err))
        else:
            log.exception("checkpoint %s: unexpected error in the uploader",
                          commit.step_name(job.step))
            result = Result(job.step, "failed", EXIT_BUG, f"{type(err).__name__}: {err}")
        self.done(job, result)

    def upload(self, job: Job) -> None:
        t0 = time.monotonic()
        try:
            own = commit.upload_part(Path(job.folder), self.uri(job.step), self.c.node, job.token)
        except Exception as err:
            self.fail(job, err)
            return
        if self.c.node:
            log.info("node %d: its part of checkpoint %s uploaded in %.1fs", self.c.node,
                     commit.step_name(job.step), time.monotonic() - t0)
            self.done(job, Result(job.step, "uploaded"))
            return
        now = time.monotonic()
        self.pending[job.step] = _Pending(job, own, t0, now + self.c.part_wait_s)

    def check_pending(self) -> None:
        """Node 0: commit each pending checkpoint whose parts have all arrived."""
        for step in sorted(self.pending):
            p = self.pending[step]
            if step < self.newest_committed:
                log.info("checkpoint %s dropped: the newer %s is committed",
                         commit.step_name(step), commit.step_name(self.newest_committed))
                self.done(p.job, Result(step, "skipped"))
                continue
            try:
                parts = commit.parts_ready(self.uri(step), self.c.nodes, p.job.token)
                if parts is None:
                    if time.monotonic() > p.deadline:
                        raise TransientError(f"not every node uploaded its part within "
                                             f"{self.c.part_wait_s:.0f}s of node 0's")
                    continue
                if os.getppid() != self.c.parent_pid:
                    os._exit(0)  # the training process is gone: commit nothing more
                meta = {"step": step, "world_size": self.c.world_size, "nodes": self.c.nodes}
                commit.commit(self.uri(step), p.own, parts, meta)
            except Exception as err:
                self.fail(p.job, err)
                continue
            log.info("checkpoint %s committed to %s in %.1fs", commit.step_name(step),
                     self.uri(step), time.monotonic() - p.t0)
            self.newest_committed = step
            self._after_commit(p.job)
            self.done(p.job, Result(step, "committed"))

    def _after_commit(self, job: Job) -> None:
        """Extras, then rotation: failures here are logged, the checkpoint is committed."""
        try:
            for uri, path in job.extras:
                if Path(path).is_dir():
                    storage.put_dir(Path(path), uri, commit=False)
                else:
                    storage.put_file(Path(path), uri)
            commit.rotate(self.c.checkpoints_uri, self.c.keep, job.step)
        except SftJobError as err:
            log.error("after committing checkpoint %s: %s", commit.step_name(job.step), err)


def _detach(parent_pid: int) -> None:
    """Ignore the signals meant for the training process, die with it, yield the CPU to it."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)
    with contextlib.suppress(OSError):
        os.nice(NICE)


def _setup_logging(config: Config) -> None:
    tag = f"[node {config.node} uploader] " if config.nodes > 1 else "[uploader] "
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {tag}%(message)s",
                        datefmt="%H:%M:%S", force=True)
    for name in ("urllib3", "botocore", "boto3", "s3transfer", "google", "httpx",
                 "huggingface_hub", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)

