"""Hardware backends: which one runs, its dtype, attention kernel and trainer settings."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_job.errors import UnsupportedError
from sft_job.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    name: str  # cpu | cuda | tpu
    dtype: str  # float32 | bfloat16 | float16
    attn: str  # eager | sdpa | varlen_sdpa | flash_attention_2 (model_attn adapts it per model)
    sft_args: dict[str, Any] = field(default_factory=dict)

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


def tpu_present() -> bool:
    """A TPU runtime is configured: PJRT_DEVICE=TPU, or (PJRT_DEVICE unset) libtpu and
    torch_xla installed. An explicit PJRT_DEVICE=CPU/CUDA on a TPU image means no TPU."""
    pjrt = os.environ.get("PJRT_DEVICE", "").upper()
    if pjrt:
        return pjrt == "TPU"
    return (importlib.util.find_spec("libtpu") is not None
            and importlib.util.find_spec("torch_xla") is not None)


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def detect() -> str:
    """The backend `auto` resolves to: cuda, then tpu, then cpu."""
    if cuda_present():
        return "cuda"
    if tpu_present():
        return "tpu"
    return "cpu"


def resolve(spec: JobSpec) -> Backend:
    """Backend for the spec; asking for hardware that is not there is an error, not a fallback."""
    name = detect() if spec.backend == "auto" else spec.backend
    if name == "cuda" and not cuda_present():
        raise UnsupportedError("backend: cuda asked for but no CUDA GPU is visible "
                               "(check the pod's nvidia.com/gpu limit); use backend: auto or cpu")
    if name == "tpu" and spec.model.attn_implementation in ("varlen_sdpa", "flash_attention_2"):
        raise UnsupportedError(f"model.attn_implementation: {spec.model.attn_implementation} does not "
                               "run on TPU (static shapes); use auto or eager")
    if name == "tpu" and importlib.util.find_spec("torch_xla") is None:
        raise UnsupportedError("backend: tpu needs torch_xla (use the TPU image or `pip install "
                               "sft-job[tpu]`)")
    if spec.method.kind == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise UnsupportedError("method.kind: qlora needs bitsandbytes (`pip install sft-job[qlora]`)")
    if name == "cuda":
        import torch

        bf16 = torch.cuda.is_bf16_supported()
        flash = importlib.util.find_spec("flash_attn") is not None and bf16
        attn = _attn(spec, "flash_attention_2" if flash else "sdpa")
        return Backend("cuda", "bfloat16" if bf16 else "float16", attn,
                       sft_args={"bf16": bf16, "fp16": not bf16})
    if name == "tpu":
        from sft_job.train import xla

        # sdpa in bf16 fails on XLA; eager attention works everywhere there.
        return Backend("tpu", "bfloat16", _attn(spec, "eager"),
                       sft_args=xla.sft_args(spec))  # FSDPv2 over SPMD, XLA AdamW, drop_last
    # per-sample sdpa over flattened (padding-free) batches, packed or not: bench/RESULTS.md
    return Backend("cpu", "float32", _attn(spec, "varlen_sdpa"),
                   sft_args={"use_cpu": True, "bf16": False, "fp16": False})


def _attn(spec: JobSpec, default: str) -> str:
    if spec.model.attn_implementation != "auto":
        return spec.model.attn_implementation
    return default


def model_attn(model_dir: Path, attn: str, max_length: int) -> str:
    """The attention to load `model_dir`'s model with: varlen_sdpa only where the model
    supports it (else sdpa), and eager for architectures without sdpa (GPT-Neo)."""
    import json
    from types import SimpleNamespace

    from sft_job.train import varlen

    config = SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))
    if attn == varlen.NAME:
        if varlen.supports(config, max_length):
            return varlen.register()
        log.info("attention: no varlen_sdpa for %s here, using sdpa",
                 getattr(config, "model_type", "this model"))
        attn = "sdpa"
    if attn == "sdpa" and getattr(config, "model_type", "") in ("gpt_neo",):
        return "eager"
    return attn


def flattens(model: Any) -> bool:
    """Whether packed rows go to `model` flattened (one row per batch, varlen attention)."""
    from sft_job.train import varlen

    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return attn in ("flash_attention_2", "flash_attention_3", varlen.NAME)
