"""The whole job, top to bottom: `run_job(spec)`.

    sft-job run jobs/smoke-cpu.yaml

Everything is written to a local staging folder first and uploaded to `output.uri` section by
section (each committed with a marker); `_SUCCESS` is written last, so its presence means the
run is complete and a rerun exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_job import storage
from sft_job.checkpoint import lease, preempt
from sft_job.checkpoint import sync as ckpt
from sft_job.checkpoint.uploader import Uploader
from sft_job.errors import ModelError, Preempted, SftJobError, TrainingDiverged
from sft_job.progress import Reporter
from sft_job.spec import JobSpec, changed_fields, dump_spec
from sft_job.specload import validate_doc
from sft_job.topology import here
from sft_job.train.guard import require_finite

if TYPE_CHECKING:  # the trainer module is imported after the cheap checks
    from sft_job.train.trainer import BuiltTrainer

log = logging.getLogger("sft_job")

SUCCESS = "_SUCCESS"


@dataclass
class Timings:
    """Seconds spent in each phase (logged in summary.json; bench/ reads them)."""

    start: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now


def setup_logging() -> None:
    """Plain timestamped lines on stderr (rank-tagged when there are several ranks, and only
    rank 0 at INFO); quiet the libraries' own chatter."""
    topo = here()
    tag = f"[rank {topo.rank}] " if topo.distributed else ""
    level = logging.INFO if topo.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {tag}%(message)s",
                        datefmt="%H:%M:%S", force=True)
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "urllib3", "botocore",
                 "httpx", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes warns on every import that an optional Hub kernel is absent (never needed)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # progress bars are noise in a log file (set before imports)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows it
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not Path("/dev/nvidiactl").exists():  # DeepSpeed would log its guess on import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")


def workdir_for(spec: JobSpec) -> Path:
    """Local scratch for this job on this output, locked for this rank (see lease.workdir)."""
    return lease.workdir(spec, _rank())


def run_job(spec: JobSpec, allow_changed: bool = False) -> dict[str, Any]:
    """Run one job end to end and return its summary. SIGTERM/SIGINT are caught for the whole
    run: before training they end it with 75 at the next phase boundary (nothing to save yet),
    during training they become a committed checkpoint, during finish they are noted and the
    finish goes on (a second signal exits at once)."""
    setup_logging()
    # the lease on the output ends with the run; the reporter records how the run ended
    # (progress.json) and closes the trackers
    with preempt.watch() as stop, lease.scope(), Reporter(spec) as reporter:
        return _run(spec, allow_changed, stop, reporter)


def _already_done(spec: JobSpec, allow_changed: bool) -> bool:
    """_SUCCESS is in output.uri: done, if it is this job's result. A finished run of another
    spec there (its job.yaml differs in a field that changes the model) is refused (exit 2)
    rather than reported as done; --allow-changed accepts it."""
    import yaml

    from sft_job.errors import SpecError

    out_uri = spec.output.uri
    if not storage.exists(storage.join(out_uri, SUCCESS)):
        return False
    try:
        theirs = validate_doc(yaml.safe_load(storage.read_text(storage.join(out_uri, "job.yaml"))),
                              "job.yaml")
    except (SftJobError, yaml.YAMLError, ValueError, TypeError):
        theirs = None  # no readable job.yaml (an older version's run): trust _SUCCESS
    if theirs is not None and theirs.run_hash() != spec.run_hash() and not allow_changed:
        changed = changed_fields(theirs.result_fields(), spec.result_fields())
        raise SpecError(f"output.uri: {out_uri} holds the finished run of another spec "
                        f"({', '.join(changed) or 'spec'} differ); use a new output.uri "
                        "(--allow-changed accepts it as done)")
    log.info("%s/%s exists: this job is already done, nothing to do", out_uri, SUCCESS)
    return True


def _check_stop(stop: Any, phase: str) -> None:
    if stop.requested:
        raise Preempted(f"preempted by {stop.signame} during {phase}, before training started: "
                        "nothing to checkpoint; rerun to start again")


