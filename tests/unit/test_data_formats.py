"""data/formats.py and data/__init__.py: format detection, the exact prompt templates, chat
rendering and turn masking, malformed rows (fail vs skip), the train/eval split, build()."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sft_job.data import build, prepare, split
from sft_job.data.formats import Example, PlainChatML, detect, to_example
from sft_job.data.load import Record
from sft_job.data.tokenize import IGNORE, tokenize_example
from sft_job.errors import DataError
from sft_job.models.chat import CHATML_TEMPLATE

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
]
PR = [{"prompt": "What is the capital of France?", "response": "Paris. I hope that helps!"},
      {"prompt": "Thanks!", "response": "You are welcome."}]
CHAT = [{"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello! How can I help?"}]}]
MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is four."},
]


def example(row: dict, fmt: str, spec: Any, tok: Any) -> Example:
    return to_example(Record(row, "f.jsonl:1"), fmt, spec, tok)


def text_of(ex: Example) -> str:
    return "".join(t for t, _ in ex.segments)


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize(("rows", "kw", "fmt"), [
    (CHAT, {}, "chat"),
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}], {}, "chat"),
    ([{"dialog": [{"role": "user", "content": "a"}]}], {"messages_field": "dialog"}, "chat"),
    (ALPACA, {}, "alpaca"),
    ([{"instruction": "Say hi.", "output": "Hi."}], {}, "alpaca"),
    (PR, {}, "prompt-response"),
    ([{"question": "Q?", "answer": "A."}], {"prompt_field": "question", "response_field": "answer"},
     "prompt-response"),
    ([{"text": "Once upon a time."}], {}, "text"),
    ([{"body": "Once upon a time.", "id": 3}], {"text_field": "body"}, "text"),
])
def test_detect(rows: list[dict], kw: dict, fmt: str, spec_of: Callable) -> None:
    assert detect(rows, spec_of(**kw)) == fmt


def test_detect_takes_the_majority_of_the_first_rows(spec_of: Callable) -> None:
    rows = [{"instruction": "a", "output": "b"}] * 3 + [{"text": "only text"}]
    assert detect(rows, spec_of()) == "alpaca"


def test_detect_failure_lists_the_fields(spec_of: Callable) -> None:
    with pytest.raises(DataError, match=r"\['answer', 'question'\]"):
        detect([{"question": "Q?", "answer": "A."}], spec_of())


@pytest.mark.parametrize(("rows", "fmt"), [(ALPACA, "alpaca"), (PR, "prompt-response"),
                                           (CHAT, "chat"), ([{"text": "abc"}], "text")])
def test_prepare_auto_detects(rows: list[dict], fmt: str, write_jsonl: Callable,
                              spec_of: Callable, tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(rows)
    p = prepare(str(path), spec_of(), tok, tmp_path)
    assert p.format == fmt
    assert len(p.examples) == len(rows) and not p.malformed
    assert p.examples[0].source == f"{path}:1"


def test_named_format_that_does_not_match_the_data(write_jsonl: Callable, spec_of: Callable,
                                                   tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(ALPACA)
    with pytest.raises(DataError, match=r"data\.format is 'chat'.*is the format right"):
        prepare(str(path), spec_of(format="chat"), tok, tmp_path)


# ------------------------------------------------------------------ alpaca


def test_alpaca_seed_template_exact(spec_of: Callable, tok: Any) -> None:
    ex = example(ALPACA[0], "alpaca", spec_of(template="native"), tok)
    assert ex.segments == [("Instruction: Add the numbers.\nInput: 2 and 3\nOutput:", False),
                           (" 5", True)]
    assert text_of(ex) == "Instruction: Add the numbers.\nInput: 2 and 3\nOutput: 5"
    assert ex.prompt == "Instruction: Add the numbers.\nInput: 2 and 3\nOutput:"


@pytest.mark.parametrize("row", [ALPACA[1], {"instruction": "Name a color.", "output": "Blue."},
                                 {"instruction": "Name a color.", "input": "  ", "output": "Blue."}])
def test_alpaca_seed_template_without_input(row: dict, spec_of: Callable, tok: Any) -> None:
    ex = example(row, "alpaca", spec_of(template="native"), tok)
    assert text_of(ex) == "Instruction: Name a color.\nOutput: Blue."
    assert ex.prompt == "Instruction: Name a color.\nOutput:"


def test_alpaca_stanford_template_exact(spec_of: Callable, tok: Any) -> None:
    spec = spec_of(alpaca_template="stanford", template="native")
    ex = example(ALPACA[0], "alpaca", spec, tok)
    assert ex.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert ex.segments == [(ex.prompt, False), ("5", True)]
    ex = example(ALPACA[1], "alpaca", spec, tok)
    assert text_of(ex) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.")


# ------------------------------------------------------------------ prompt-response


def test_prompt_response_role_tokens(spec_of: Callable, tok: Any) -> None:
    ex = example(PR[0], "prompt-response", spec_of(template="native"), tok)
    assert ex.segments == [("<|user|>\nWhat is the capital of France?\n<|assistant|>\n", False),
                           ("Paris. I hope that helps!", True)]
    assert ex.prompt == "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"


def test_prompt_response_custom_fields_and_tokens(spec_of: Callable, tok: Any) -> None:
    spec = spec_of(prompt_field="question", response_field="answer",
                   user_token="### Human:", assistant_token="### Assistant:", template="native")
    ex = example({"question": " Why? ", "answer": " Because. \n"}, "prompt-response", spec, tok)
    assert text_of(ex) == "### Human:\nWhy?\n### Assistant:\nBecause."
    assert ex.segments[-1] == ("Because.", True)


def test_text_format_trains_everything(spec_of: Callable, tok: Any) -> None:
    ex = example({"text": "Once upon a time."}, "text", spec_of(), tok)
    assert ex.segments == [("Once upon a time.", True)] and ex.prompt == ""


# ------------------------------------------------------------------ chat


def test_chat_rendered_with_the_tokenizers_template(spec_of: Callable, tok: Any) -> None:
    ex = example({"messages": MULTI}, "chat", spec_of(), tok)
    # the template's rendering up to the last reply's end-of-turn token (its newline after
    # that token is never generated, so it is not part of the sample)
    assert text_of(ex) + "\n" == tok.apply_chat_template(MULTI, tokenize=False)
    assert text_of(ex).endswith("It is four.<|im_end|>") and ex.ends_with_stop
    assert ex.prompt == tok.apply_chat_template(MULTI[:-1], tokenize=False, add_generation_prompt=True)


def _runs(ids: list[int], labels: list[int], trained: bool) -> list[list[int]]:
    runs: list[list[int]] = []
    prev = None
    for i, lab in zip(ids, labels, strict=True):
        is_trained = lab != IGNORE
        if is_trained == trained:
            if prev != trained:
                runs.append([])
            runs[-1].append(i)
        prev = is_trained
    return runs


def test_multi_turn_chat_trains_every_assistant_turn_only(spec_of: Callable, tok: Any) -> None:
    ex = example({"messages": MULTI}, "chat", spec_of(), tok)
    ids, labels, _ = tokenize_example(ex, tok, 512)
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True))
    trained = [tok.decode(r) for r in _runs(ids, labels, True)]
    # exactly each reply and the end-of-turn token that ends it: nothing after it, no extra EOS
    assert trained == ["Hello! How can I help?<|im_end|>", "It is four.<|im_end|>"]
    masked = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == IGNORE])
    for m in MULTI:
        assert (m["content"] in masked) == (m["role"] != "assistant"), m
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == labels[-1] == im_end  # the model learns to stop where the template does
    assert tok.eos_token_id not in ids


def test_chat_train_on_prompt(spec_of: Callable, tok: Any) -> None:
    ex = example({"messages": MULTI}, "chat", spec_of(train_on_prompt=True), tok)
    ids, labels, _ = tokenize_example(ex, tok, 512)
    assert labels == ids


def test_sharegpt_conversations(spec_of: Callable, tok: Any) -> None:
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    ex = example(row, "chat", spec_of(), tok)
    assert text_of(ex) + "\n" == tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], tokenize=False)


def test_chat_template_that_rewrites_earlier_turns_trains_the_last(
        spec_of: Callable, tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    # Earlier assistant turns are abbreviated (as reasoning templates drop old thoughts):
    # rendering is not prefix-stable, so only the last assistant turn can be trained.
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ 'assistant: ...\n' }}{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    ex = example({"messages": MULTI}, "chat", spec_of(), t)
    assert [s for s, trained in ex.segments if trained] == ["It is four.\n"]
    assert text_of(ex) == t.apply_chat_template(MULTI, tokenize=False)


def test_chatml_when_the_tokenizer_has_none(tiny_llama_dir: Path, tmp_path: Path,
                                            spec_of: Callable) -> None:
    from transformers import AutoTokenizer

    from sft_job.models.load import load_tokenizer
    from sft_job.spec import ModelSpec

    t = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    t.chat_template = None
    t.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    loaded = load_tokenizer(ModelSpec(base=str(tmp_path)), tmp_path, need_chat_template=True)
    assert loaded.chat_template == CHATML_TEMPLATE
    ex = example(CHAT[0], "chat", spec_of(), loaded)
    assert text_of(ex) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                           "Hello! How can I help?<|im_end|>")
    assert [s for s, trained in ex.segments if trained] == ["Hello! How can I help?<|im_end|>"]


@pytest.mark.parametrize("gen", [False, True])
def test_plain_chatml_renders_exactly_like_the_jinja_template(gen: bool, spec_of: Callable) -> None:
    """The tokenizer-free stand-in (preflight, `data convert`) must agree with the template that
    training uses, or a row could pass the cheap check and fail the real one."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    jinja = _compile_jinja_template(CHATML_TEMPLATE)  # what apply_chat_template renders with
    assert PlainChatML().apply_chat_template(MULTI, add_generation_prompt=gen) == jinja.render(
        messages=MULTI, add_generation_prompt=gen)
    # to_example passes chat_template= to every tokenizer, the stand-in included
    ex = example({"messages": MULTI}, "chat", spec_of(), PlainChatML())
    assert [s for s, trained in ex.segments if trained] == ["Hello! How can I help?<|im_end|>",
                                                           "It is four.<|im_end|>"]


