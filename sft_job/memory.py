"""Memory per device, estimated from the model config (no weights loaded).

weights + gradients + optimizer states (partitioned by the ZeRO stage) + activations
(Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, about 2*s*b*h with
full activation checkpointing) + logits + a fixed runtime overhead. An estimate to catch jobs
that cannot fit, not a promise: real use varies with kernels and fragmentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_job.spec import ACCELERATOR_MEMORY_GB, JobSpec

GB = 1024**3
# CUDA context and kernels; on CPU the resident size of a process that imported torch,
# transformers, TRL and PEFT (0.6 GB measured with a tiny model, bench/memory.py)
RUNTIME_OVERHEAD_GB = {"cuda": 1.0, "tpu": 0.5, "cpu": 0.6}
# Activations kept for backward per token and layer, in values of the activation dtype: the
# attention block's norm input/output, q, k, v, rope outputs, attention output (7h + 3 kv) and
# the gated MLP's gate, up, activation and product (4 i). Each LoRA-adapted linear adds its
# dropout output and mask (~2.8 x its input width, fitted). Fitted on CPU peaks of SmolLM2-135M
# (bench/memory.py; README): full 41 KB/token/layer measured vs 43 estimated, LoRA 94-99 vs 95.
LORA_INPUT_FACTOR = 2.8
# With gradient checkpointing the layer inputs are kept (h per token and layer), one layer is
# recomputed at a time, and on CPU the allocator keeps about this share of what a run without
# checkpointing peaks at (measured 0.52-0.58 on SmolLM2 LoRA).
CKPT_CPU_SHARE = 0.55


def _config(spec: JobSpec, meta: Path | str | None) -> Any:
    """The model's config, from `meta` (where validate read the tokenizer) or found now."""
    from transformers import AutoConfig

    from sft_job.models import source

    if meta is None:
        meta = source.parse(spec.model.base).meta_dir(spec.model.revision)
    return AutoConfig.from_pretrained(str(meta), trust_remote_code=spec.model.trust_remote_code)


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


def _activations(cfg: Any, spec: JobSpec, backend: str, tokens: int, abytes: int
                 ) -> tuple[float, float]:
    """(activation bytes kept for backward, LM head + loss bytes) of one micro-batch."""
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 1)
    kv = h * (getattr(cfg, "num_key_value_heads", None) or heads) // heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * h
    vocab = getattr(cfg, "vocab_size", 0)
    per = 7 * h + 3 * kv + 4 * inter
    if spec.method.kind != "full":
        targets = spec.method.target_modules
        widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": h, "gate_proj": h, "up_proj": h,
                  "down_proj": inter, "c_attn": h, "c_proj": h, "c_fc": h}
        adapted = sum(widths.values()) - 3 * h if targets == "all-linear" else \
            sum(widths.get(t, h) for t in targets)  # all-linear: the llama names, not gpt2's too
        per += (LORA_INPUT_FACTOR if spec.method.dropout else 1.0) * adapted
    if spec.model.attn_implementation == "eager":
        per += 2 * heads * spec.data.max_length  # scores and probabilities
    full = layers * tokens * per * abytes
    if spec.method.gradient_checkpointing:
        kept = layers * tokens * h * abytes + tokens * per * abytes
        act = max(kept, CKPT_CPU_SHARE * full) if backend == "cpu" else kept
    else:
        act = full
    # logits in fp32 and their gradient; the job's CPU head and TRL's fused GPU head work in
    # chunks (~64 MiB of logits), the TPU path materialises them whole
    head = tokens * vocab * 4 * 2
    if backend != "tpu":
        head = min(head, 3 * 64 * 2**20)
    return act, head


def estimate(spec: JobSpec, meta: Path | str | None = None) -> dict[str, Any] | None:
    """Per-device memory estimate in GB with its breakdown. `meta`: a folder (or Hub id)
    holding the model's config, when the caller has one."""
    cfg = _config(spec, meta)
    total, linear, lora = _counts(cfg, spec)
    acc = spec.resources.accelerator
    backend = spec.backend if spec.backend != "auto" else (
        "tpu" if acc == "tpu-v5e" else "cuda" if acc and acc != "cpu" else "cpu")
    wbytes = 4 if backend == "cpu" else 2
    kind = spec.method.kind
    zero = spec.deepspeed.preset or "none"  # a JSON config is estimated as no ZeRO
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
    tokens = spec.data.max_length * spec.train.batch_size  # per micro-batch (packed: full rows)
    act, head = _activations(cfg, spec, backend, tokens, wbytes if backend != "cpu" or
                             spec.train.precision != "bf16" else 2)
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": act,
             "logits": head, "runtime": RUNTIME_OVERHEAD_GB[backend] * GB}
    return {
        "params": total,
        "trainable_params": trainable,
        "backend_assumed": backend,
        "total_gb": round(sum(parts.values()) / GB, 3),
        "breakdown_gb": {k: round(v / GB, 3) for k, v in parts.items()},
        "device_gb": ACCELERATOR_MEMORY_GB.get(acc) if acc else None,
    }
