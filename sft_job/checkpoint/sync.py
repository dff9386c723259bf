"""Checkpoints in the bucket: background upload with commit markers, rotation, and resume.

    output.uri/checkpoints/step-000500/   trainer checkpoint + sft_job_state.json, COMMITTED last

The trainer saves locally (HF Trainer: weights/adapter, optimizer, scheduler, RNG states,
trainer_state with the step, so the data loader skips exactly the batches already seen); the
callback hard-links that folder into a private staging copy (instant, and immune to the
trainer's own rotation) and a background thread uploads and commits it while training goes on.
Old committed checkpoints beyond `output.keep_checkpoints` are deleted only after a newer one
is committed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.errors import SftJobError, SpecError, TransientError
from sft_job.spec import JobSpec

log = logging.getLogger(__name__)

STATE_FILE = "sft_job_state.json"
METRICS_FILE = "sft_job_metrics.jsonl"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def data_hash(files: list[Path]) -> str:
    """sha256 over the data files' names and contents (a changed dataset is a different run)."""
    h = hashlib.sha256()
    for f in sorted(files):
        paths = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
        for p in paths:
            h.update(p.name.encode())
            with p.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


class Uploader:
    """One background thread committing checkpoint folders in order, then rotating."""

    def __init__(self, checkpoints_uri: str, keep: int) -> None:
        self.uri = checkpoints_uri
        self.keep = keep
        self._q: queue.Queue[tuple[int, Path] | None] = queue.Queue()
        self.committed: list[int] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ckpt-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int, folder: Path) -> None:
        self._q.put((step, folder))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                self._upload(*item)
            except BaseException as e:  # surfaced by wait(); the thread must not die silently
                log.error("checkpoint upload failed: %s", e)
                self.error = e
            finally:
                self._q.task_done()

    def _upload(self, step: int, folder: Path) -> None:
        t0 = time.perf_counter()
        dest = storage.join(self.uri, step_name(step))
        storage.put_dir(folder, dest, commit=True)  # COMMITTED marker written last
        self.committed.append(step)
        log.info("checkpoint %s committed to %s in %.1fs", step_name(step), dest,
                 time.perf_counter() - t0)
        shutil.rmtree(folder, ignore_errors=True)
        self._rotate(step)

    def _rotate(self, newest: int) -> None:
        committed = storage.committed_dirs(self.uri)
        for old in committed[self.keep:]:
            log.info("deleting old checkpoint %s", old)
            storage.delete_prefix(old)  # marker first, so a half-deleted one is never 'committed'
        # uploads cut short (a preempted run) older than a committed checkpoint can never be
        # resumed from: remove them too, or they would stay in the bucket for good
        done = {u.rstrip("/").rsplit("/", 1)[-1] for u in committed}
        names = {k.split("/", 1)[0] for k in storage.list_keys(self.uri) if "/" in k}
        for name in sorted(names - done):
            m = re.fullmatch(r"step-(\d+)", name)
            if m and int(m.group(1)) < newest:
                log.info("deleting the unfinished upload %s", name)
                storage.delete_prefix(storage.join(self.uri, name))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted upload is done (True) or `timeout` passes (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._q.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        if self.error is not None:
            err = self.error
            if isinstance(err, SftJobError):
                raise err
            raise TransientError(f"checkpoint upload failed: {err}") from err
        return True

    def close(self) -> None:
        self._q.put(None)


def link_copy(src: Path, dest: Path) -> Path:
    """Hard-link every file of `src` into `dest` (copy where links are not possible)."""
    for f in src.rglob("*"):
        if f.is_file():
            target = dest / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)
    return dest


