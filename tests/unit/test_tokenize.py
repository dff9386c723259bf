"""data/tokenize.py: prompt masking, the trained EOS (also when pad == EOS), truncation and
dropped rows, slot efficiency on a hand-computed case, and packing that loses no token."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sft_job.data import build
from sft_job.data.formats import Example
from sft_job.data.tokenize import (
    IGNORE,
    _bfd_bins,
    eos_id,
    make_collator,
    pack,
    slot_efficiency,
    tokenize_all,
    tokenize_example,
)
from sft_job.errors import DataError, ModelError

PROMPT = "Instruction: Say hello to the user.\nOutput:"
RESPONSE = " Hello there, it is nice to meet you."


def ex(prompt: str = PROMPT, response: str = RESPONSE) -> Example:
    return Example([(prompt, False), (response, True)], prompt, "f.jsonl:1")


def first_trained(labels: list[int]) -> int:
    return next(i for i, lab in enumerate(labels) if lab != IGNORE)


@pytest.mark.parametrize("which", ["tok", "tok_pad_eos"])
def test_prompt_masked_response_and_eos_trained(which: str, request: pytest.FixtureRequest) -> None:
    t = request.getfixturevalue(which)
    ids, labels, raw = tokenize_example(ex(), t, 512)
    k = first_trained(labels)
    assert k > 0 and raw == len(ids) == len(labels)
    assert all(lab == IGNORE for lab in labels[:k])
    assert labels[k:] == ids[k:]  # every response token and the EOS are trained
    assert t.decode(ids[:k]) == PROMPT
    assert t.decode(ids[k:-1]) == RESPONSE
    assert ids[-1] == labels[-1] == t.eos_token_id
    assert ids.count(t.eos_token_id) == 1


def test_eos_already_in_text_is_not_doubled(tok: Any) -> None:
    ids, labels, _ = tokenize_example(ex(response=RESPONSE + tok.eos_token), tok, 512)
    assert ids.count(tok.eos_token_id) == 1
    assert ids[-1] == labels[-1] == tok.eos_token_id


def test_eos_after_a_masked_tail_is_masked(tok: Any) -> None:
    e = Example([("Trained part.", True), (" masked tail", False)], "", "f:1")
    ids, labels, _ = tokenize_example(e, tok, 512)
    assert ids[-1] == tok.eos_token_id and labels[-1] == IGNORE
    assert tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]) == "Trained part."


def test_pad_equal_to_eos_keeps_the_eos_label_after_collation(tok_pad_eos: Any) -> None:
    rows, _ = tokenize_all([ex(), ex(response=" Hi.")], tok_pad_eos, 512)
    eos = tok_pad_eos.eos_token_id
    batch = make_collator(tok_pad_eos.pad_token_id, packing=False, flatten=False)(rows)
    short = len(rows[1]["input_ids"])
    assert batch["labels"][1, short - 1].item() == eos  # the real EOS: trained
    assert (batch["labels"][1, short:] == IGNORE).all()  # the padding (same id): not trained
    assert (batch["input_ids"][1, short:] == eos).all()
    assert batch["labels"][0, -1].item() == eos


def test_train_on_prompt_trains_everything(spec_of: Callable, tok: Any) -> None:
    from sft_job.data.formats import to_example
    from sft_job.data.load import Record

    row = {"instruction": "Say hello.", "output": "Hello!"}
    e = to_example(Record(row, "f:1"), "alpaca", spec_of(train_on_prompt=True, template="native"),
                   tok)
    ids, labels, _ = tokenize_example(e, tok, 512)
    assert labels == ids and ids[-1] == tok.eos_token_id
    e = to_example(Record(row, "f:1"), "alpaca", spec_of(template="native"), tok)
    ids, labels, _ = tokenize_example(e, tok, 512)
    assert labels != ids and labels[0] == IGNORE


def test_truncation_counted(tok: Any) -> None:
    full, _, raw = tokenize_example(ex(), tok, 512)
    n_prompt = first_trained(tokenize_example(ex(), tok, 512)[1])
    max_len = n_prompt + 3
    rows, stats = tokenize_all([ex(), ex(prompt="Q:", response=" Hi.")], tok, max_len)
    assert stats.rows == 2 and stats.truncated == 1
    assert stats.raw_lengths[0] == raw > max_len
    assert rows[0]["input_ids"] == full[:max_len]
    assert rows[0]["labels"][-3:] == full[n_prompt:max_len]  # 3 response tokens left, no EOS
    assert stats.lengths[0] == max_len
    assert stats.trained_tokens == 3 + sum(1 for x in rows[1]["labels"] if x != IGNORE)


def test_row_whose_prompt_fills_max_length_is_dropped(tok: Any) -> None:
    n_prompt = first_trained(tokenize_example(ex(), tok, 512)[1])
    short = ex(prompt="Q:", response=" A.")
    rows, stats = tokenize_all([ex(), short], tok, n_prompt)
    assert stats.dropped_no_target == 1 and stats.truncated == 1
    assert len(rows) == 1 and rows[0]["input_ids"] == tokenize_example(short, tok, 512)[0]
    assert stats.lengths == [len(rows[0]["input_ids"])]


def test_build_counts_truncated_and_dropped(write_jsonl: Callable, spec_of: Callable, tok: Any,
                                            tmp_path: Path) -> None:
    long_prompt = "Please answer this question: " + "why is the sky blue? " * 20
    rows = [{"prompt": "Hi?", "response": "Hello."},
            {"prompt": "Short?", "response": "A long answer. " * 20},
            {"prompt": long_prompt, "response": "Light scattering."}]
    spec = spec_of(train=str(write_jsonl(rows)), max_length=40, packing=False)
    b = build(spec, tok, tmp_path)
    assert b.stats["dropped_prompt_too_long"] == 1
    assert b.stats["truncated"] == 2  # the long answer, and the dropped row
    assert b.stats["train_examples"] == 2 and len(b.train) == 2
    with pytest.raises(DataError, match=r"prompt fills data\.max_length"):
        build(spec_of(train=str(write_jsonl(rows[2:])), max_length=40), tok, tmp_path)


def test_tokenizer_without_eos_is_refused() -> None:
    with pytest.raises(ModelError, match="no EOS"):
        eos_id(SimpleNamespace(eos_token_id=None))


def test_slot_efficiency_hand_computed() -> None:
    lengths, bs, cap = [5, 4, 3], 2, 8
    # max: 12 useful tokens in 3 rows of 8 slots
    assert slot_efficiency(lengths, bs, cap, "max") == pytest.approx(12 / 24)
    # longest: batches [5, 4] -> 2 x 5 slots, [3] -> 1 x 3 slots
    assert slot_efficiency(lengths, bs, cap, "longest") == pytest.approx(12 / 13)
    # packed (best fit decreasing, cap 8): bins [5+3, 4] -> one batch of 2 rows x 8 slots
    assert _bfd_bins(lengths, cap) == [8, 4]
    assert slot_efficiency(lengths, bs, cap, "packed") == pytest.approx(12 / 16)
    assert slot_efficiency([], bs, cap, "packed") == 0.0


def test_bfd_bins_match_what_pack_does() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(1, 30) for _ in range(40)]
    rows = [{"input_ids": [7] * n, "labels": [7] * n} for n in lengths]
    packed = pack(rows, 32)
    assert sorted(len(r["input_ids"]) for r in packed) == sorted(_bfd_bins(lengths, 32))


def test_pack_keeps_every_token() -> None:
    rng = random.Random(0)
    rows = []
    for i in range(50):
        n = rng.randint(1, 24)
        ids = [rng.randrange(5, 1000) for _ in range(n)]
        cut = rng.randint(0, n - 1)
        rows.append({"input_ids": ids, "labels": [IGNORE] * cut + ids[cut:], "i": i})
    packed = pack([{k: r[k] for k in ("input_ids", "labels")} for r in rows], 32)
    assert len(packed) < len(rows)
    recovered = []
    for r in packed:
        assert len(r["input_ids"]) == len(r["labels"]) == sum(r["seq_lengths"]) <= 32
        pos = 0
        for n in r["seq_lengths"]:
            recovered.append((tuple(r["input_ids"][pos:pos + n]), tuple(r["labels"][pos:pos + n])))
            pos += n
    assert sorted(recovered) == sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in rows)


def test_pack_nothing() -> None:
    assert pack([], 32) == []
