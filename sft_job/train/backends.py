"""Hardware backends: which one runs, its dtype, attention kernel and trainer settings."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sft_job.environment import require
from sft_job.errors import UnsupportedError
from sft_job.spec import JobSpec

log = logging.getLogger(__name__)

LmHead = Literal["trained", "trl"]  # what computes the loss: sft_job.train.loss, or TRL's


@dataclass(frozen=True)
class Backend:
    name: str  # cpu | cuda | tpu
    dtype: str  # weights: float32 | bfloat16 | float16
    attn: str  # eager | sdpa | varlen_sdpa | flash_attention_2 (model_attn adapts it per model)
    sft_args: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # compute: fp32 | bf16 | fp16 (autocast over `dtype` weights)
    why: str = ""  # how the precision was chosen, for the plan line
    # "trained": sft_job.train.loss (logits of trained positions only); "trl": TRL's fused
    # head, whose Triton kernels on CUDA already skip untrained positions, and which keeps
    # static shapes on TPU (skipping positions would recompile XLA graphs at every batch)
    lm_head: LmHead = "trl"

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
    require(spec, name)  # the optional packages the spec needs on this backend
    if name == "cuda":
        return _cuda(spec)
    if name == "tpu":
        from sft_job.train import xla

        if spec.train.precision not in ("auto", "bf16"):
            raise UnsupportedError(f"train.precision: {spec.train.precision} is not supported on "
                                   "TPU; use auto or bf16")
        # sdpa in bf16 fails on XLA; eager attention works everywhere there.
        return Backend("tpu", "bfloat16", _attn(spec, "eager"),
                       sft_args=xla.sft_args(spec),  # FSDPv2 over SPMD, XLA AdamW, drop_last
                       precision="bf16", why="TPU")
    return _cpu(spec)


def _cuda(spec: JobSpec) -> Backend:
    import torch

    bf16_ok = torch.cuda.is_bf16_supported()
    want = spec.train.precision
    if want == "bf16" and not bf16_ok:
        raise UnsupportedError("train.precision: bf16 needs an Ampere or newer GPU; use auto or fp16")
    prec = want if want != "auto" else ("bf16" if bf16_ok else "fp16")
    why = "train.precision" if want != "auto" else ("GPU has bf16" if bf16_ok else "GPU has no bf16")
    flash = importlib.util.find_spec("flash_attn") is not None and prec == "bf16"
    attn = _attn(spec, "flash_attention_2" if flash else "sdpa")
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[prec]
    return Backend("cuda", dtype, attn, sft_args={"bf16": prec == "bf16", "fp16": prec == "fp16"},
                   precision=prec, why=why)


def cpu_bf16() -> str | None:
    """The CPU's native bf16 instructions (AVX512_BF16, AMX-BF16, Arm BF16/SVE-BF16), or None
    when it has none (bf16 would then be emulated, slower than fp32)."""
    import torch

    caps = torch.cpu.get_capabilities()
    found = [n for n in ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16") if caps.get(n)]
    return ", ".join(found) or None


# bf16 autocast as the CPU default: issue 19's evidence holds (bench/precision.py, 3 seeds of
# 300 SmolLM2 LoRA steps: eval loss inside fp32's seed range, 1.14x the tokens per CPU-s;
# bench/RESULTS.md section 0). Turning it on still needs the suite run under it and the
# memory estimate recalibrated (it is fitted to fp32 peaks).
CPU_BF16_DEFAULT = False


def _cpu(spec: JobSpec) -> Backend:
    """fp32 weights; bf16 autocast when asked for (train.precision: bf16; by default too on
    CPUs with native bf16 once CPU_BF16_DEFAULT is on), fp32 otherwise. Per-sample sdpa over
    flattened (padding-free) batches, packed or not, and the LM head over trained positions
    only (sft_job.train.loss)."""
    want = spec.train.precision
    if want == "fp16":
        raise UnsupportedError("train.precision: fp16 does not train on CPU; use auto, bf16 or fp32")
    native = cpu_bf16()
    if want == "auto":
        prec = "bf16" if native and CPU_BF16_DEFAULT else "fp32"
        why = (f"CPU has {native}" if prec == "bf16" else
               f"CPU has {native}; bf16 is opt-in (train.precision: bf16)" if native else
               "no native bf16 on this CPU")
    else:
        prec, why = want, "train.precision"
        if prec == "bf16" and not native:
            log.warning("train.precision: bf16 on a CPU without native bf16 is emulated and "
                        "usually slower than fp32")
    return Backend("cpu", "float32", _attn(spec, "varlen_sdpa"),
                   sft_args={"use_cpu": True, "bf16": prec == "bf16", "fp16": False},
                   precision=prec, why=why, lm_head="trained")


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