def callback(spec: JobSpec, uploader: Uploader | None, stop: Any, state: dict[str, Any],
             metrics_path: Path, staging: Path) -> Any:
    """TrainerCallback: time-based saves, SIGTERM -> save + stop, and on_save -> upload."""
    from transformers import TrainerCallback

    from sft_job.checkpoint.preempt import agree

    every_s = spec.output.save_every_minutes * 60 if spec.output.save_every_minutes else None

    class CheckpointSync(TrainerCallback):
        def __init__(self) -> None:
            self.last_save = time.monotonic()
            self.stopped_at: int | None = None

        def on_step_end(self, args, state_, control, **kw):
            if agree(bool(stop.requested)):
                self.stopped_at = state_.global_step
                control.should_save = True
                control.should_training_stop = True
            elif every_s and agree(time.monotonic() - self.last_save >= every_s):
                control.should_save = True
            return control

        def on_save(self, args, state_, control, **kw):
            self.last_save = time.monotonic()
            if uploader is None or not state_.is_world_process_zero:
                return control
            src = Path(args.output_dir) / f"checkpoint-{state_.global_step}"
            dest = link_copy(src, staging / step_name(state_.global_step))
            (dest / STATE_FILE).write_text(json.dumps({**state, "step": state_.global_step}))
            if metrics_path.is_file():
                shutil.copyfile(metrics_path, dest / METRICS_FILE)
            uploader.submit(state_.global_step, dest)
            return control

    return CheckpointSync()


def find_resume(spec: JobSpec, work: Path, state: dict[str, Any],
                allow_changed: bool) -> tuple[Path, int] | None:
    """The newest committed checkpoint in output.uri, downloaded, checked against this run's
    spec and data hashes; None for a fresh start."""
    uri = storage.join(spec.output.uri, "checkpoints")
    latest = storage.latest_committed(uri)
    if latest is None:
        return None
    local = work / "resume" / latest.rstrip("/").rsplit("/", 1)[-1]
    if local.exists():
        shutil.rmtree(local)
    storage.get_dir(latest, local)
    saved = json.loads((local / STATE_FILE).read_text()) if (local / STATE_FILE).is_file() else {}
    changed = _changed_fields(saved, state)
    if changed and not allow_changed:
        raise SpecError(f"{latest}: the checkpoint was made by a different run ({', '.join(changed)} "
                        "changed); rerun with --allow-changed to resume anyway, or use a new "
                        "output.uri")
    if changed:
        log.warning("resuming from %s although %s changed (--allow-changed)", latest,
                    ", ".join(changed))
    step = int(saved.get("step") or latest.rsplit("-", 1)[-1])
    log.info("resuming from committed checkpoint %s (step %d)", latest, step)
    return local, step


def _changed_fields(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    if saved.get("data_hash") and saved["data_hash"] != now["data_hash"]:
        out.append("data files")
    old, new = saved.get("spec", {}), now["spec"]
    out += [f"spec {k}" for k in _diff(old, new)]
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if a != b else []


def is_final(resume_dir: Path) -> bool:
    """The checkpoint was taken at the last step (the run was stopped between its end and
    _SUCCESS): resuming must not train again (HF Trainer would run one step past max_steps)."""
    f = resume_dir / "trainer_state.json"
    if not f.is_file():
        return False
    st = json.loads(f.read_text())
    return bool(st.get("max_steps")) and st.get("global_step", 0) >= st["max_steps"]


def load_final(trainer: Any, resume_dir: Path) -> Any:
    """Load the weights and state of a final checkpoint into the trainer, without training."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(str(resume_dir))  # the Trainer's own loader (PEFT-aware)
    trainer.state = TrainerState.load_from_json(str(resume_dir / "trainer_state.json"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log.info("the checkpoint is the final step (%d): skipping training, finishing",
             trainer.state.global_step)
    return TrainOutput(trainer.state.global_step, losses[-1] if losses else float("nan"), {})


def restore_metrics(resume_dir: Path, metrics_path: Path, step: int) -> None:
    """Put back the metrics logged before the checkpoint, so metrics.jsonl is one sequence."""
    src = resume_dir / METRICS_FILE
    if not src.is_file():
        return
    lines = [ln for ln in src.read_text().splitlines()
             if ln.strip() and json.loads(ln).get("step", 0) <= step]
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text("".join(ln + "\n" for ln in lines))


def run_state(spec: JobSpec, data_files: list[Path]) -> dict[str, Any]:
    """What a checkpoint records about the run that made it."""
    from sft_job.spec import RUN_NEUTRAL

    d = spec.model_dump(mode="json", exclude=RUN_NEUTRAL)
    for k in ("output", "eval", "resources"):
        d.pop(k, None)
    return {"spec_hash": spec.run_hash(), "data_hash": data_hash(data_files), "spec": d}