def test_prepare_chat_with_tokenizer_without_template_uses_chatml(
        write_jsonl: Callable, spec_of: Callable, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))  # preparing gives it ChatML
    tok.chat_template = None
    p = prepare(str(write_jsonl(CHAT)), spec_of(format="chat"), tok, tmp_path)
    assert tok.chat_template
    assert text_of(p.examples[0]) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                                      "Hello! How can I help?<|im_end|>")


@pytest.mark.parametrize(("messages", "needle"), [
    ([], "non-empty list"),
    ([{"role": "user", "content": "Hi"}], "last message must be from the assistant"),
    ([{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}], "messages[1].content"),
    (["Hi", "Hello"], "messages[0] must be an object"),
])
def test_malformed_chat_rows(messages: list, needle: str, write_jsonl: Callable,
                             spec_of: Callable, tok: Any, tmp_path: Path) -> None:
    path = write_jsonl([CHAT[0], {"messages": messages}])
    with pytest.raises(DataError) as ei:
        prepare(str(path), spec_of(format="chat"), tok, tmp_path)
    assert f"{path}:2: " in str(ei.value) and needle in str(ei.value)


# ------------------------------------------------------------------ malformed rows

BAD_LINES = [
    json.dumps(ALPACA[0]),
    '{"instruction": "broken", ',                      # line 2: bad JSON
    json.dumps({"instruction": "No output here."}),    # line 3: missing output
    json.dumps({"instruction": "Empty.", "output": " "}),  # line 4: empty output
    json.dumps(ALPACA[1]),
]


