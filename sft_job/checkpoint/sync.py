"""Checkpoints, the training side: save, stage, queue; stop in every phase; resume.

    output.uri/checkpoints/step-000500/   trainer checkpoint + sft_job_state.json, COMMITTED last

The trainer saves locally (HF Trainer: weights/adapter, optimizer, scheduler, RNG states,
trainer_state with the step, so the data loader skips exactly the batches already seen;
DeepSpeed: each rank its partitions). On every node, local rank 0 hard-links the files its
node's ranks wrote into a private staging copy (instant, and immune to the trainer's own
rotation) and queues it for the node's uploader process (uploader.py); node 0 commits the
checkpoint once every node's part is in the bucket (commit.py). The training loop only
waits for the local save.

A stop request (SIGTERM) is honoured in every phase of training: at the next step boundary
(finish the step, save, upload, exit 75); during an evaluation, which the evaluation loop
abandons at its next batch, so the step it follows is checkpointed at once (the checkpoint
records it, and a resumed run runs that evaluation first: the metrics match an uninterrupted
run's); during a periodic save, which then becomes the stop checkpoint, with no further step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.checkpoint import commit
from sft_job.checkpoint.commit import step_name
from sft_job.errors import EXIT_ACCESS, EXIT_BUG, EXIT_RETRY, Preempted, SftJobError, SpecError
from sft_job.spec import JobSpec, changed_fields
from sft_job.topology import Topology

log = logging.getLogger(__name__)

STATE_FILE = "sft_job_state.json"
METRICS_FILE = "sft_job_metrics.jsonl"


@dataclass(frozen=True)
class Resume:
    dir: Path
    step: int
    eval_pending: bool = False  # the stop abandoned the evaluation at this step: run it first


def link_copy(src: Path, dest: Path, files: list[str] | None = None) -> Path:
    """Hard-link `files` (relative paths; default all) of `src` into `dest` (copy where links
    are not possible)."""
    rels = files if files is not None else [f.relative_to(src).as_posix()
                                            for f in src.rglob("*") if f.is_file()]
    for rel in rels:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src / rel, target)
        except OSError:
            shutil.copy2(src / rel, target)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def callback(spec: JobSpec, uploader: Any, stop: Any, state: dict[str, Any], metrics_path: Path,
             staging: Path, topo: Topology | None = None, resumed_step: int | None = None,
             eval_every: int | None = None, extras: Any = None) -> Any:
    """TrainerCallback: time-based saves, stop requests (step boundary, save; after the
    evaluation callback, so after an evaluation a stop abandoned), and on_save -> stage this
    node's part and queue it. `uploader`: this node's (local rank 0), else None. `eval_every`:
    train.eval_steps when there is eval data. `extras(step) -> {uri: path}`: more to upload
    with a checkpoint (node 0)."""
    from transformers import TrainerCallback

    class CheckpointSync(_Sync, TrainerCallback):
        """_Sync's events on transformers' callback interface."""

    return CheckpointSync(spec, uploader, stop, state, metrics_path, staging, topo or Topology(),
                          resumed_step, eval_every, extras)


class _Sync:
    """The checkpoint callback's state and events (see `callback`, which gives it the
    TrainerCallback interface: this module imports no transformers until a trainer needs it)."""

    def __init__(self, spec: JobSpec, uploader: Any, stop: Any, state: dict[str, Any],
                 metrics_path: Path, staging: Path, topo: Topology, resumed_step: int | None,
                 eval_every: int | None, extras: Any) -> None:
        self.uploader, self.stop, self.run_state, self.topo = uploader, stop, state, topo
        self.metrics_path, self.staging, self.extras = metrics_path, staging, extras
        self.eval_every = eval_every
        self.every_s = spec.output.save_every_minutes * 60 if spec.output.save_every_minutes \
            else None
        self.last_save = time.monotonic()
        self.stopped_at: int | None = None
        self.last_saved: int | None = None
        self.resumed_step = resumed_step
        self.evaluated_at: int | None = None
        self.eval_pending_at: int | None = None
        self._token: str | None = None
        self._ranks = {topo.rank}

    def on_log(self, args, state_, control, logs=None, **kw):
        if logs and "eval_loss" in logs:
            self.evaluated_at = state_.global_step

    def on_step_end(self, args, state_, control, **kw):
        from sft_job.checkpoint.preempt import agree

        if agree(bool(self.stop.requested)):
            self.stopped_at = state_.global_step
            control.should_save = True
            control.should_training_stop = True
        elif self.every_s and agree(time.monotonic() - self.last_save >= self.every_s):
            control.should_save = True
        return control

    def on_save(self, args, state_, control, **kw):
        from transformers.trainer_utils import rotate_checkpoints

        from sft_job.checkpoint.preempt import agree_max

        self.last_save = time.monotonic()
        step = self.last_saved = state_.global_step
        code = self.uploader.failure_code() if self.uploader is not None else 0
        # every rank has written its files once all are here (this all-reduce is a
        # barrier); agree on a stop requested during the save and on failing uploads
        stop_now, worst = agree_max([int(bool(self.stop.requested)), _SEVERITY.get(code, 2)])
        if worst:
            raise _failure(self.uploader, worst)
        self._meet()
        if stop_now and self._eval_abandoned(step, state_.max_steps):
            self.eval_pending_at = step
            log.warning("stop requested during the evaluation at step %d: abandoned, the "
                        "checkpoint comes first (a resumed run evaluates step %d first)",
                        step, step)
        if self.uploader is not None:
            self._stage(args, step, urgent=bool(stop_now))
        if not args.should_save and self.topo.local_rank == 0:  # the Trainer rotates on rank 0 only
            rotate_checkpoints(args.output_dir, args.save_total_limit)
        if stop_now:
            if not control.should_training_stop:
                log.warning("stop requested during the save of step %d: it is the stop "
                            "checkpoint", step)
            control.should_training_stop = True
            self.stopped_at = step
        return control

    def _eval_abandoned(self, step: int, max_steps: int) -> bool:
        """An evaluation was due at `step` and the stop left it undone."""
        every = self.eval_every
        due = bool(every) and not step % every and step < max_steps
        return due and self.evaluated_at != step

    def _meet(self) -> None:
        """First save: share one attempt token (rank 0's) and learn this node's ranks."""
        if self._token is not None:
            return
        import torch.distributed as dist

        topo = self.topo
        mine = (topo.rank, topo.node, uuid.uuid4().hex)
        everyone: list[Any] = [mine]
        if dist.is_available() and dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
        self._token = everyone[0][2]
        self._ranks = {r for r, n, _ in everyone if n == topo.node}

    def _stage(self, args: Any, step: int, urgent: bool) -> None:
        """Hard-link this node's files of the checkpoint into staging (node 0: with the run
        state and the metrics) and queue them for the uploader."""
        node = self.topo.node
        src = Path(args.output_dir) / f"checkpoint-{step}"
        dest = self.staging / f"node-{node}" / step_name(step)
        shutil.rmtree(dest, ignore_errors=True)
        link_copy(src, dest, commit.part_files(src, self._ranks, common=node == 0))
        more = None
        if node == 0:
            saved = {**self.run_state, "step": step}
            if self.eval_pending_at == step:
                saved["eval_pending"] = True
            (dest / STATE_FILE).write_text(json.dumps(saved))
            if self.metrics_path.is_file():
                shutil.copyfile(self.metrics_path, dest / METRICS_FILE)
            more = self.extras(step) if self.extras is not None else None
        self.uploader.submit(step, dest, self._token or "", more, urgent)


# failure exit codes by how much they matter when ranks disagree (access > bug > transient)
_SEVERITY = {0: 0, EXIT_RETRY: 1, EXIT_BUG: 2, EXIT_ACCESS: 3}


def _failure(uploader: Any, worst: int) -> SftJobError:
    mine = getattr(uploader, "fatal", None)
    if mine is not None and _SEVERITY.get(mine.exit_code, 2) == worst:
        return mine
    err = SftJobError("checkpoint uploads keep failing on another node: see its log")
    err.exit_code = {v: k for k, v in _SEVERITY.items()}[worst]
    return err


def raise_if_failing(uploader: Any) -> None:
    """Every rank: end the job on all of them when a node's uploads keep failing."""
    from sft_job.checkpoint.preempt import agree_max

    code = uploader.failure_code() if uploader is not None else 0
    worst = agree_max([_SEVERITY.get(code, 2)])[0]
    if worst:
        raise _failure(uploader, worst)


