"""TRL SFTTrainer from the spec: SFTConfig, datasets, collator and callbacks. No subclassing."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_job.data import DataBundle
from sft_job.data.tokenize import make_collator
from sft_job.errors import SpecError
from sft_job.spec import JobSpec
from sft_job.topology import here
from sft_job.train import guard, trackers
from sft_job.train.backends import Backend, flattens
from sft_job.train.passthrough import check_settings

log = logging.getLogger(__name__)


class CountingCollator:
    """Wraps a collator and counts the real (non-pad) tokens it hands out, for tokens/s, and
    the token slots they took (padding included), for the packing efficiency."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0
        self.slots = 0
        self.batches = 0
        self.first_batch_sha = ""  # which data this rank saw first (data-parallel evidence)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import hashlib

        self.tokens += sum(len(e["input_ids"]) for e in examples)
        if not self.batches:
            ids = ",".join(str(t) for e in examples for t in e["input_ids"])
            self.first_batch_sha = hashlib.sha256(ids.encode()).hexdigest()[:12]
        self.batches += 1
        batch = self.inner(examples)
        self.slots += int(batch["input_ids"].numel())
        return batch


def sft_config(spec: JobSpec, backend: Backend, output_dir: Path) -> Any:
    """SFTConfig built from the spec, the backend's settings, then `trainer:` passthrough."""
    from trl import SFTConfig

    args = {**_spec_args(spec, output_dir), **_backend_args(spec, backend)}
    args["logging_nan_inf_filter"] = False  # a NaN loss must show: the guard stops on it
    args.update(spec.trainer.fields_set())
    try:
        config = SFTConfig(**args)
    except (ValueError, TypeError) as e:
        raise SpecError(f"trainer: SFTConfig rejected the settings: {str(e).splitlines()[0]}") from None
    check_settings(config)
    return config


def _spec_args(spec: JobSpec, output_dir: Path) -> dict[str, Any]:
    """The SFTConfig arguments the spec's train/data/output/method fields decide."""
    t = spec.train
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": t.epochs,
        "max_steps": t.max_steps or -1,
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        # evaluation is the job's own token-weighted loop (train/evaluate.py), run by
        # evaluation_callback every train.eval_steps and once at the end
        "eval_strategy": "no",
        "save_strategy": "steps" if spec.output.save_every_steps else "no",
        "save_steps": spec.output.save_every_steps or 500,
        "save_total_limit": 2,  # local copies only; the bucket keeps output.keep_checkpoints
        "seed": t.seed,
        "data_seed": t.seed,
        **trackers.trainer_args(spec),  # report_to (train.report_to, else none), run_name
        "gradient_checkpointing": spec.method.gradient_checkpointing,
        "max_length": spec.data.max_length,
        "packing": False,  # packed upstream (sft_job.data), so the collator can stay per-backend
        "padding_free": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "dataloader_num_workers": 0,
        "disable_tqdm": not sys.stderr.isatty(),
        "use_liger_kernel": False,
    }


def _backend_args(spec: JobSpec, backend: Backend) -> dict[str, Any]:
    """The backend's settings, the DeepSpeed config (and its CPU switches), DDP over gloo for
    several CPU processes."""
    from sft_job.train import deepspeed

    args = dict(backend.sft_args)
    ds = deepspeed.config(spec)
    if ds is not None:
        args["deepspeed"] = ds
        args.update(deepspeed.prepare_cpu(backend.name))
    if backend.name == "cpu" and ds is None and here().distributed:
        args["ddp_backend"] = "gloo"  # use_cpu + gloo: real DDP, not N copies of the job
    return args


@dataclass
class BuiltTrainer:
    """An SFTTrainer and what its callers need beside it."""

    trainer: Any
    collator: CountingCollator  # tokens and slots handed out: tokens/s, packing efficiency
    lm_head: str  # what computes the loss: "trained-positions" (train/loss.py) or "trl"

    @property
    def own_head(self) -> bool:
        """Whether the loss (and the eval loss) is the job's head over trained positions."""
        return self.lm_head == "trained-positions"


def counting_collator(spec: JobSpec, backend: Backend, model: Any,
                      tokenizer: Any) -> CountingCollator:
    """The collator the trainer will use; made before it so callbacks can read its counts."""
    return CountingCollator(make_collator(
        tokenizer.pad_token_id, packing=spec.data.packing, flatten=flattens(model),
        pad_to_multiple_of=None if backend.name != "tpu" else spec.data.max_length))


