"""Packing is exact: the loss of a packed batch equals the loss of the same samples run one by
one, and no sample's logits depend on another sample packed in the same row."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from sft_job.data.formats import to_example
from sft_job.data.load import Record
from sft_job.data.tokenize import IGNORE, make_collator, pack, tokenize_all

MODELS = [("builtin:tiny-llama", "sdpa"), ("builtin:tiny-gpt2", "sdpa"),
          ("builtin:tiny-llama", "eager"), ("builtin:tiny-gpt2", "eager"),
          ("builtin:tiny-llama", "varlen_sdpa"), ("builtin:tiny-gpt2", "varlen_sdpa")]
ROW_CAP = 96  # a few polite-set samples (20-45 tokens each) per packed row


@pytest.fixture(scope="module", params=MODELS, ids=[f"{n.split(':')[1]}-{a}" for n, a in MODELS])
def model(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from sft_job.train import varlen

    name, attn = request.param
    if attn == varlen.NAME:
        varlen.register()
    path = tiny_llama_dir if name == "builtin:tiny-llama" else tiny_gpt2_dir
    m = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn,
                                             dtype=torch.float32)
    return m.eval()


def _rows(tok: Any, spec: Any) -> list[dict[str, list[int]]]:
    text = (resources.files("sft_job") / "sample_data" / "polite.jsonl").read_text()
    records = [Record(json.loads(line), f"polite.jsonl:{i + 1}")
               for i, line in enumerate(text.splitlines()[:8])]
    examples = [to_example(r, "prompt-response", spec, tok) for r in records]
    rows, stats = tokenize_all(examples, tok, ROW_CAP)
    assert stats.truncated == 0 and len(rows) == 8
    return rows


@pytest.fixture(scope="module")
def masked_rows(tok: Any) -> list[dict[str, list[int]]]:
    """Prompt tokens masked: the first token of every sample is not trained."""
    from sft_job.spec import DataSpec

    rows = _rows(tok, DataSpec(train="x"))
    assert all(r["labels"][0] == IGNORE for r in rows)
    return rows


@pytest.fixture(scope="module")
def all_trained_rows(tok: Any) -> list[dict[str, list[int]]]:
    """train_on_prompt (or text format): every token is trained, the first one included."""
    from sft_job.spec import DataSpec

    rows = _rows(tok, DataSpec(train="x", train_on_prompt=True))
    assert all(r["labels"] == r["input_ids"] for r in rows)
    return rows


_REFERENCE: dict[tuple[int, int], tuple[float, int]] = {}


def _one_by_one(model: Any, rows: list[dict[str, list[int]]]) -> tuple[float, int]:
    """Sum of per-token NLL over trained (shifted) labels of each sample run alone, and count."""
    key = (id(model), id(rows))
    if key not in _REFERENCE:
        _REFERENCE[key] = _nll(model, rows)
    return _REFERENCE[key]


def _nll(model: Any, rows: list[dict[str, list[int]]]) -> tuple[float, int]:
    import torch

    total, count = 0.0, 0
    for r in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        target = torch.tensor(r["labels"][1:])
        keep = target != IGNORE
        total += float(-logp[keep, target[keep]].sum())
        count += int(keep.sum())
    return total, count


def _packed_loss(model: Any, rows: list[dict[str, list[int]]], pad_id: int, flatten: bool) -> float:
    import torch

    packed = pack(rows, ROW_CAP)
    assert len(packed) < len(rows) and any(len(p["seq_lengths"]) > 1 for p in packed)
    batch = make_collator(pad_id, packing=True, flatten=flatten)(packed)
    if flatten:
        assert batch["input_ids"].shape[0] == 1
    else:
        assert batch["input_ids"].shape[0] == len(packed) and "attention_mask" not in batch
    with torch.no_grad():
        return float(model(**batch, use_cache=False).loss)


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
def test_packed_loss_equals_one_by_one_loss(model: Any, masked_rows: list, tok: Any,
                                            flatten: bool) -> None:
    total, count = _one_by_one(model, masked_rows)
    assert count > 100
    assert _packed_loss(model, masked_rows, tok.pad_token_id, flatten) == pytest.approx(
        total / count, abs=1e-5)


@pytest.mark.parametrize("flatten", [
    pytest.param(False, id="rows"),
    pytest.param(True, id="flattened"),
])
def test_packed_loss_equals_one_by_one_when_every_token_is_trained(
        model: Any, all_trained_rows: list, tok: Any, flatten: bool) -> None:
    total, count = _one_by_one(model, all_trained_rows)
    assert _packed_loss(model, all_trained_rows, tok.pad_token_id, flatten) == pytest.approx(
        total / count, abs=1e-5)


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
def test_no_sample_sees_another(model: Any, masked_rows: list, tok: Any, flatten: bool) -> None:
    import torch

    packed = pack(masked_rows, ROW_CAP)
    i = next(k for k, p in enumerate(packed) if len(p["seq_lengths"]) >= 2)
    packed = [packed[i]] + [p for k, p in enumerate(packed) if k != i]
    first_len = packed[0]["seq_lengths"][0]
    collate = make_collator(tok.pad_token_id, packing=True, flatten=flatten)

    def logits(rows: list[dict]) -> Any:
        with torch.no_grad():
            return model(**collate(rows), use_cache=False).logits[0]

    before = logits(packed)
    changed = dict(packed[0])
    gen = torch.Generator().manual_seed(1)
    changed["input_ids"] = (torch.randint(5, 1000, (first_len,), generator=gen).tolist()
                            + packed[0]["input_ids"][first_len:])
    after = logits([changed, *packed[1:]])
    assert (after[:first_len] - before[:first_len]).abs().max() > 1e-2  # sample 1 did change
    torch.testing.assert_close(after[first_len:], before[first_len:], atol=1e-6, rtol=0)

    # and each sample's logits in the packed row equal its logits run alone
    pos = 0
    for n in packed[0]["seq_lengths"]:
        alone = model(input_ids=torch.tensor([packed[0]["input_ids"][pos:pos + n]]),
                      use_cache=False).logits[0]
        torch.testing.assert_close(before[pos:pos + n], alone.detach(), atol=1e-5, rtol=0)
        pos += n


def test_padding_free_unpacked_batch_loss_equals_one_by_one(model: Any, masked_rows: list,
                                                            tok: Any) -> None:
    """packing: false on a varlen backend: the batch's samples flattened into one row."""
    import torch

    batch = make_collator(tok.pad_token_id, packing=False, flatten=True)(masked_rows)
    assert batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in masked_rows))
    assert "attention_mask" not in batch
    total, count = _one_by_one(model, masked_rows)
    with torch.no_grad():
        loss = float(model(**batch, use_cache=False).loss)
    assert loss == pytest.approx(total / count, abs=1e-5)
