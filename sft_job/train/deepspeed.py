"""DeepSpeed ZeRO configs consistent with the spec.

Presets leave batch sizes, accumulation, clipping and precision as "auto", which transformers'
DeepSpeed integration fills from the SFTConfig built from the same spec, so the two can never
disagree. A user's JSON is taken as is, after checking that values it pins match the spec.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sft_job.environment import DEEPSPEED_ON_CPU, deepspeed_on_cpu
from sft_job.errors import SpecError, UnsupportedError
from sft_job.spec import JobSpec


def _zero(stage: int, offload: bool) -> dict[str, Any]:
    z: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        z.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,  # save_model writes a full model
        })
    if offload:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        z["offload_param"] = {"device": "cpu", "pin_memory": True}
    return z


def config(spec: JobSpec) -> dict[str, Any] | None:
    """The DeepSpeed config dict for SFTConfig(deepspeed=...), None when off."""
    ds = spec.deepspeed
    if not ds.enabled:
        return None
    if ds.config_file:
        return _user_config(Path(ds.config_file), spec)
    return {
        "zero_optimization": _zero(ds.stage or 2, offload=ds.offload),
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _user_config(path: Path, spec: JobSpec) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"deepspeed: {path} not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"deepspeed: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    pins = {
        "train_micro_batch_size_per_gpu": spec.train.batch_size,
        "gradient_accumulation_steps": spec.train.grad_accum,
        "gradient_clipping": spec.train.max_grad_norm,
    }
    for key, want in pins.items():
        got = cfg.get(key, "auto")
        if got != "auto" and got != want:
            raise SpecError(f"deepspeed: {path} sets {key}={got} but the spec gives {want}; "
                            "use \"auto\" in the JSON so the spec decides")
    stage = cfg.get("zero_optimization", {}).get("stage")
    if spec.method.kind == "qlora" and stage == 3:
        raise SpecError("deepspeed: ZeRO-3 cannot shard pre-quantized 4-bit weights (qlora)")
    return cfg


def prepare_cpu(backend_name: str) -> dict[str, Any]:
    """Extra SFTConfig fields for DeepSpeed on CPU (gloo), which is only for testing the ZeRO
    code path: it must be asked for with SFT_JOB_DEEPSPEED_ON_CPU=1."""
    if backend_name != "cpu":
        return {}
    if not deepspeed_on_cpu():
        raise UnsupportedError("deepspeed: DeepSpeed is for GPUs; set deepspeed: none on CPU "
                               f"({DEEPSPEED_ON_CPU}=1 runs it over gloo, for testing only)")
    # accelerate and DeepSpeed disagree about the world size on CPU unless the distributed
    # state is created first with gloo and reused (see shared NOTES: the configured-state trap).
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState

    PartialState(backend="gloo")
    return {"use_cpu": False, "accelerator_config": {"use_configured_state": True}}
