"""TPU (torch-xla, PJRT): FSDPv2 over SPMD, the XLA AdamW, static shapes, plain-torch saves.

Used only with backend tpu; torch_xla is imported inside the functions. The same code runs on a
CPU with `PJRT_DEVICE=CPU` (`CPU_NUM_DEVICES=4` gives four virtual devices): `make test-xla`,
tests/xla/README.md.

- One process per host drives every chip through SPMD. With more than one device (or with
  gradient checkpointing) the model is wrapped in FSDPv2: parameters, gradients and optimizer
  state are sharded over the `fsdp` axis of a mesh of all devices and each batch is split along
  it, so a model that does not fit one chip still trains, and small ones train data parallel.
  `train.batch_size` stays rows per device: the trainer's batch is that times the devices.
- Static shapes: batches are padded to `data.max_length` (the collator) and partial batches
  dropped, so the step compiles once; the compilations are logged at the end of training.
- Transformers' FSDPv2 path never creates its optimizer: `prepare` puts the model on the device
  and creates it before `train()`; a callback checks it holds the wrapped model's parameters,
  gives the wrapper an output sharding that TRL's fused-loss output passes, and strips
  FSDPv2's `_orig_module.` from state-dict names (checkpoints resume and load with plain torch).
- `save_model` writes the final model or adapter as safetensors of CPU tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sft_job.errors import DataError
from sft_job.spec import JobSpec

log = logging.getLogger(__name__)

WRAPPER_PREFIX = "_orig_module."  # what FSDPv2 (SpmdFullyShardedDataParallel) adds to every key


def sft_args(spec: JobSpec) -> dict[str, Any]:
    """SFTConfig settings for the TPU backend; starts SPMD when FSDPv2 is used.

    Must run before anything touches the XLA device (SPMD is chosen once per process)."""
    import torch_xla.runtime as xr

    devices = xr.global_runtime_device_count()
    fsdp = devices > 1 or spec.method.gradient_checkpointing
    args: dict[str, Any] = {
        "bf16": True,
        "optim": "adamw_torch_xla",
        "dataloader_drop_last": True,  # static shapes: no smaller last batch to compile
        # torch.utils.checkpoint fails under XLA; FSDPv2 has its own (xla_fsdp_grad_ckpt).
        "gradient_checkpointing": False,
    }
    if not fsdp:
        log.info("XLA: 1 device (%s), no sharding", xr.device_type())
        return args
    xr.use_spmd()
    batch = spec.train.batch_size * devices  # the trainer's batch is split over all devices
    args.update({
        "fsdp": True,  # the sharding itself is SPMD's: xla_fsdp_v2
        "fsdp_config": {"xla": True, "xla_fsdp_v2": True,
                        "xla_fsdp_grad_ckpt": spec.method.gradient_checkpointing},
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": batch,
    })
    log.info("XLA: FSDPv2 over SPMD on %d %s devices (mesh fsdp=%d), %d rows per step and device",
             devices, xr.device_type(), devices, spec.train.batch_size)
    return args


def fsdp_enabled(trainer: Any) -> bool:
    return bool(getattr(trainer, "is_fsdp_xla_v2_enabled", False))


def prepare(trainer: Any) -> None:
    """Fix up a Trainer built for XLA before `train()`; no subclass, one callback."""
    _check_eval_batches(trainer)
    fsdp = fsdp_enabled(trainer)
    if fsdp:
        # FSDPv2 shards parameters in place (same Parameter objects) once they are on the
        # device, but moving a CPU module there replaces them: move first, so the optimizer
        # made now holds the very tensors FSDPv2 shards. The trainer keeps and prepares it.
        trainer.model.to(trainer.args.device)
        trainer.create_optimizer()
    trainer.add_callback(_callback(fsdp))


def _check_eval_batches(trainer: Any) -> None:
    """Partial batches are dropped on XLA: an eval set smaller than one batch has no loss."""
    ds = trainer.eval_dataset  # the job evaluates at the end whenever there is eval data
    if ds is None:
        return
    batch = trainer.args.per_device_eval_batch_size
    if len(ds) < batch:
        raise DataError(f"data: {len(ds)} eval rows are fewer than one eval batch ({batch} rows) "
                        "on TPU, where partial batches are dropped to keep shapes static; raise "
                        "data.eval_fraction or lower train.batch_size")


def compile_stats() -> tuple[int, float]:
    """XLA graph compilations so far in this process, and the seconds they took."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return (int(data[0]), data[1] / 1e9) if data else (0, 0.0)