def _run(spec: JobSpec, allow_changed: bool, stop: Any, reporter: Reporter) -> dict[str, Any]:
    timings = Timings()
    storage.configure(spec.output.s3_endpoint_url)
    out_uri = spec.output.uri
    if _already_done(spec, allow_changed):
        return {"already_done": True}
    from sft_job.preflight import fast_checks

    work = workdir_for(spec)
    stage = work / "out"
    mine = work / f"rank{_rank()}"  # per-rank downloads (data, resume), never shared
    shutil.rmtree(mine, ignore_errors=True)
    mine.mkdir(parents=True)
    if _is_main():
        # spec, storage access (a write probe of output.uri), model files and every data row,
        # without torch: a bad job fails in seconds, before any model is downloaded
        fast_checks(spec, workdir=mine, data_cache=spec.data_cache_uri())
        lease.acquire(spec)  # the output is this run's from here on (exit 2 if another's)
        if _already_done(spec, allow_changed):  # finished while we waited for the lease
            return {"already_done": True}
        for stale in (stage, work / "trainer", work / "ckpt-staging"):
            shutil.rmtree(stale, ignore_errors=True)  # a reused machine's leftovers are not ours
        stage.mkdir(parents=True, exist_ok=True)
    _check_stop(stop, "the checks")

    # Imports of torch/transformers/trl happen from here on, after the cheap checks.
    from sft_job.data import build as build_data
    from sft_job.finish.evaluate import generate, sample_prompts
    from sft_job.models.load import check_targets, check_vocab, load_model, load_tokenizer
    from sft_job.models.source import resolve_model_dir
    from sft_job.train.backends import model_attn, resolve
    from sft_job.train.trainer import (
        build_trainer,
        counting_collator,
        evaluation_callback,
        metrics_callback,
    )

    timings.mark("startup")
    backend = resolve(spec)
    model_dir = resolve_model_dir(spec.model.base, spec.model.revision)
    tokenizer = load_tokenizer(spec.model, model_dir, need_chat_template=False)
    timings.mark("model_fetch")
    _check_stop(stop, "the model download")
    log.info("job %s: backend %s (%s weights, attention %s), base %s, method %s", spec.name,
             backend.name, backend.dtype, backend.attn, spec.model.base, spec.method.kind)
    # the model before the data: a model that cannot be trained (architecture, weights, vocab,
    # LoRA targets) stops the job before the prepared data is written under output.uri
    model = load_model(spec.model, spec.method, model_dir, backend.torch_dtype(),
                       model_attn(model_dir, backend.attn, spec.data.max_length))
    check_vocab(spec.model, tokenizer, model)
    if spec.method.kind != "full":
        check_targets(spec.method, model)  # again when the trainer builds the LoRA config
    timings.mark("model_load")
    _check_stop(stop, "model loading")
    bundle = build_data(spec.data, tokenizer, mine, cache_uri=spec.data_cache_uri(),
                        local_root=work / "prepared",
                        check_stop=lambda: _check_stop(stop, "data preparation"))
    timings.mark("data")
    _check_stop(stop, "data preparation")
    pairs = sample_prompts(spec.eval.prompts, bundle.eval_examples or bundle.train_examples,
                           spec.eval.num_samples, bundle.format, spec.data, tokenizer)
    if pairs:
        log.info("generating %d sample(s) from the base model (greedy, up to %d tokens each)",
                 len(pairs), spec.eval.max_new_tokens)
    before = generate(model, tokenizer, [p for _, p in pairs], spec.eval.max_new_tokens)
    timings.mark("samples_before")

    metrics_path = stage / "metrics" / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    run_state = ckpt.run_state(spec, bundle.data_hash)
    topo = here()
    resume = ckpt.find_resume(spec, mine, run_state, allow_changed, topo)
    if resume:
        ckpt.restore_metrics(resume.dir, metrics_path, resume.step)
    timings.mark("resume_lookup")
    _check_stop(stop, "model loading")
    # one uploader process per node (its local rank 0), for the files that node's ranks write
    uploader = Uploader(storage.join(out_uri, "checkpoints"), spec.output.keep_checkpoints,
                        topo.node, topo.nodes, topo.world, spec.output.s3_endpoint_url) \
        if topo.local_rank == 0 else None
    collator = counting_collator(spec, backend, model, tokenizer)
    sync = ckpt.callback(spec, uploader, stop, run_state, metrics_path, work / "ckpt-staging",
                         topo, resume.step if resume else None,
                         spec.train.eval_steps if bundle.eval else None)
    callbacks = [metrics_callback(metrics_path, collator)]
    if _is_main():
        callbacks.append(reporter.callback(collator))
    built = build_trainer(spec, backend, model, tokenizer, bundle, work / "trainer", callbacks,
                          collator)
    trainer = built.trainer
    trainer.add_callback(evaluation_callback(built, bundle.eval, spec.train.eval_steps, stop,
                                             resume.step if resume and resume.eval_pending else None))
    # after the evaluation: a stop requested while it ran is honoured at the same step's end
    trainer.add_callback(sync)
    if _is_main():  # the last check passed (trainer settings, LoRA targets): now output.uri
        lease.check()  # is written to, never before
        reporter.start(stage, resume.step if resume else None)  # trackers, progress.json
        (stage / "job.yaml").write_text(dump_spec(spec))
        storage.put_file(stage / "job.yaml", storage.join(out_uri, "job.yaml"))
    reporter.attach(trainer)  # the trackers' writers, opened by start (rank 0)
    _log_plan(spec, built, bundle, backend)
    if not resume and bundle.eval:  # the base model's loss, for before -> after
        _eval_before(built, bundle.eval, metrics_path, stop)
    try:
        train_out = ckpt.train(trainer, resume, can_skip_final=not spec.deepspeed.enabled)
    except TrainingDiverged:
        if uploader is not None:  # the checkpoints before the divergence are good: commit
            with contextlib.suppress(SftJobError):
                uploader.wait(timeout=spec.output.stop_budget_seconds)
        raise
    if preempt.agree(bool(stop.requested)):  # every rank: a signal may have reached only some
        ckpt.stop_after_checkpoint(spec, trainer, sync, uploader, stop)  # raises Preempted
    if uploader is not None:
        uploader.wait()  # periodic checkpoints still in flight finish before the final upload
    ckpt.raise_if_failing(uploader)
    if uploader is not None:
        uploader.close()
    reporter.finishing()
    timings.mark("train")
    bundle.stats["ranks"] = _gather_rank_facts(collator, bundle)

    return _finish(spec, built, tokenizer, model_dir, bundle, pairs, before, train_out,
                   stage, timings, generate)


