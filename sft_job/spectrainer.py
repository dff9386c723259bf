"""The spec's `trainer:` pass-through: an allow-list of trl.SFTConfig fields (no trl import:
the spec validates without the training libraries; train/passthrough.py checks the settings
build).

Only fields that change neither what is trained on, nor where anything goes, nor a number the job
reports, and that no spec field sets, pass; every other SFTConfig field is refused naming the
spec field to use (`push_to_hub` would publish past output.push_to_hub and its private default,
`output_dir` write anywhere, `report_to` send data to services the spec never named,
`max_steps` make the logged plan wrong).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer

from sft_job.specbase import Strict

# SFTConfig fields the spec sets itself, and the spec field a user sets instead.
TRAINER_OWNED = {
    "output_dir": "output.uri", "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.batch_size", "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps", "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler", "warmup_steps": "train.warmup_ratio",
    "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay",
    "gradient_accumulation_steps": "train.grad_accum", "max_grad_norm": "train.max_grad_norm",
    "logging_steps": "train.logging_steps", "logging_strategy": "train.logging_steps",
    "logging_first_step": "train.logging_steps", "eval_steps": "train.eval_steps",
    "eval_strategy": "train.eval_steps", "seed": "train.seed", "data_seed": "train.seed",
    "gradient_checkpointing": "method.gradient_checkpointing", "max_length": "data.max_length",
    "packing": "data.packing", "packing_strategy": "data.packing", "padding_free": "data.packing",
    "eval_packing": "data.packing", "completion_only_loss": "data.train_on_prompt",
    "assistant_only_loss": "data.train_on_prompt", "dataset_text_field": "data.text_field",
    "chat_template_path": "model.chat_template", "trust_remote_code": "model.trust_remote_code",
    "model_init_kwargs": "model", "save_strategy": "output.save_every_steps",
    "save_steps": "output.save_every_steps", "save_total_limit": "output.keep_checkpoints",
    "resume_from_checkpoint": "output.uri (a rerun resumes from its newest checkpoint)",
    "push_to_hub": "output.push_to_hub", "hub_model_id": "output.push_to_hub",
    "hub_private_repo": "output.hub_private", "hub_strategy": "output.push_to_hub",
    "hub_token": "output.push_to_hub (the token comes from HF_TOKEN)",
    "hub_always_push": "output.push_to_hub", "hub_revision": "output.push_to_hub",
    "report_to": "train.report_to", "logging_dir": "train.report_to",
    "run_name": "train.report_to", "project": "train.report_to",
    "trackio_space_id": "train.report_to", "deepspeed": "deepspeed", "fsdp": "backend",
    "fsdp_config": "backend", "use_cpu": "backend", "bf16": "backend", "fp16": "backend",
    "bf16_full_eval": "backend", "fp16_full_eval": "backend", "ddp_backend": "backend",
    "dataloader_num_workers": "data (rows are tokenized and packed before training)",
}


def _refs(what: str) -> Any:
    return Field(None, description=what)


class TrainerSpec(Strict):
    """The `trainer:` pass-through: SFTConfig fields that change neither what is trained on,
    nor where anything goes, nor a number the job reports, and are not set by another field."""

    optim: str | None = _refs("Optimizer name (transformers OptimizerNames), e.g. adamw_torch_fused.")
    optim_args: str | None = _refs("Extra optimizer arguments, 'key=value,key=value'.")
    optim_target_modules: str | list[str] | None = _refs("Modules for GaLore-style optimizers.")
    adam_beta1: float | None = Field(None, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float | None = Field(None, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float | None = Field(None, gt=0, le=1, description="AdamW epsilon.")
    lr_scheduler_kwargs: dict[str, float | int | str | bool] | None = _refs(
        "Extra arguments of train.lr_scheduler.")
    label_smoothing_factor: float | None = Field(None, ge=0, lt=1, description="Label smoothing.")
    neftune_noise_alpha: float | None = Field(None, gt=0, le=100, description="NEFTune noise.")
    tf32: bool | None = _refs("TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing_kwargs: dict[str, float | int | str | bool] | None = _refs(
        "Arguments of gradient checkpointing (method.gradient_checkpointing turns it on).")
    torch_compile: bool | None = _refs("torch.compile the model.")
    torch_compile_backend: Literal["inductor", "aot_eager", "cudagraphs", "openxla"] | None = \
        _refs("torch.compile backend.")
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                                "max-autotune-no-cudagraphs"] | None = _refs("torch.compile mode.")
    torch_empty_cache_steps: int | None = Field(None, gt=0, description="Empty the CUDA cache "
                                                "every N steps.")
    eval_accumulation_steps: int | None = Field(None, gt=0, description="Eval steps kept on "
                                                "device before moving to CPU.")
    full_determinism: bool | None = _refs("Deterministic algorithms (slower).")
    ddp_find_unused_parameters: bool | None = _refs("DDP find_unused_parameters.")
    ddp_bucket_cap_mb: int | None = Field(None, gt=0, description="DDP bucket size (MB).")
    ddp_broadcast_buffers: bool | None = _refs("DDP broadcast_buffers.")
    ddp_static_graph: bool | None = _refs("DDP static_graph.")
    ddp_timeout: int | None = Field(None, gt=0, description="Process group timeout (seconds).")
    dataloader_pin_memory: bool | None = _refs("Pin data loader memory.")
    router_aux_loss_coef: float | None = Field(None, ge=0, description="MoE router loss weight.")
    activation_offloading: bool | None = _refs("Offload activations to CPU memory.")

    @model_serializer(mode="wrap")
    def _only_set(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def fields_set(self) -> dict[str, Any]:
        """The fields given, as SFTConfig keyword arguments."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


def trainer_refusal(name: str) -> str:
    """Why `trainer.<name>` is refused and what to set instead."""
    owner = TRAINER_OWNED.get(name)
    if owner:
        return f"set by the spec, not the trainer pass-through: use {owner}"
    return ("not a pass-through field (only SFTConfig fields the spec does not own and that "
            f"are safe: {', '.join(TrainerSpec.model_fields)})")
