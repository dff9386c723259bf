"""Memory per device, estimated from the model config (no weights loaded).

weights + gradients + optimizer states (partitioned by the ZeRO stage) + activations
(Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, about 2*s*b*h with
full activation checkpointing) + logits + a fixed runtime overhead. An estimate to catch jobs
that cannot fit, not a promise: real use varies with kernels and fragmentation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.spec import ACCELERATOR_MEMORY_GB, JobSpec

GB = 1024**3
RUNTIME_OVERHEAD_GB = {"cuda": 1.0, "tpu": 0.5, "cpu": 0.3}


def _config(spec: JobSpec) -> Any:
    from transformers import AutoConfig

    from sft_job.models import source

    src = source.parse(spec.model.base)
    if src.kind == "builtin":
        from sft_job.models.builtin import build_builtin

        return AutoConfig.from_pretrained(build_builtin(src.location))
    if src.gguf:
        from sft_job.models.load import gguf_model_dir

        return AutoConfig.from_pretrained(gguf_model_dir(src, spec.model.revision, "float32",
                                                         weights=False))
    if src.kind == "bucket":
        d = Path(tempfile.mkdtemp(prefix="sft-job-cfg-"))
        storage.get(storage.join(src.uri, "config.json"), d / "config.json")
        return AutoConfig.from_pretrained(d)
    return AutoConfig.from_pretrained(str(src.path) if src.kind == "local" else src.location,
                                      trust_remote_code=spec.model.trust_remote_code)


def _counts(config: Any, spec: JobSpec) -> tuple[int, int, int]:
    """(all params, params in Linear layers, LoRA params) of a meta-device model."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    targets = spec.method.target_modules
    linear = lora = 0
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or w.dim() != 2 or "embed" in name or "wte" in name or "wpe" in name:
            continue
        if name.endswith("lm_head"):
            continue
        linear += w.numel()
        if targets == "all-linear" or any(name.split(".")[-1] == t for t in targets):
            fan_in, fan_out = w.shape[1], w.shape[0]
            lora += spec.method.r * (fan_in + fan_out)
    return total, linear, lora


def estimate(spec: JobSpec) -> dict[str, Any] | None:
    """Per-device memory estimate in GB with its breakdown."""
    cfg = _config(spec)
    total, linear, lora = _counts(cfg, spec)
    acc = spec.resources.accelerator
    backend = spec.backend if spec.backend != "auto" else (
        "tpu" if acc == "tpu-v5e" else "cuda" if acc and acc != "cpu" else "cpu")
    wbytes = 4 if backend == "cpu" else 2
    kind = spec.method.kind
    zero = spec.deepspeed if spec.deepspeed in ("zero2", "zero3", "zero3-offload") else "none"
    n = spec.resources.devices
    shard = n if zero.startswith("zero3") else 1
    weights = linear * 0.5 * 1.03 + (total - linear) * wbytes if kind == "qlora" else total * wbytes / shard
    trainable = total if kind == "full" else lora
    if zero != "none":  # fp32 master + 2 Adam moments + grads, partitioned over the ranks
        grads = trainable * wbytes / n
        optim = 0.0 if zero == "zero3-offload" else trainable * 12 / n
        if zero == "zero3-offload":
            weights = 0.0
    else:
        grads = trainable * (wbytes if kind == "full" else 4)
        optim = trainable * (2 * wbytes if kind == "full" else 8)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    vocab = getattr(cfg, "vocab_size", 0)
    s, b = spec.data.max_length, spec.train.batch_size
    scale = wbytes / 2
    if spec.method.gradient_checkpointing:
        act = layers * 2 * s * b * h * scale + s * b * h * (34 + 5 * heads * s / h) * scale
    else:
        act = layers * s * b * h * (34 + 5 * heads * s / h) * scale
    logits = s * b * vocab * 4 * 2
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": act,
             "logits": logits, "runtime": RUNTIME_OVERHEAD_GB[backend] * GB}
    return {
        "params": total,
        "trainable_params": trainable,
        "backend_assumed": backend,
        "total_gb": round(sum(parts.values()) / GB, 3),
        "breakdown_gb": {k: round(v / GB, 3) for k, v in parts.items()},
        "device_gb": ACCELERATOR_MEMORY_GB.get(acc) if acc else None,
    }