def _finish(spec: JobSpec, built: BuiltTrainer, tokenizer: Any, model_dir: Path, bundle: Any,
            pairs: list[tuple[str, str]], before: list[str], train_out: Any, stage: Path,
            timings: Timings, generate: Any) -> dict[str, Any]:
    """Evaluate, sample, save/merge, write reports, upload, then _SUCCESS."""
    from sft_job.finish import report
    from sft_job.finish.evaluate import perplexity, samples_markdown
    from sft_job.train.evaluate import eval_loss as evaluate_loss
    from sft_job.train.trainer import precision

    trainer = built.trainer
    out_uri = spec.output.uri
    eval_loss = eval_tokens = None
    if bundle.eval:  # every rank: evaluation and generation are collective under ZeRO-3
        eval_loss, eval_tokens = evaluate_loss(trainer, bundle.eval, own_head=built.own_head)
        require_finite({"eval_loss": eval_loss}, "evaluation of the trained model")
        log.info("eval loss %.4f per trained token (%d tokens)", eval_loss, eval_tokens)
        # through the trainer's callbacks, like the periodic ones: metrics.jsonl, progress,
        # trackers (train.report_to) get the final eval loss at the last step
        trainer.log({"eval_loss": eval_loss, "eval_tokens": eval_tokens})
    after = generate(trainer.model, tokenizer, [p for _, p in pairs], spec.eval.max_new_tokens)
    samples_md = samples_markdown(pairs, before, after)
    timings.mark("evaluate")

    saved = stage / ("model" if spec.method.kind == "full" else "adapter")
    trainer.model.config.use_cache = True  # off for training only: the saved model generates
    if trainer.args.device.type == "xla":  # CPU tensors without FSDPv2's `_orig_module.`
        from sft_job.train.xla import save_model

        save_model(trainer, saved)
    else:
        trainer.save_model(str(saved))  # every rank: ZeRO-3 gathers the shards here
    if not _is_main():
        _end_distributed()
        return {"rank": _rank()}
    model_out, adapter_out, merge_diff = _save_model(spec, tokenizer, model_dir, bundle, saved)
    timings.mark("save_merge")

    metrics = report.read_metrics(stage / "metrics" / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    from sft_job.data.tokenize import slot_efficiency

    lengths = bundle.stats.pop("train_lengths")
    ranks = bundle.stats.pop("ranks", [])
    bs, ml = spec.train.batch_size, spec.data.max_length
    summary = {
        "name": spec.name,
        "spec_hash": spec.run_hash(),
        "method": spec.method.kind,
        "precision": precision(trainer),
        "lm_head": built.lm_head,
        "steps": trainer.state.global_step,
        "train_loss": losses[-1] if losses else None,
        # NaN only when nothing was trained here (resumed at the final step); the guard
        # stopped any run whose losses were not finite
        "train_loss_mean": round(float(train_out.training_loss), 6)
        if math.isfinite(train_out.training_loss) else None,
        # per trained token; before = the base model on the same rows, same code
        "eval_loss_before": next((m["eval_loss_before"] for m in metrics
                                  if "eval_loss_before" in m), None),
        "eval_loss": eval_loss,
        "eval_tokens": eval_tokens,
        "eval_perplexity": perplexity(eval_loss),
        "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
        # useful / token slots of the batches the model trained on (flattened rows: no padding)
        "packing_efficiency": _efficiency(ranks),
        "efficiency_by_mode": {m: round(slot_efficiency(lengths, bs, ml, m), 4)
                               for m in ("packed", "longest", "max")},
        "merge_max_logit_diff": merge_diff,
        "ranks": ranks,
        "data": bundle.stats,
        "model_uri": storage.join(out_uri, "model") if model_out else None,
        "adapter_uri": storage.join(out_uri, "adapter") if adapter_out else None,
        "timings_s": timings.phases,
    }
    require_finite(summary, "summary")  # a NaN is a failure, never a published result
    lease.check()
    metrics_dir = stage / "metrics"
    (metrics_dir / "samples.md").write_text(samples_md)
    report.loss_plot(metrics, metrics_dir / "loss.png")
    if model_out:
        (model_out / "README.md").write_text(report.model_card(spec, summary, samples_md))
    _upload(spec, stage, model_out, adapter_out)
    summary["hub_repo"] = _push_hub(spec, model_out, adapter_out)
    timings.mark("upload")
    summary["timings_s"] = timings.phases
    summary["wall_s"] = round(time.perf_counter() - timings.start, 2)
    report.write_json(metrics_dir / "summary.json", summary)
    storage.put_dir(metrics_dir, storage.join(out_uri, "metrics"), commit=True)
    storage.write_text(storage.join(out_uri, SUCCESS), "")  # last: the run is complete
    print(report.end_screen(summary, out_uri), flush=True)
    _end_distributed()
    return summary


def _eval_before(built: BuiltTrainer, rows: Any, metrics_path: Path, stop: Any) -> None:
    """Evaluate the untrained model (every rank) and record it in metrics.jsonl (rank 0), which
    checkpoints carry, so a resumed run still reports it."""
    import json

    from sft_job.train.evaluate import eval_loss

    loss, tokens = eval_loss(built.trainer, rows, own_head=built.own_head,
                             should_stop=lambda: bool(stop.requested))
    _check_stop(stop, "the evaluation of the base model")
    if loss is None:
        return
    require_finite({"eval_loss_before": loss}, "evaluation of the base model")
    log.info("eval loss before training %.4f per trained token (%d tokens)", loss, tokens)
    if _is_main():
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": 0, "eval_loss_before": round(loss, 6),
                                "eval_tokens": tokens}) + "\n")


