"""finish/merge.py: the shard-by-shard LoRA merge gives the same model as PEFT's
merge_and_unload (Llama linears and GPT-2's fan_in_fan_out Conv1D), keeps a sharded base
sharded, refuses an adapter made for another model, and max_logit_diff sees a bad merge."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sft_job.errors import ModelError
from sft_job.finish.merge import max_logit_diff, merge_adapter
from sft_job.spec import MethodSpec

INPUT = [[5, 17, 300, 42, 999, 7, 1000, 64, 2, 3, 811, 12]]


@dataclass
class Adapted:
    base_dir: Path
    adapter_dir: Path
    adapter_logits: Any  # base + adapter, unmerged
    peft_merged_logits: Any  # PEFT merge_and_unload()
    base_logits: Any


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(INPUT), use_cache=False).logits


def _make_adapter(base_dir: Path, out: Path, seed: int = 0, **lora: Any) -> Adapted:
    """A LoRA adapter made the way training makes it (models.load.lora_config), with lora_B
    drawn at random so the delta is not zero, saved like trainer.model.save_pretrained."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sft_job.models.load import lora_config

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    base_logits = _logits(base)
    cfg = lora_config(MethodSpec(kind="lora", r=4, alpha=8, dropout=0.0), base)
    for k, v in lora.items():
        setattr(cfg, k, v)
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    model.save_pretrained(str(out))
    adapter_logits = _logits(model)
    merged_logits = _logits(model.merge_and_unload())
    return Adapted(base_dir, out, adapter_logits, merged_logits, base_logits)


def _load_logits(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return _logits(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval())


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def adapted(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_gpt2_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Adapted:
    base = tiny_llama_dir if request.param == "tiny-llama" else tiny_gpt2_dir
    return _make_adapter(base, tmp_path_factory.mktemp(f"adapter-{request.param}"))


def _assert_close(a: Any, b: Any, atol: float = 1e-5) -> None:
    import torch

    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_merge_equals_peft_merge_and_unload(adapted: Adapted, tok: Any, tmp_path: Path) -> None:
    cfg = json.loads((adapted.adapter_dir / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] == (adapted.base_dir.name.startswith("tiny-gpt2"))  # Conv1D
    # the adapter really changes the model, and PEFT's own merge is faithful
    assert (adapted.adapter_logits - adapted.base_logits).abs().max() > 0.1
    _assert_close(adapted.peft_merged_logits, adapted.adapter_logits)

    out = merge_adapter(adapted.base_dir, adapted.adapter_dir, tmp_path / "model", tok)
    _assert_close(_load_logits(out), adapted.peft_merged_logits)

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.startswith(("adapter_", ".merge-")) for f in files)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(out)).encode("Hello there") == tok.encode("Hello there")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def _sharded_merge(adapted: Adapted, tmp_path: Path) -> tuple[Path, Path]:
    """Save the base in several small shards, merge into it; (sharded base, merged)."""
    import torch
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "base"
    model = AutoModelForCausalLM.from_pretrained(str(adapted.base_dir), dtype=torch.float32)
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    assert not (sharded / "model.safetensors").exists()
    return sharded, merge_adapter(sharded, adapted.adapter_dir, tmp_path / "merged")


def test_merge_keeps_a_sharded_base_sharded(adapted: Adapted, tmp_path: Path) -> None:
    from safetensors import safe_open

    sharded, out = _sharded_merge(adapted, tmp_path)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    got = json.loads((out / "model.safetensors.index.json").read_text())
    assert got["weight_map"] == index["weight_map"]
    for shard in shards:  # each shard holds the same tensors as the base's
        with safe_open(str(sharded / shard), "pt") as a, safe_open(str(out / shard), "pt") as b:
            assert set(a.keys()) == set(b.keys())
    assert not (out / "model.safetensors").exists()


def test_merge_into_a_sharded_base_equals_peft_merge(adapted: Adapted, tmp_path: Path) -> None:
    _, out = _sharded_merge(adapted, tmp_path)
    _assert_close(_load_logits(out), adapted.peft_merged_logits)


def test_max_logit_diff_small_for_a_correct_merge_large_for_a_wrong_one(
        adapted: Adapted, tmp_path: Path) -> None:
    out = merge_adapter(adapted.base_dir, adapted.adapter_dir, tmp_path / "model")
    diff = max_logit_diff(adapted.base_dir, adapted.adapter_dir, out, INPUT[0])
    assert diff is not None and diff < 1e-5
    # a "merge" that forgot the adapter: the plain base
    wrong = max_logit_diff(adapted.base_dir, adapted.adapter_dir, adapted.base_dir, INPUT[0])
    assert wrong is not None and wrong > 1e-2


def test_adapter_for_another_architecture_is_refused(tiny_llama_dir: Path, tiny_gpt2_dir: Path,
                                                      tmp_path: Path) -> None:
    gpt2 = _make_adapter(tiny_gpt2_dir, tmp_path / "gpt2-adapter")
    out = tmp_path / "model"
    with pytest.raises(ModelError, match="not found in the base weights"):
        merge_adapter(tiny_llama_dir, gpt2.adapter_dir, out)
    assert not out.exists() or not any(out.iterdir())  # nothing half-written left behind


def test_adapter_for_another_size_is_a_model_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_job.models.load import lora_config

    other = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    peft_model = get_peft_model(other, lora_config(MethodSpec(kind="lora", r=4), other))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "model"
    try:
        with pytest.raises(ModelError):
            merge_adapter(tiny_llama_dir, tmp_path / "adapter", out)
    finally:
        leftovers = list(out.glob(".merge-*")) if out.exists() else []
        for d in leftovers:
            shutil.rmtree(d)
    assert not leftovers


def test_rslora_scale(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rs = _make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=1, use_rslora=True)
    out = merge_adapter(tiny_llama_dir, rs.adapter_dir, tmp_path / "model")
    _assert_close(_load_logits(out), rs.peft_merged_logits)


def test_adapter_with_modules_to_save_falls_back_to_peft(tiny_llama_dir: Path,
                                                         tmp_path: Path) -> None:
    full = _make_adapter(tiny_llama_dir, tmp_path / "adapter", seed=2, modules_to_save=["lm_head"])
    out = merge_adapter(tiny_llama_dir, full.adapter_dir, tmp_path / "model")
    _assert_close(_load_logits(out), full.peft_merged_logits)
