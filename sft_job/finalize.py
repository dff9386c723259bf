"""Step 3 of the job (`pipeline.run_job`): evaluate the trained model, save (and merge) it,
write the reports, upload, push to the Hub, then `_SUCCESS`, last: its presence means the run
is complete."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.checkpoint import lease
from sft_job.context import JobContext
from sft_job.errors import ModelError
from sft_job.fit import Fitted
from sft_job.prepare import Prepared, Samples
from sft_job.spec import JobSpec
from sft_job.topology import here
from sft_job.train.guard import require_finite

log = logging.getLogger("sft_job")

SUCCESS = "_SUCCESS"


@dataclass
class Evaluated:
    """The trained model's eval loss (None without eval rows) and the samples page."""

    eval_loss: float | None
    eval_tokens: int | None
    samples_md: str


@dataclass
class Saved:
    """What is published: the model (full, or merged), the adapter, the merge check."""

    model: Path | None
    adapter: Path | None
    merge_diff: float | None


def finalize(ctx: JobContext, job: Prepared, samples: Samples, fitted: Fitted
             ) -> dict[str, Any]:
    """Evaluate, sample, save/merge (every rank), then on rank 0 the summary, reports, uploads,
    the Hub push and _SUCCESS; returns the summary (other ranks: their rank)."""
    evaluated = _evaluate(ctx, job, samples, fitted)
    ctx.timings.mark("evaluate")
    saved_dir = _save_trained(ctx, fitted)
    if not here().is_main:
        _end_distributed()
        return {"rank": ctx.rank}
    saved = _save_model(ctx.spec, job, saved_dir)
    ctx.timings.mark("save_merge")
    summary = _publish(ctx, job, fitted, evaluated, saved)
    _end_distributed()
    return summary


def _evaluate(ctx: JobContext, job: Prepared, samples: Samples, fitted: Fitted) -> Evaluated:
    """Every rank: evaluation and generation are collective under ZeRO-3."""
    from sft_job.finish.evaluate import generate, samples_markdown
    from sft_job.train.evaluate import eval_loss as evaluate_loss

    trainer, rows = fitted.built.trainer, job.bundle.eval
    eval_loss = eval_tokens = None
    if rows:
        eval_loss, eval_tokens = evaluate_loss(trainer, rows, own_head=fitted.built.own_head)
        require_finite({"eval_loss": eval_loss}, "evaluation of the trained model")
        log.info("eval loss %.4f per trained token (%d tokens)", eval_loss, eval_tokens)
        # through the trainer's callbacks, like the periodic ones: metrics.jsonl, progress,
        # trackers (train.report_to) get the final eval loss at the last step
        trainer.log({"eval_loss": eval_loss, "eval_tokens": eval_tokens})
    after = generate(trainer.model, job.tokenizer, samples.prompts,
                     ctx.spec.eval.max_new_tokens)
    return Evaluated(eval_loss, eval_tokens, samples_markdown(samples.pairs, samples.before, after))


def _save_trained(ctx: JobContext, fitted: Fitted) -> Path:
    """Every rank (ZeRO-3 gathers the shards here): the model, or the adapter, in the stage."""
    trainer = fitted.built.trainer
    saved = ctx.stage / ("model" if ctx.spec.method.kind == "full" else "adapter")
    trainer.model.config.use_cache = True  # off for training only: the saved model generates
    if trainer.args.device.type == "xla":  # CPU tensors without FSDPv2's `_orig_module.`
        from sft_job.train.xla import save_model

        save_model(trainer, saved)
    else:
        trainer.save_model(str(saved))
    return saved