def _callback(fsdp: bool) -> Any:
    from transformers import TrainerCallback

    class XlaSetup(TrainerCallback):
        """FSDPv2, once the trainer has wrapped the model: an output sharding TRL's loss works
        with, clean state-dict names, and proof that the optimizer updates the model. At the end:
        how many graphs were compiled and the last step that compiled one (with static shapes,
        one of the first few: later steps reuse the graphs)."""

        compiles = 0
        last_compile_step = 0

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if not fsdp or model is None or getattr(model, "_sft_job_prepared", False):
                return control
            if not hasattr(model, "_shard_output"):
                raise RuntimeError(f"XLA FSDPv2: {type(model).__name__} is not the torch_xla "
                                   "FSDPv2 wrapper this code was written for (torch-xla 2.9)")
            # TRL's SFT loss returns a FusedCausalLMOutput, which transformers' shard_output
            # rejects ("the output of the model shouldn't be `None`").
            model._shard_output = _shard_output
            model.register_state_dict_post_hook(_strip_wrapper_prefix)
            model._sft_job_prepared = True
            _check_optimizer_params(model, optimizer)
            return control

        def on_step_end(self, args, state, control, **kw):
            n, _ = compile_stats()
            if n != self.compiles:
                self.compiles, self.last_compile_step = n, state.global_step
            return control

        def on_save(self, args, state, control, **kw):
            # Reading sharded tensors for a checkpoint compiles gather graphs: not step graphs.
            self.compiles, _ = compile_stats()
            return control

        def on_train_end(self, args, state, control, **kw):
            n, secs = compile_stats()
            log.info("XLA: %d graph compilations (%.1f s) in %d steps, the last at step %d",
                     n, secs, state.global_step, self.last_compile_step)
            return control

    return XlaSetup()


def _shard_output(output: Any, mesh: Any) -> None:
    """Mark the batch dimension of the model's outputs as split over the `fsdp` mesh axis (what
    tells the SPMD partitioner to run FSDP): a tensor, a tuple's first item, or every batched
    tensor of a ModelOutput (logits, or TRL's fused log-probs)."""
    from collections.abc import Mapping

    import torch
    import torch_xla.distributed.spmd as xs

    if isinstance(output, torch.Tensor):
        tensors = [output]
    elif isinstance(output, Mapping):
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor) and v.dim() >= 2]
    elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        tensors = [output[0]]
    else:
        raise TypeError(f"XLA FSDPv2: cannot shard a model output of type {type(output).__name__}")
    for t in tensors:
        xs.mark_sharding(t, mesh, ("fsdp",) + (None,) * (t.dim() - 1))


def _strip_wrapper_prefix(module: Any, state_dict: Any, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: `model.layers.0._orig_module.mlp...` -> `model.layers.0.mlp...`."""
    items = list(state_dict.items())
    state_dict.clear()
    state_dict.update((k.replace(WRAPPER_PREFIX, ""), v) for k, v in items)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        fixed = {k.replace(WRAPPER_PREFIX, "").replace("_orig_module", "").replace("..", ".")
                 .strip("."): v for k, v in meta.items()}
        meta.clear()
        meta.update(fixed)


def _check_optimizer_params(model: Any, optimizer: Any) -> None:
    """A stale optimizer (holding pre-wrap CPU copies) would train nothing, silently."""
    if optimizer is None:
        raise RuntimeError("XLA FSDPv2: the trainer has no optimizer (create_optimizer was not "
                           "called before train)")
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable or held != trainable:
        raise RuntimeError(f"XLA FSDPv2: the optimizer holds {len(held)} tensors but the wrapped "
                           f"model has {len(trainable)} trainable parameters; they differ")


def save_model(trainer: Any, out: Path) -> None:
    """Save the trained model (or adapter) as safetensors of plain CPU tensors, loadable without
    torch-xla. Every process calls it (reading sharded tensors is collective); the main one
    writes."""
    import torch_xla.core.xla_model as xm

    xm.mark_step()  # run pending updates before reading the weights
    model = trainer.model  # after train() under FSDPv2: the wrapper, `.module` is the model
    inner = model.module if fsdp_enabled(trainer) else model
    peft = hasattr(inner, "peft_config")
    # Names as the model's own modules see them (`layers.0._orig_module.mlp...` under FSDPv2):
    # PEFT picks its adapter tensors by module name. The prefix is stripped from what is written.
    raw = inner.state_dict()
    if peft:  # only the adapter (trainable) tensors leave the device
        trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
        raw = {k: v for k, v in raw.items() if k in trainable or "lora_" in k}
    state = {k: v.detach().to("cpu") for k, v in raw.items()}
    if not peft:
        state = {k.replace(WRAPPER_PREFIX, ""): v for k, v in state.items()}
    xm.rendezvous("sft_job_save_model")
    if trainer.args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        inner.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        if peft:
            _strip_saved_keys(out / "adapter_model.safetensors")
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(out))
    xm.rendezvous("sft_job_saved_model")


def _strip_saved_keys(path: Path) -> None:
    """Rewrite a safetensors file without FSDPv2's `_orig_module.` in its tensor names."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        names = list(f.keys())
        tensors = {k.replace(WRAPPER_PREFIX, ""): f.get_tensor(k) for k in names}
    if not tensors:
        raise RuntimeError(f"{path}: no adapter tensors were saved")
    save_file(tensors, str(path), metadata=meta)