def test_on_malformed_fail_names_file_and_line(write_jsonl: Callable, spec_of: Callable,
                                               tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(BAD_LINES)
    with pytest.raises(DataError) as ei:
        prepare(str(path), spec_of(format="alpaca"), tok, tmp_path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:2: invalid JSON")
    assert "(and 2 more)" in msg and "on_malformed: skip" in msg
    assert ei.value.exit_code == 2


def test_missing_field_names_file_line_and_field(write_jsonl: Callable, spec_of: Callable,
                                                 tok: Any, tmp_path: Path) -> None:
    path = write_jsonl([BAD_LINES[0], BAD_LINES[2]])
    with pytest.raises(DataError, match="missing field 'output'") as ei:
        prepare(str(path), spec_of(format="alpaca"), tok, tmp_path)
    assert str(ei.value).startswith(f"{path}:2: ")


def test_auto_format_with_a_row_missing_a_field_is_skipped(
        write_jsonl: Callable, spec_of: Callable, tok: Any, tmp_path: Path) -> None:
    path = write_jsonl([ALPACA[0], BAD_LINES[2], ALPACA[1]])
    p = prepare(str(path), spec_of(on_malformed="skip"), tok, tmp_path)
    assert p.format == "alpaca"
    assert [m.source for m in p.malformed] == [f"{path}:2"]


def test_on_malformed_skip_counts(write_jsonl: Callable, spec_of: Callable, tok: Any,
                                  tmp_path: Path) -> None:
    path = write_jsonl(BAD_LINES)
    p = prepare(str(path), spec_of(format="alpaca", on_malformed="skip"), tok, tmp_path)
    assert [e.source for e in p.examples] == [f"{path}:1", f"{path}:5"]
    assert [m.source for m in p.malformed] == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert p.empty_responses == 1


def test_skip_with_nothing_left_fails(write_jsonl: Callable, spec_of: Callable, tok: Any,
                                      tmp_path: Path) -> None:
    path = write_jsonl(BAD_LINES[1:4])
    with pytest.raises(DataError, match="no usable rows"):
        prepare(str(path), spec_of(format="alpaca", on_malformed="skip"), tok, tmp_path)


def test_duplicates_counted(write_jsonl: Callable, spec_of: Callable, tok: Any,
                            tmp_path: Path) -> None:
    p = prepare(str(write_jsonl([*PR, PR[0], PR[0]])), spec_of(), tok, tmp_path)
    assert p.duplicates == 2 and len(p.examples) == 4


# ------------------------------------------------------------------ split and build


def _examples(n: int) -> list[Example]:
    return [Example([(f"row {i}", True)], "", f"f:{i + 1}") for i in range(n)]


def test_split_by_fraction_is_deterministic_by_seed() -> None:
    ex = _examples(40)
    train, ev = split(ex, 0.25, seed=7)
    assert len(ev) == 10 and len(train) == 30
    assert {e.source for e in train} | {e.source for e in ev} == {e.source for e in ex}
    assert not {e.source for e in train} & {e.source for e in ev}
    assert [e.source for e in train] == [e.source for e in ex if e not in ev]  # order kept
    again_train, again_ev = split(_examples(40), 0.25, seed=7)
    assert [e.source for e in again_ev] == [e.source for e in ev]
    assert [e.source for e in again_train] == [e.source for e in train]
    assert {e.source for e in split(ex, 0.25, seed=8)[1]} != {e.source for e in ev}


def test_split_edges() -> None:
    ex = _examples(5)
    assert split(ex, 0.0, seed=1) == (ex, [])
    assert len(split(ex, 0.01, seed=1)[1]) == 1  # at least one eval row
    with pytest.raises(DataError, match="leaves no training rows"):
        split(_examples(1), 0.3, seed=1)


def test_build_with_fraction(write_jsonl: Callable, spec_of: Callable, tok: Any,
                             tmp_path: Path) -> None:
    rows = [{"prompt": f"Question number {i}?", "response": f"Answer {i}."} for i in range(20)]
    path = write_jsonl(rows)
    spec = spec_of(train=str(path), eval_fraction=0.2, packing=False, max_length=64)
    b = build(spec, tok, tmp_path)
    assert b.format == "prompt-response"
    assert len(b.train_examples) == 16 and len(b.eval_examples) == 4
    assert len(b.train) == 16 and len(b.eval) == 4
    assert b.stats["train_examples"] == 16 and b.stats["eval_examples"] == 4
    assert b.stats["malformed"] == 0 and b.files == [path]
    b2 = build(spec, tok, tmp_path)
    assert [e.source for e in b2.eval_examples] == [e.source for e in b.eval_examples]


def test_build_with_separate_eval_file(write_jsonl: Callable, spec_of: Callable, tok: Any,
                                       tmp_path: Path) -> None:
    train = write_jsonl(ALPACA * 3, "train.jsonl")
    ev = write_jsonl([{"instruction": "Say yes.", "output": "Yes."}], "eval.jsonl")
    b = build(spec_of(train=str(train), eval=str(ev), packing=False, template="native"), tok,
              tmp_path)
    assert len(b.train_examples) == 6
    assert [e.source for e in b.eval_examples] == [f"{ev}:1"]
    assert b.eval_examples[0].prompt == "Instruction: Say yes.\nOutput:"
    assert b.files == [train, ev]


def test_eval_file_is_read_in_the_train_format(write_jsonl: Callable, spec_of: Callable,
                                               tok: Any, tmp_path: Path) -> None:
    train = write_jsonl(ALPACA, "train.jsonl")
    ev = write_jsonl([{"text": "plain text"}], "eval.jsonl")
    with pytest.raises(DataError, match="missing field 'instruction'") as ei:
        build(spec_of(train=str(train), eval=str(ev)), tok, tmp_path)
    assert f"{ev}:1" in str(ei.value)


def test_build_packed_rows_and_malformed_count(write_jsonl: Callable, spec_of: Callable,
                                               tok: Any, tmp_path: Path) -> None:
    path = write_jsonl([*PR * 4, '{"prompt": oops}'])
    b = build(spec_of(train=str(path), on_malformed="skip", max_length=128), tok, tmp_path)
    assert b.stats["malformed"] == 1
    assert len(b.train) < 8 and all("seq_lengths" in r for r in b.train)
    assert sum(len(r["seq_lengths"]) for r in b.train) == 8
    assert b.stats["train_rows_batched"] == len(b.train)
