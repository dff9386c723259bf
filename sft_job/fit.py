"""Step 2 of the job (`pipeline.run_job`): the resume point, the uploader of checkpoints, the
trainer and its callbacks, then training with its stop and divergence handling. output.uri is
written to (lease check, progress.json, job.yaml) only once the trainer is built, the last check
that can refuse the job."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sft_job import storage
from sft_job.checkpoint import lease, preempt
from sft_job.checkpoint import sync as ckpt
from sft_job.checkpoint.uploader import Uploader
from sft_job.context import JobContext
from sft_job.errors import SftJobError, TrainingDiverged
from sft_job.prepare import Prepared, trainer_for
from sft_job.progress import Reporter
from sft_job.spec import dump_spec
from sft_job.topology import here
from sft_job.train.guard import require_finite

if TYPE_CHECKING:  # the trainer module is imported after the cheap checks
    from sft_job.checkpoint.sync import Resume
    from sft_job.train.trainer import BuiltTrainer

log = logging.getLogger("sft_job")


@dataclass
class Fitted:
    """The trained trainer and what training returned."""

    built: BuiltTrainer
    train_out: Any  # transformers' TrainOutput: training_loss over the steps run here


@dataclass
class _Setup:
    """The trainer ready to train, with what training and the stop handling need."""

    built: BuiltTrainer
    sync: Any  # the checkpoint callback (checkpoint/sync.py)
    uploader: Uploader | None  # this node's uploader (its local rank 0), else None
    resume: Resume | None


def fit(ctx: JobContext, job: Prepared, reporter: Reporter) -> Fitted:
    """Resume point, trainer, output opened, base eval loss, training; a stop request during
    training becomes a committed checkpoint (Preempted)."""
    resume, run_state = _find_resume(ctx, job)
    setup = _build(ctx, job, reporter, resume, run_state)
    trainer = setup.built.trainer
    if here().is_main:  # the last check passed (trainer settings, LoRA targets): now output.uri
        _open_output(ctx, reporter, resume)  # is written to, never before
    reporter.attach(trainer)  # the trackers' writers, opened by start (rank 0)
    _log_plan(ctx, setup.built, job)
    if not resume and job.bundle.eval:  # the base model's loss, for before -> after
        _eval_before(ctx, setup.built, job.bundle.eval)
    train_out = _train(ctx, setup)
    reporter.finishing()
    ctx.timings.mark("train")
    job.bundle.stats["ranks"] = _gather_rank_facts(setup.built.collator, job.bundle, ctx.rank)
    return Fitted(setup.built, train_out)


def _find_resume(ctx: JobContext, job: Prepared) -> tuple[Resume | None, dict[str, Any]]:
    """The newest committed checkpoint of this run (its metrics restored), and the run state
    checkpoints record."""
    ctx.metrics_path.unlink(missing_ok=True)
    run_state = ckpt.run_state(ctx.spec, job.bundle.data_hash)
    resume = ckpt.find_resume(ctx.spec, ctx.mine, run_state, ctx.allow_changed, here())
    if resume:
        ckpt.restore_metrics(resume.dir, ctx.metrics_path, resume.step)
    ctx.timings.mark("resume_lookup")
    ctx.check_stop("model loading")
    return resume, run_state


def _build(ctx: JobContext, job: Prepared, reporter: Reporter, resume: Resume | None,
           run_state: dict[str, Any]) -> _Setup:
    """The uploader, the collator, the callbacks (metrics, progress, evaluation, checkpoints)
    and the trainer."""
    from sft_job.train.trainer import counting_collator, evaluation_callback, metrics_callback

    spec, bundle, topo = ctx.spec, job.bundle, here()
    # one uploader process per node (its local rank 0), for the files that node's ranks write
    uploader = Uploader(storage.join(spec.output.uri, "checkpoints"),
                        spec.output.keep_checkpoints, topo.node, topo.nodes,
                        topo.world) if topo.local_rank == 0 else None
    collator = counting_collator(spec, job.backend, job.model, job.tokenizer)
    sync = ckpt.callback(spec, uploader, ctx.stop, run_state, ctx.metrics_path,
                         ctx.work / "ckpt-staging", topo, resume.step if resume else None,
                         spec.train.eval_steps if bundle.eval else None)
    callbacks = [metrics_callback(ctx.metrics_path, collator)]
    if topo.is_main:
        callbacks.append(reporter.callback(collator))
    built = trainer_for(job, ctx.work / "trainer", callbacks, collator)
    built.trainer.add_callback(evaluation_callback(
        built, bundle.eval, spec.train.eval_steps, ctx.stop,
        resume.step if resume and resume.eval_pending else None))
    # after the evaluation: a stop requested while it ran is honoured at the same step's end
    built.trainer.add_callback(sync)
    return _Setup(built, sync, uploader, resume)


def _open_output(ctx: JobContext, reporter: Reporter, resume: Resume | None) -> None:
    """Rank 0: the lease still ours, then the trackers and progress.json, then job.yaml."""
    lease.check()
    reporter.start(ctx.stage, resume.step if resume else None)  # trackers, progress.json
    (ctx.stage / "job.yaml").write_text(dump_spec(ctx.spec))
    storage.put_file(ctx.stage / "job.yaml", storage.join(ctx.spec.output.uri, "job.yaml"))


def _train(ctx: JobContext, setup: _Setup) -> Any:
    """Train (from the resume point); on divergence commit the good checkpoints first; on a
    stop request (any rank) save, commit and raise Preempted; then the uploads in flight."""
    spec, uploader, trainer = ctx.spec, setup.uploader, setup.built.trainer
    try:
        train_out = ckpt.train(trainer, setup.resume, can_skip_final=not spec.deepspeed.enabled)
    except TrainingDiverged:
        if uploader is not None:  # the checkpoints before the divergence are good: commit
            with contextlib.suppress(SftJobError):
                uploader.wait(timeout=spec.output.stop_budget_seconds)
        raise
    if preempt.agree(bool(ctx.stop.requested)):  # every rank: a signal may have reached only some
        ckpt.stop_after_checkpoint(spec, trainer, setup.sync, uploader, ctx.stop)  # Preempted
    if uploader is not None:
        uploader.wait()  # periodic checkpoints still in flight finish before the final upload
    ckpt.raise_if_failing(uploader)
    if uploader is not None:
        uploader.close()
    return train_out


def _eval_before(ctx: JobContext, built: BuiltTrainer, rows: Any) -> None:
    """Evaluate the untrained model (every rank) and record it in metrics.jsonl (rank 0), which
    checkpoints carry, so a resumed run still reports it."""
    from sft_job.train.evaluate import eval_loss

    loss, tokens = eval_loss(built.trainer, rows, own_head=built.own_head,
                             should_stop=lambda: bool(ctx.stop.requested))
    ctx.check_stop("the evaluation of the base model")
    if loss is None:
        return
    require_finite({"eval_loss_before": loss}, "evaluation of the base model")
    log.info("eval loss before training %.4f per trained token (%d tokens)", loss, tokens)
    if here().is_main:
        ctx.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with ctx.metrics_path.open("a") as f:
            f.write(json.dumps({"step": 0, "eval_loss_before": round(loss, 6),
                                "eval_tokens": tokens}) + "\n")


def _gather_rank_facts(collator: Any, bundle: Any, rank: int) -> list[dict[str, Any]]:
    """What each rank trained on (tokens, batches, first batch hash), whether it prepared the
    data or waited for it, and its peak memory."""
    from sft_job.train.trainer import peak_memory

    prep = bundle.stats.get("prepared", {})
    mine = {"rank": rank, "tokens": collator.tokens, "slots": collator.slots,
            "batches": collator.batches, "first_batch_sha": collator.first_batch_sha,
            "prepared_data": prep.get("here"), "waited_for_data_s": prep.get("waited_s"),
            **peak_memory()}
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _log_plan(ctx: JobContext, built: BuiltTrainer, job: Prepared) -> None:
    from sft_job.train.trainer import precision

    spec, bundle, backend, trainer = ctx.spec, job.bundle, job.backend, built.trainer
    world = trainer.args.world_size
    eff = spec.train.batch_size * spec.train.grad_accum * world
    steps = spec.train.max_steps or math.ceil(math.ceil(len(bundle.train) / eff) * spec.train.epochs)
    prec = precision(trainer)
    why = backend.why if prec == backend.precision else "trainer: override"
    log.info("plan: %d train rows (%s), effective batch %d rows (%d x %d accum x %d ranks), "
             "%d steps, <= %d tokens/step, precision %s (%s), LM head %s, spec hash %s",
             len(bundle.train), "packed" if spec.data.packing else "unpacked", eff,
             spec.train.batch_size, spec.train.grad_accum, world, steps,
             eff * spec.data.max_length, prec, why, built.lm_head, spec.run_hash())