def build_trainer(spec: JobSpec, backend: Backend, model: Any, tokenizer: Any,
                  bundle: DataBundle, output_dir: Path, callbacks: list[Any],
                  collator: CountingCollator | None = None) -> BuiltTrainer:
    """An SFTTrainer over pre-tokenized (and packed) rows; `collator` defaults to a new
    `counting_collator`."""
    from trl import SFTTrainer

    from sft_job.models.load import lora_config

    config = sft_config(spec, backend, output_dir)
    collator = collator or counting_collator(spec, backend, model, tokenizer)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=bundle.train,  # memory-mapped Arrow (sft_job.data)
        eval_dataset=bundle.eval if len(bundle.eval) else None,
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=lora_config(spec.method, model),
        callbacks=[*callbacks, guard.callback()],  # after the metrics logger: the record
    )                                              # of a NaN step is written (as null) first
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our metrics callback logs one readable line
    built = BuiltTrainer(trainer, collator, _lm_head(trainer, backend))
    if backend.name == "tpu":
        from sft_job.train import xla

        xla.prepare(trainer)  # FSDPv2: optimizer before train(), clean state-dict names
    return built


def _lm_head(trainer: Any, backend: Backend) -> str:
    """Put the LM head over trained positions only into `trainer` where the backend wants it
    and the settings allow; returns what computes the loss, for the plan line and summary."""
    if backend.lm_head != "trained":
        return "trl"
    from sft_job.train import loss

    why = loss.use_in(trainer)
    if why:
        log.info("LM head: TRL's (all positions) because of %s", why)
        return "trl"
    return "trained-positions"


def precision(trainer: Any) -> str:
    """The compute precision the trainer runs with (after `trainer:` overrides)."""
    args = trainer.args
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def metrics_callback(path: Path, collator: CountingCollator) -> Any:
    """A TrainerCallback appending every log record to metrics.jsonl with tokens/s."""
    from transformers import TrainerCallback

    class MetricsLogger(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.last_t = self.t0
            self.last_tokens = 0
            path.parent.mkdir(parents=True, exist_ok=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            tokens = collator.tokens
            rec = {"step": state.global_step, **{k: _num(v) for k, v in logs.items()}}
            if "loss" in logs and now > self.last_t:
                rec["tokens_per_s"] = round((tokens - self.last_tokens) / (now - self.last_t), 1)
                rec["tokens_seen"] = tokens
                self.last_t, self.last_tokens = now, tokens
            rec["elapsed_s"] = round(now - self.t0, 2)
            rec.update(peak_memory())
            with path.open("a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
            if "loss" in logs:
                log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %s tok/s",
                         state.global_step, state.max_steps, logs["loss"],
                         logs.get("learning_rate", 0.0), logs.get("grad_norm", 0.0) or 0.0,
                         rec.get("tokens_per_s", "-"))
            elif "eval_loss" in logs:
                log.info("step %d  eval_loss %.4f", state.global_step, logs["eval_loss"])

    return MetricsLogger()


def evaluation_callback(built: BuiltTrainer, rows: Any, every: int | None,
                        stop: Any, first_at: int | None = None) -> Any:
    """A TrainerCallback evaluating (token-weighted, train/evaluate.py) every `every` steps
    but the last (the finish evaluates that one) and logging `eval_loss` through the trainer,
    so metrics.jsonl and trackers get it. An evaluation is skipped or abandoned when a stop is
    requested: the checkpoint comes first. `first_at`: a resumed run's step whose evaluation
    the stop abandoned, run before training goes on."""
    from transformers import TrainerCallback

    from sft_job.train.evaluate import eval_loss

    class Evaluation(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if first_at is not None and state.global_step == first_at and rows:
                self._evaluate(state.global_step)
            return control

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            if not (every and rows) or step % every or step >= state.max_steps:
                return control
            should_log = control.should_log  # trainer.log() clears it: keep this step's loss
            self._evaluate(step)
            control.should_log = should_log
            return control

        def _evaluate(self, step: int) -> None:
            log.info("step %d: evaluating (%d rows)", step, len(rows))
            loss, tokens = eval_loss(built.trainer, rows, own_head=built.own_head,
                                     should_stop=lambda: bool(stop.requested))
            if loss is not None:
                built.trainer.log({"eval_loss": loss, "eval_tokens": tokens})

    return Evaluation()


def peak_memory() -> dict[str, float]:
    """Peak memory of this process in GB: CUDA allocated/reserved, XLA device, or CPU RSS."""
    import resource

    import torch

    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1024**3, 3)
    elif os.environ.get("PJRT_DEVICE"):
        try:
            import torch_xla.core.xla_model as xm

            info = xm.get_memory_info(xm.xla_device())
            peak = info.get("peak_bytes_used") or info.get("bytes_used", 0)
            out["peak_device_gb"] = round(peak / 1024**3, 3)
        except (ImportError, RuntimeError, AttributeError):
            pass
    return out


def _num(v: Any) -> Any:
    """A logged value as a JSON number; NaN/inf become null (metrics.jsonl stays JSON; the
    guard stops training on them)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return v
    return round(x, 6) if math.isfinite(x) else None