def train(trainer: Any, resume: Resume | None, can_skip_final: bool) -> Any:
    """trainer.train() from `resume`; a final checkpoint is only loaded (`can_skip_final`)."""
    if resume and can_skip_final and is_final(resume.dir):
        return load_final(trainer, resume.dir)  # trained already: only finish is left
    return trainer.train(resume_from_checkpoint=str(resume.dir) if resume else None)


def save_unsaved(trainer: Any, cb: Any) -> bool:
    """Checkpoint the current step unless it is saved (or was resumed from) already; every rank
    calls it (the save is collective under ZeRO-3). False when there is no step to save."""
    step = trainer.state.global_step
    if step in (cb.last_saved, cb.resumed_step):
        return True
    if not step:
        return False
    trainer._save_checkpoint(trainer.model_wrapped, trial=None)  # what the Trainer's saves run
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    return True


def stop_after_checkpoint(spec: JobSpec, trainer: Any, sync: Any, uploader: Any,
                           stop: Any) -> None:
    """After a stop request: checkpoint this step if no save did, wait for this node's part
    (node 0: the commit) within the stop budget, then raise Preempted (exit 75)."""
    step = trainer.state.global_step
    name = step_name(step)
    head = (f"preempted by {stop.signame} at step {step}" if stop.signame else
            f"preempted at step {step} (a stop requested on another rank)")
    if not save_unsaved(trainer, sync):
        raise Preempted(f"{head}: no step trained yet, nothing to checkpoint; rerun to start again")
    if step == sync.resumed_step:
        raise Preempted(f"{head}: checkpoint {name} was committed already; rerun to resume")
    if uploader is None:
        raise Preempted(f"{head}: stopped; each node's first rank uploads its part of {name}")
    left = max(1.0, spec.output.stop_budget_seconds - stop.seconds_since())
    in_time = uploader.wait(timeout=left)
    if uploader.fatal is not None:
        raise uploader.fatal
    status = uploader.status.get(step)
    if status == "committed":
        raise Preempted(f"{head}: checkpoint {name} committed; rerun to resume")
    if status == "uploaded":
        raise Preempted(f"{head}: this node's part of {name} uploaded; node 0 commits it")
    why = "it failed (see above)" if status else (
        f"the upload did not finish within output.stop_budget_seconds="
        f"{spec.output.stop_budget_seconds}" if not in_time else "it was not uploaded")
    raise Preempted(f"{head}: checkpoint {name} is not committed ({why}); a rerun resumes "
                    "from the previous one")


