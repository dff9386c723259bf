"""Where a run is, written by the job for `sft-job status`: output.uri/progress.json.

    {"phase": "training", "step": 120, "max_steps": 1000, "train_loss": 1.23, ...}

Rank 0 writes it once the checks have passed (with job.yaml), at most every
`output.progress_every_seconds` while training (and that often as a heartbeat while starting
or finishing, which have no step events), at every checkpoint save and phase change, and when
the job stops (phase preempted or failed, with the exit code). TensorBoard event files go
to output.uri/metrics/tensorboard/ at every checkpoint save too. One background thread does
the writes, so training never waits on the bucket; a write that fails is logged and the next
one replaces it (the file is advisory: checkpoints and _SUCCESS stay the source of truth).
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.errors import EXIT_BUG, SftJobError
from sft_job.spec import JobSpec

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
TENSORBOARD_DIR = "metrics/tensorboard"  # under output.uri, and under the local stage
HEARTBEAT = ("starting", "finishing")  # phases without step events: rewritten on a timer


def utc(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def read_progress(out_uri: str) -> dict[str, Any] | None:
    """The progress file of the run at `out_uri`, or None when there is none (or it is not
    JSON: an advisory file never stops a job or a status)."""
    uri = storage.join(out_uri, PROGRESS_FILE)
    if not storage.exists(uri):
        return None
    try:
        doc = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError):
        log.warning("%s is not JSON; ignored", uri)
        return None
    return doc if isinstance(doc, dict) else None


class Reporter:
    """Writes progress.json and syncs TensorBoard files for one attempt of a job. A context
    manager around the whole run: on the way out it records the outcome (done, preempted,
    failed) and closes the trackers. Does nothing until `start` (rank 0, checks passed)."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.uri = storage.join(spec.output.uri, PROGRESS_FILE)
        self.state: dict[str, Any] = {}
        self.trackers: Any = None
        self._tb_local: Path | None = None
        self._snaps: Path | None = None
        self._nsnap = 0
        self._pending: tuple[dict[str, Any] | None, Path | None] = (None, None)
        self._cond = threading.Condition()
        self._busy = False
        self._last_write = 0.0
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self, stage: Path, resume_step: int | None) -> None:
        """Record the attempt (phase starting), fetch the TensorBoard files of earlier attempts
        and open the trackers. Call after the checks that can refuse the job."""
        from sft_job.train.trackers import Trackers

        prev = read_progress(self.spec.output.uri) or {}
        now = utc()
        self.state = {
            "version": 1, "name": self.spec.name, "phase": "starting", "step": resume_step or 0,
            "max_steps": None, "resumed_from_step": resume_step,
            "attempt": int(prev.get("attempt", 0)) + 1 if resume_step is not None else 1,
            "started_at": prev.get("started_at", now) if resume_step is not None else now,
            "attempt_started_at": now, "host": socket.gethostname(),
        }
        self._tb_local = stage / TENSORBOARD_DIR
        self._snaps = stage.parent / "tensorboard-uploads"
        shutil.rmtree(self._snaps, ignore_errors=True)
        if "tensorboard" in self.spec.train.report_to:
            remote = storage.join(self.spec.output.uri, TENSORBOARD_DIR)
            if storage.list_keys(remote):
                storage.get_dir(remote, self._tb_local)
        # trackers first: one that cannot start its run (no key...) stops the job before
        # progress.json, job.yaml or a checkpoint is written
        self.trackers = Trackers(self.spec, self._tb_local)
        self.trackers.open(resume_step, prev.get("trackers") or {})
        if self.trackers.ids:
            self.state["trackers"] = dict(self.trackers.ids)
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()
        self.update(force=True)

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> bool:
        if self._thread is None:
            if self.trackers is not None:  # opened some, then one failed to start
                self.trackers.close(getattr(exc, "exit_code", EXIT_BUG))
            return False
        code = 0 if exc is None else getattr(exc, "exit_code", EXIT_BUG)
        if isinstance(exc, KeyboardInterrupt):
            code = 130
        if exc is None:
            self.update(force=True, phase="done")
        else:
            msg = str(exc) if isinstance(exc, SftJobError) else f"{type(exc).__name__}: {exc}"
            self.update(force=True, phase="preempted" if code == 75 else "failed",
                        exit_code=code, error=msg.replace("\n", " ")[:500])
        self.flush(timeout=10)
        if self.trackers is not None:
            self.trackers.close(code)
        return False

    # -------------------------------------------------------------- updates

    def update(self, force: bool = False, tensorboard: bool = False, **fields: Any) -> None:
        """Merge `fields` into the state and queue a write: now when `force` (or when the
        TensorBoard files are to go up too), else only if the last one is old enough."""
        if self._thread is None:
            return
        with self._cond:
            self.state.update(fields)
        now = time.monotonic()
        if not (force or tensorboard) and now - self._last_write < self.spec.output.progress_every_seconds:
            return
        self._last_write = now
        snap = None
        if tensorboard and self._snaps is not None and self._tb_local is not None \
                and self._tb_local.is_dir():
            # a copy: the writer appends to its event files while the upload reads them
            self._nsnap += 1
            snap = shutil.copytree(self._tb_local, self._snaps / str(self._nsnap))
        with self._cond:
            old_snap = self._pending[1]
            if snap is not None and old_snap is not None:  # queued, not started: superseded
                shutil.rmtree(old_snap, ignore_errors=True)
            self.state["updated_at"] = utc()
            self._pending = (dict(self.state), snap or old_snap)
            self._cond.notify_all()

    def attach(self, trainer: Any) -> None:
        """Hand the trackers' writers to the trainer's callbacks (see trackers.attach)."""
        if self.trackers is not None:
            self.trackers.attach(trainer)

    def finishing(self) -> None:
        """Training is over: say so, and let queued TensorBoard uploads land before the final
        upload of metrics/ (an older copy must not overwrite the final event files)."""
        self.update(force=True, phase="finishing")
        self.flush(timeout=120)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued write is done (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending != (None, None) or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("progress: writes still pending after %.0fs", timeout)
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending == (None, None):
                    idle = not self._cond.wait(timeout=self.spec.output.progress_every_seconds)
                    if idle and self.state.get("phase") in HEARTBEAT:
                        # no step events while starting or finishing (a long merge or upload):
                        # a heartbeat, so status does not call a live job stalled
                        self.state["updated_at"] = utc()
                        self._pending = (dict(self.state), None)
                doc, snap = self._pending
                self._pending, self._busy = (None, None), True
            try:
                if snap is not None:
                    storage.put_dir(snap, storage.join(self.spec.output.uri, TENSORBOARD_DIR),
                                    commit=False)
                    shutil.rmtree(snap, ignore_errors=True)
                if doc is not None:
                    storage.write_text(self.uri, json.dumps(doc, indent=1))
            except (SftJobError, OSError) as e:  # advisory: the next write replaces it
                log.warning("progress: could not write to %s: %s", self.spec.output.uri, e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def callback(self, collator: Any) -> Any:
        """A TrainerCallback feeding the reporter: steps, losses, speed, checkpoint saves.
        `collator`: the trainer's CountingCollator (tokens handed out, for tokens/s)."""
        from transformers import TrainerCallback

        rep = self

        class Progress(TrainerCallback):
            t0 = 0.0
            step0 = 0
            tokens0 = 0

            def on_train_begin(self, args, state, control, **kw):
                self.t0, self.step0 = time.monotonic(), state.global_step
                self.tokens0 = collator.tokens
                rep.update(force=True, phase="training", step=state.global_step,
                           max_steps=state.max_steps)

            def on_step_end(self, args, state, control, **kw):
                rep.update(**self._speed(state))  # written only if the last one is old enough

            def on_log(self, args, state, control, logs=None, **kw):
                logs = logs or {}
                fields = self._speed(state)
                if "loss" in logs:
                    fields.update(train_loss=_num(logs["loss"]), train_loss_step=state.global_step,
                                  learning_rate=_num(logs.get("learning_rate")),
                                  epoch=_num(logs.get("epoch")))
                if "eval_loss" in logs:
                    fields.update(eval_loss=_num(logs["eval_loss"]), eval_loss_step=state.global_step)
                rep.update(**fields)

            def on_save(self, args, state, control, **kw):
                rep.update(tensorboard=True, checkpoint_saved_step=state.global_step,
                           **self._speed(state))

            def _speed(self, state: Any) -> dict[str, Any]:
                done, dt = state.global_step - self.step0, time.monotonic() - self.t0
                out: dict[str, Any] = {"step": state.global_step, "max_steps": state.max_steps}
                if done > 0 and dt > 0:
                    out["seconds_per_step"] = round(dt / done, 3)
                    tokens = collator.tokens - self.tokens0
                    out["tokens_per_s"] = round(tokens / dt, 1) if tokens else None
                return out

        return Progress()


def _num(v: Any) -> Any:
    try:
        return round(float(v), 6)
    except (TypeError, ValueError):
        return None
