"""Variable-length ("varlen") attention over flattened packed rows, for kernels that have none.

Flash-attention's varlen kernels make a packed batch cost what its samples cost: one flattened
row, each sample attending only to itself. Without them (CPU, or GPUs without flash-attn)
transformers turns the restarting position ids of packed rows into a dense block-diagonal
mask, so attention costs row_len^2 however short the samples are. `varlen_sdpa` gives sdpa the
same per-sample shape flash-attention has: the flattened row is cut where the position ids
restart, and each sample runs causal sdpa on its own (no mask, no cross-sample work, so no
contamination by construction). Anything else (a padded generation batch, a KV cache) goes to
plain sdpa with the usual mask.

Registered under the name `varlen_sdpa` with transformers' AttentionInterface; only model types
whose attention layers receive the position ids are allowed (`supports`), and the equivalence
with separate forwards is tested for each (tests/unit/test_varlen.py).
"""

from __future__ import annotations

import itertools
from typing import Any

NAME = "varlen_sdpa"
# checked by tests/unit/test_varlen.py: their attention layers get position_ids in **kwargs
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def register() -> str:
    """Register the attention and mask functions (idempotent); returns the name to load with."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_sdpa)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def supports(config: Any, max_length: int) -> bool:
    """Whether `config`'s model can train on flattened rows with `varlen_sdpa`: a known model
    type whose sliding window (which the per-sample path does not apply) is off or longer than
    any sample."""
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    return window is None or window >= max_length or getattr(config, "use_sliding_window", True) is False


def segments(position_ids: Any) -> list[tuple[int, int]]:
    """[start, end) of each sample in one flattened row: a new sample starts where the
    position id does not follow the previous one."""
    import torch

    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).reshape(-1).add(1).tolist()
    bounds = [0, *starts, pos.numel()]
    return list(itertools.pairwise(bounds))


def varlen_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                position_ids: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers attention function: per-sample causal sdpa on packed rows (flattened to
    one row, or [batch, row] with restarting position ids); plain sdpa otherwise."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    packed = (attention_mask is None and position_ids is not None
              and query.shape[2] == key.shape[2] == position_ids.shape[-1] > 1)
    cu = kwargs.get("cu_seq_lens_q")  # TRL's padding-free collator computes the boundaries
    if packed and cu is not None and query.shape[0] == 1:
        rows = [list(itertools.pairwise(cu.tolist()))]
    else:
        rows = [segments(p) for p in position_ids.reshape(-1, position_ids.shape[-1])] if packed else []
    if not any(len(r) > 1 for r in rows):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if len(rows) == 1 and query.shape[0] > 1:  # one set of position ids for the whole batch
        rows *= query.shape[0]
    dtype = query.dtype
    if query.device.type == "cpu" and dtype != torch.float32:
        # CPU sdpa at per-sample shapes (~100 tokens, head dim 64) is ~3x slower in bf16 than in
        # fp32 (forward + backward, torch 2.13): under bf16 autocast, attend in fp32
        query, key, value = query.float(), key.float(), value.float()
    out = []
    for b, spans in enumerate(rows):
        # split, not slices: the backward of split is one cat, a slice's is a full-size zero tensor
        sizes = [e - s for s, e in spans]
        parts = zip(*(t[b:b + 1].split(sizes, dim=2) for t in (query, key, value)), strict=True)
        out.append(torch.cat([sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
                              for q, k, v in parts], dim=1))
    # [batch, tokens, heads, head_dim], as sdpa returns it
    return torch.cat(out, dim=0).to(dtype), None


def _mask(*args: Any, **kwargs: Any) -> Any:
    """No mask for an unpadded batch without a cache (the attention function splits packed
    rows itself); sdpa's usual mask otherwise (padding, generation with a KV cache)."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length"):
        return None
    return sdpa_mask(*args, **kwargs)