def _efficiency(ranks: list[dict[str, Any]]) -> float | None:
    """Useful tokens / token slots over every rank's batches; None when none were trained here
    (a rerun that found the final checkpoint)."""
    slots = sum(r["slots"] for r in ranks)
    return round(sum(r["tokens"] for r in ranks) / slots, 4) if slots else None


def _gather_rank_facts(collator: Any, bundle: Any) -> list[dict[str, Any]]:
    """What each rank trained on (tokens, batches, first batch hash), whether it prepared the
    data or waited for it, and its peak memory."""
    from sft_job.train.trainer import peak_memory

    prep = bundle.stats.get("prepared", {})
    mine = {"rank": _rank(), "tokens": collator.tokens, "slots": collator.slots,
            "batches": collator.batches, "first_batch_sha": collator.first_batch_sha,
            "prepared_data": prep.get("here"), "waited_for_data_s": prep.get("waited_s"),
            **peak_memory()}
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def _rank() -> int:
    return here().rank


def _is_main() -> bool:
    return here().is_main


def _end_distributed() -> None:
    """Leave the process group cleanly (without it some backends abort at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _save_model(spec: JobSpec, tokenizer: Any, model_dir: Path, bundle: Any, saved: Path
                ) -> tuple[Path | None, Path | None, float | None]:
    """Full: the saved model is the result. LoRA/QLoRA: merge the saved adapter into the base
    shard by shard, then check the merged logits against base+adapter loaded from disk."""
    from sft_job.finish.merge import max_logit_diff, merge_adapter

    tokenizer.save_pretrained(saved)
    (saved / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody should need to load
    if spec.method.kind == "full":
        return saved, None, None
    if not spec.output.merge:
        return None, saved, None
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    if is_deepspeed_zero3_enabled():  # training is over: load the check's models whole
        unset_hf_deepspeed_config()
    log.info("merging the adapter into the base model (shard by shard)")
    out = merge_adapter(model_dir, saved, saved.parent / "model", tokenizer)
    sample = bundle.eval[0] if bundle.eval else bundle.train[0]
    diff = max_logit_diff(model_dir, saved, out, sample["input_ids"][:64])
    if diff is None:
        log.info("merge check skipped: the base model is too large to load twice on CPU")
        return out, saved, None
    log.info("merge check: max |logit diff| merged vs base+adapter = %.2e", diff)
    if not diff <= 1e-3:  # NaN fails too
        raise ModelError(f"merge check failed: merged logits differ from base+adapter by "
                         f"{diff:.3g}; the adapter was not merged correctly")
    return out, saved, diff


def _upload(spec: JobSpec, stage: Path, model_out: Path | None, adapter_out: Path | None) -> None:
    out_uri = spec.output.uri
    if adapter_out:
        log.info("uploading adapter to %s/adapter", out_uri)
        storage.put_dir(adapter_out, storage.join(out_uri, "adapter"), commit=True)
    if model_out:
        log.info("uploading model to %s/model", out_uri)
        storage.put_dir(model_out, storage.join(out_uri, "model"), commit=True)


def _push_hub(spec: JobSpec, model_out: Path | None, adapter_out: Path | None) -> str | None:
    if not spec.output.push_to_hub:
        return None
    from sft_job.storage.hub import push_folder

    folder = adapter_out if spec.output.hub_push == "adapter" else model_out
    if folder is None:
        return None
    if spec.output.hub_push == "adapter" and model_out and (model_out / "README.md").is_file():
        (folder / "README.md").write_text((model_out / "README.md").read_text())
    log.info("pushing %s to the Hub as %s", spec.output.hub_push, spec.output.push_to_hub)
    push_folder(folder, spec.output.push_to_hub, private=spec.output.hub_private,
                commit_message=f"sft-job: {spec.name}")
    return spec.output.push_to_hub


def _log_plan(spec: JobSpec, built: BuiltTrainer, bundle: Any, backend: Any) -> None:
    from sft_job.train.trainer import precision

    trainer = built.trainer
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
