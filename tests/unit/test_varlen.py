"""train/varlen.py: per-sample sdpa over flattened packed rows (the CPU default when packing).

tests/unit/test_packing.py runs the packed-loss and no-contamination checks with it on the
builtin models; here: every allowed model type, gradients, the padded (generation) path, and
which attention each model gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft_job.train import varlen

LENS = [5, 9, 1, 3]


def _tiny(model_type: str, **extra: Any) -> Any:
    from transformers import AutoConfig

    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=101, n_embd=32, n_layer=2, n_head=4,
                                    n_positions=64, bos_token_id=0, eos_token_id=0, **extra)
    return AutoConfig.for_model(model_type, vocab_size=101, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=8, max_position_embeddings=64, **extra)


def _model(config: Any, attn: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def _flat(lens: list[int]) -> tuple[Any, Any, list[Any]]:
    import torch

    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(1, 101, (n,), generator=gen) for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return torch.cat(ids)[None], pos, ids


@pytest.mark.parametrize("model_type", varlen.MODEL_TYPES)
def test_flattened_row_equals_samples_run_alone_logits_and_gradients(model_type: str) -> None:
    import torch

    config = _tiny(model_type, **({"sliding_window": None} if model_type == "mistral" else {}))
    assert varlen.supports(config, 512)
    model = _model(config, varlen.register())
    flat, pos, ids = _flat(LENS)
    packed = model(input_ids=flat, position_ids=pos, use_cache=False).logits[0]
    packed.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(input_ids=i[None], use_cache=False).logits[0] for i in ids])
    alone.sum().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # the control: the same row as one sequence (no restart) differs, so the check has teeth
    with torch.no_grad():
        one = model(input_ids=flat, use_cache=False).logits[0]
    assert (one[LENS[0]:] - alone[LENS[0]:].detach()).abs().max() > 1e-3


def test_segments_cut_where_positions_restart() -> None:
    import torch

    assert varlen.segments(torch.tensor([[0, 1, 2, 0, 0, 1]])) == [(0, 3), (3, 4), (4, 6)]
    assert varlen.segments(torch.tensor([0, 1, 2, 3])) == [(0, 4)]
    # packed rows padded with position ids that do not continue: padding is its own segment
    assert varlen.segments(torch.tensor([0, 1, 0, 1, 2, 0, 1])) == [(0, 2), (2, 5), (5, 7)]


def test_rows_batch_without_mask_is_per_sample_too() -> None:
    """[batch, row] packed rows (restarting position ids, no mask) are split per row."""
    import torch

    model = _model(_tiny("llama"), varlen.register())
    flat, _, ids = _flat([4, 6, 6, 4])
    rows = flat.reshape(2, 10)
    rpos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    with torch.no_grad():
        got = model(input_ids=rows, position_ids=rpos, use_cache=False).logits.reshape(20, -1)
        alone = torch.cat([model(input_ids=i[None], use_cache=False).logits[0] for i in ids])
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_padded_generation_matches_sdpa() -> None:
    """A padded batch with a KV cache takes sdpa's masked path: same tokens as plain sdpa."""
    import torch

    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    outs = []
    for attn in ("sdpa", varlen.register()):
        model = _model(_tiny("llama"), attn)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                   do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(("config", "max_length", "ok"), [
    ({"model_type": "llama"}, 4096, True),
    ({"model_type": "gpt2"}, 1024, True),
    ({"model_type": "gpt_neo"}, 512, False),
    ({"model_type": "gemma2", "sliding_window": 4096}, 512, False),  # not an allowed type
    ({"model_type": "mistral", "sliding_window": 4096}, 4096, True),
    ({"model_type": "mistral", "sliding_window": 256}, 512, False),  # the window would matter
    ({"model_type": "qwen2", "sliding_window": 256, "use_sliding_window": False}, 512, True),
])
def test_supports(config: dict, max_length: int, ok: bool) -> None:
    from types import SimpleNamespace

    assert varlen.supports(SimpleNamespace(**config), max_length) is ok


def test_model_attn_picks_per_model(tmp_path: Path, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    from sft_job.train.backends import model_attn

    assert model_attn(tiny_llama_dir, "varlen_sdpa", 512) == "varlen_sdpa"
    assert model_attn(tiny_gpt2_dir, "varlen_sdpa", 512) == "varlen_sdpa"
    neo = tmp_path / "neo"
    neo.mkdir()
    (neo / "config.json").write_text(json.dumps({"model_type": "gpt_neo"}))
    assert model_attn(neo, "varlen_sdpa", 512) == "eager"  # no varlen, no sdpa: eager
    assert model_attn(tiny_llama_dir, "sdpa", 512) == "sdpa"


def test_cpu_backend_default_is_varlen_packed_or_not() -> None:
    from sft_job.spec import JobSpec
    from sft_job.train.backends import resolve

    def spec(**data: Any) -> JobSpec:
        return JobSpec.model_validate({"name": "t", "model": {"base": "builtin:tiny-llama"}, "backend": "cpu",
                                       "data": {"train": "x.jsonl", **data},
                                       "output": {"uri": "out"}})

    assert resolve(spec()).attn == "varlen_sdpa"
    assert resolve(spec(packing=False)).attn == "varlen_sdpa"  # padding-free batches of samples


def test_saved_config_does_not_name_the_attention(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """The trained model loads anywhere: config.json does not carry varlen_sdpa."""
    from transformers import AutoModelForCausalLM

    from sft_job.train.backends import flattens

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), attn_implementation=varlen.register())
    assert flattens(model)
    model.save_pretrained(tmp_path)
    assert "varlen" not in (tmp_path / "config.json").read_text()