def find_resume(spec: JobSpec, work: Path, state: dict[str, Any], allow_changed: bool,
                topo: Topology | None = None) -> Resume | None:
    """The newest committed checkpoint in output.uri whose objects are the ones committed,
    downloaded (this rank's files: the common ones and its own) and checked against this run's
    spec and data hashes; None for a fresh start."""
    topo = topo or Topology()
    uri = storage.join(spec.output.uri, "checkpoints")
    for latest in storage.committed_dirs(uri):
        manifest = commit.read_manifest(latest)
        changed = commit.changed_objects(latest, manifest)
        if changed:
            log.warning("%s: %s differ from its COMMITTED manifest; not resuming from it",
                        latest, ", ".join(changed[:3]))
            continue
        if manifest.get("world_size") not in (None, topo.world):
            log.warning("%s was written by %s ranks, this run has %d: downloading all of it",
                        latest, manifest["world_size"], topo.world)
        local = work / "resume" / latest.rstrip("/").rsplit("/", 1)[-1]
        if local.exists():
            shutil.rmtree(local)
        files = commit.resume_files(manifest, topo.rank, topo.world)
        commit.download(latest, files, local)
        return _checked(latest, local, state, allow_changed, files)
    return None


def _checked(latest: str, local: Path, state: dict[str, Any], allow_changed: bool,
             files: list[str] | None) -> Resume:
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
    log.info("resuming from committed checkpoint %s (step %d)%s", latest, step,
             f", {len(files)} files for this rank" if files is not None else "")
    return Resume(local, step, bool(saved.get("eval_pending")))


def _changed_fields(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    if saved.get("data_hash") and saved["data_hash"] != now["data_hash"]:
        out.append("data files")
    old, new = saved.get("spec", {}), now["spec"]
    out += [f"spec {k}" for k in changed_fields(old, new)]
    return out


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


def run_state(spec: JobSpec, data_files_hash: str) -> dict[str, Any]:
    """What a checkpoint records about the run that made it (`data_hash` of its data files):
    a resume compares the training fields (spec.training_fields); output.merge may change."""
    return {"spec_hash": spec.run_hash(), "data_hash": data_files_hash,
            "spec": spec.training_fields()}