def _save_model(spec: JobSpec, job: Prepared, saved: Path) -> Saved:
    """Full: the saved model is the result. LoRA/QLoRA: merge the saved adapter into the base
    shard by shard, then check the merged logits against base+adapter loaded from disk."""
    from sft_job.finish.merge import max_logit_diff, merge_adapter

    job.tokenizer.save_pretrained(saved)
    (saved / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody should need to load
    if spec.method.kind == "full":
        return Saved(saved, None, None)
    if not spec.output.merge:
        return Saved(None, saved, None)
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    if is_deepspeed_zero3_enabled():  # training is over: load the check's models whole
        unset_hf_deepspeed_config()
    log.info("merging the adapter into the base model (shard by shard)")
    out = merge_adapter(job.model_dir, saved, saved.parent / "model", job.tokenizer)
    bundle = job.bundle
    sample = bundle.eval[0] if bundle.eval else bundle.train[0]
    diff = max_logit_diff(job.model_dir, saved, out, sample["input_ids"][:64])
    if diff is None:
        log.info("merge check skipped: the base model is too large to load twice on CPU")
        return Saved(out, saved, None)
    log.info("merge check: max |logit diff| merged vs base+adapter = %.2e", diff)
    if not diff <= 1e-3:  # NaN fails too
        raise ModelError(f"merge check failed: merged logits differ from base+adapter by "
                         f"{diff:.3g}; the adapter was not merged correctly")
    return Saved(out, saved, diff)


def _publish(ctx: JobContext, job: Prepared, fitted: Fitted, evaluated: Evaluated,
             saved: Saved) -> dict[str, Any]:
    """Rank 0: the summary (finite), the reports, the uploads, the Hub push, then _SUCCESS."""
    from sft_job.finish import report

    spec, out_uri, timings = ctx.spec, ctx.spec.output.uri, ctx.timings
    metrics = report.read_metrics(ctx.metrics_path)
    summary = _summary(ctx, job, fitted, evaluated, saved, metrics)
    require_finite(summary, "summary")  # a NaN is a failure, never a published result
    lease.check()
    metrics_dir = ctx.metrics_path.parent
    (metrics_dir / "samples.md").write_text(evaluated.samples_md)
    report.loss_plot(metrics, metrics_dir / "loss.png")
    if saved.model:
        (saved.model / "README.md").write_text(
            report.model_card(spec, summary, evaluated.samples_md))
    _upload(spec, saved)
    summary["hub_repo"] = _push_hub(spec, saved)
    timings.mark("upload")
    summary["timings_s"] = timings.phases
    summary["wall_s"] = round(time.perf_counter() - timings.start, 2)
    report.write_json(metrics_dir / "summary.json", summary)
    storage.put_dir(metrics_dir, storage.join(out_uri, "metrics"), commit=True)
    storage.write_text(storage.join(out_uri, SUCCESS), "")  # last: the run is complete
    print(report.end_screen(summary, out_uri), flush=True)
    return summary


def _summary(ctx: JobContext, job: Prepared, fitted: Fitted, evaluated: Evaluated,
             saved: Saved, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json: what was trained, the losses (per trained token), speed, efficiency."""
    from sft_job.data.tokenize import slot_efficiency
    from sft_job.finish.evaluate import perplexity
    from sft_job.train.trainer import precision

    spec, bundle, trainer = ctx.spec, job.bundle, fitted.built.trainer
    losses = [m["loss"] for m in metrics if "loss" in m]
    tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    lengths = bundle.stats.pop("train_lengths")
    ranks = bundle.stats.pop("ranks", [])
    bs, ml = spec.train.batch_size, spec.data.max_length
    training_loss = fitted.train_out.training_loss
    return {
        "name": spec.name,
        "spec_hash": spec.run_hash(),
        "method": spec.method.kind,
        "precision": precision(trainer),
        "lm_head": fitted.built.lm_head,
        "steps": trainer.state.global_step,
        "train_loss": losses[-1] if losses else None,
        # NaN only when nothing was trained here (resumed at the final step); the guard
        # stopped any run whose losses were not finite
        "train_loss_mean": round(float(training_loss), 6)
        if math.isfinite(training_loss) else None,
        # per trained token; before = the base model on the same rows, same code
        "eval_loss_before": next((m["eval_loss_before"] for m in metrics
                                  if "eval_loss_before" in m), None),
        "eval_loss": evaluated.eval_loss,
        "eval_tokens": evaluated.eval_tokens,
        "eval_perplexity": perplexity(evaluated.eval_loss),
        "tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
        # useful / token slots of the batches the model trained on (flattened rows: no padding)
        "packing_efficiency": _efficiency(ranks),
        "efficiency_by_mode": {m: round(slot_efficiency(lengths, bs, ml, m), 4)
                               for m in ("packed", "longest", "max")},
        "merge_max_logit_diff": saved.merge_diff,
        "ranks": ranks,
        "data": bundle.stats,
        "model_uri": storage.join(spec.output.uri, "model") if saved.model else None,
        "adapter_uri": storage.join(spec.output.uri, "adapter") if saved.adapter else None,
        "timings_s": ctx.timings.phases,
    }


def _efficiency(ranks: list[dict[str, Any]]) -> float | None:
    """Useful tokens / token slots over every rank's batches; None when none were trained here
    (a rerun that found the final checkpoint)."""
    slots = sum(r["slots"] for r in ranks)
    return round(sum(r["tokens"] for r in ranks) / slots, 4) if slots else None


def _upload(spec: JobSpec, saved: Saved) -> None:
    out_uri = spec.output.uri
    if saved.adapter:
        log.info("uploading adapter to %s/adapter", out_uri)
        storage.put_dir(saved.adapter, storage.join(out_uri, "adapter"), commit=True)
    if saved.model:
        log.info("uploading model to %s/model", out_uri)
        storage.put_dir(saved.model, storage.join(out_uri, "model"), commit=True)


def _push_hub(spec: JobSpec, saved: Saved) -> str | None:
    if not spec.output.push_to_hub:
        return None
    from sft_job.storage.hub import push_folder

    model_out = saved.model
    folder = saved.adapter if spec.output.hub_push == "adapter" else model_out
    if folder is None:
        return None
    if spec.output.hub_push == "adapter" and model_out and (model_out / "README.md").is_file():
        (folder / "README.md").write_text((model_out / "README.md").read_text())
    log.info("pushing %s to the Hub as %s", spec.output.hub_push, spec.output.push_to_hub)
    push_folder(folder, spec.output.push_to_hub, private=spec.output.hub_private,
                commit_message=f"sft-job: {spec.name}")
    return spec.output.push_to_hub


def _end_distributed() -> None:
    """Leave the process group cleanly (without it some backends abort at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
