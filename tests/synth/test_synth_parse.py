"""parse.extract on the shapes chat models really return: every pair found, every reject counted."""

from __future__ import annotations

import json

import pytest

from sft_job.synth.parse import Pair, extract

QA = [{"question": "What is a Python generator?", "answer": "A function that yields values lazily."},
      {"question": "What does GIL stand for?", "answer": "Global Interpreter Lock."}]
PAIRS = [Pair(d["question"], d["answer"]) for d in QA]


@pytest.mark.parametrize("text", [
    json.dumps(QA),
    json.dumps({"pairs": QA}),
    json.dumps({"data": {"items": QA}}),
    "Here you go:\n```json\n" + json.dumps({"examples": QA}, indent=2) + "\n```\nEnjoy!",
    "```\n" + json.dumps(QA) + "\n```",
    "Sure! Below are the pairs.\n" + json.dumps(QA) + "\nLet me know if you need more [1].",
    "\n".join(json.dumps(d) for d in QA),  # one object a line
    str(QA),  # a Python literal with single quotes
    json.dumps(QA, indent=1)[:-2] + ",\n]",  # trailing comma
    json.dumps({"1": QA[0], "2": QA[1]}),  # numbered objects
], ids=["list", "pairs", "nested", "fenced-prose", "fence-no-lang", "prose", "jsonl", "python",
        "trailing-comma", "numbered"])
def test_shapes_give_the_same_pairs(text: str) -> None:
    got = extract(text)
    assert got.pairs == PAIRS
    assert not got.rejects


@pytest.mark.parametrize(("row", "pair"), [
    ({"prompt": "p text", "response": "r text"}, Pair("p text", "r text")),
    ({"instruction": "Translate", "input": "hola", "output": "hello"}, Pair("Translate", "hello", "hola")),
    ({"Question ": " spaced ", "ANSWER": "caps"}, Pair("spaced", "caps")),
    ({"q": "short q", "a": 42}, Pair("short q", "42")),
    ({"input": "only input", "output": "out"}, Pair("only input", "out")),
    ({"user": "u", "assistant": "a"}, Pair("u", "a")),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}]}, Pair("u", "a")),
    ({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}, Pair("u", "a")),
])
def test_key_names(row: dict, pair: Pair) -> None:
    got = extract(json.dumps([row]))
    assert got.pairs == [pair]


@pytest.mark.parametrize(("text", "reason"), [
    ("", "empty_response"),
    ("   \n", "empty_response"),
    ("I cannot help with that.", "invalid_json"),
    ('{pairs: [question: "broken"', "invalid_json"),
    ('{"error": "no"}', "no_rows"),
    ('{"pairs": []}', "no_rows"),
    ('["a string"]', "not_an_object"),
    ('[{"question": "q only"}]', "missing_field"),
    ('[{"title": "x", "body": "y"}]', "missing_field"),
    ('[{"question": "", "answer": "a"}]', "empty_field"),
    ('[{"question": "q", "answer": "   "}]', "empty_field"),
    ('[{"question": "q", "answer": ["a", "b"]}]', "not_text"),
    ('[{"question": "q", "answer": true}]', "not_text"),
    ('[{"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},'
     ' {"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}]}]', "multi_turn"),
])
def test_rejects_are_counted(text: str, reason: str) -> None:
    got = extract(text)
    assert got.pairs == []
    assert dict(got.rejects) == {reason: 1}


def test_truncated_answer_keeps_complete_objects() -> None:
    full = json.dumps({"pairs": [*QA, {"question": "Third?", "answer": "cut off here"}]})
    got = extract(full[:-30])
    assert got.pairs == PAIRS
    assert dict(got.rejects) == {"partial_json": 1}


def test_mixed_rows_count_each_reject() -> None:
    rows = [*QA, {"question": "no answer"}, "junk", {"question": "q", "answer": ""}]
    got = extract("Result:\n```json\n" + json.dumps(rows) + "\n```")
    assert got.pairs == PAIRS
    assert dict(got.rejects) == {"missing_field": 1, "not_an_object": 1, "empty_field": 1}


def test_two_fenced_blocks_are_both_read() -> None:
    text = f"First:\n```json\n{json.dumps(QA[:1])}\n```\nSecond:\n```json\n{json.dumps(QA[1:])}\n```"
    assert extract(text).pairs == PAIRS


def test_braces_in_prose_are_not_partial_json() -> None:
    text = "Use {curly} braces like this: " + json.dumps(QA)
    got = extract(text)
    assert got.pairs == PAIRS
    assert not got.rejects
