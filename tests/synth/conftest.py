"""Synth test fixtures: a scripted messy model (what real endpoints return) and its expected
output, plus helpers to build configs and read outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sft_job.synth.client import ClientSettings
from sft_job.synth.dedup import normalize
from sft_job.synth.run import SynthConfig
from sft_job.synth.topics import Topic
from tests.synth.fake_openai import TEMPLATE, Reply

QUESTIONS = {
    "P": ["What is a Python generator and when should you use one?",
          "How do decorators work in Python?",
          "Explain what a context manager does in a with statement.",
          "Rewrite the following snippet in idiomatic Python.",
          "Why does CPython have a global interpreter lock?",
          "What are dataclasses good for?",
          "How do you profile slow Python code?",
          "When would you pick a tuple over a list?",
          "What does the walrus operator do?",
          "How are exceptions chained with raise ... from?",
          "What is the purpose of __slots__ on a class?",
          "How does asyncio schedule coroutines?",
          "Which tools check Python type hints?",
          "How do virtual environments isolate dependencies?"],
    "S": ["How does an index speed up a SELECT query?",
          "What is the difference between INNER JOIN and LEFT JOIN?",
          "When should you denormalise a schema?",
          "What does EXPLAIN ANALYZE show in PostgreSQL?",
          "How do transactions guarantee atomicity?"],
}


def q(n: int, prefix: str = "P") -> str:
    return QUESTIONS[prefix][n - 1]


def a(n: int, prefix: str = "P") -> str:
    return f"A clear, correct answer about: {q(n, prefix).lower()} It explains the idea step by step."


def qa(n: int, prefix: str = "P") -> dict[str, str]:
    return {"question": q(n, prefix), "answer": a(n, prefix)}


NEAR_DUP_OF_3 = "Please explain what a context manager does in a with statement."

# Ten answers for topic "python" and four for "sql", as models really return them.
PY = [
    # 0: fenced block with prose around, an object holding the list
    "Sure! Here are two pairs:\n```json\n" + json.dumps({"pairs": [qa(1), qa(2)]}, indent=2)
    + "\n```\nLet me know if you want more.",
    # 1: bare list in prose, prompt/response and instruction/input/output keys
    "Here you go: " + json.dumps([{"prompt": q(3), "response": a(3)},
                                  {"instruction": q(4), "input": "some context for four",
                                   "output": a(4)}]) + " Hope this helps!",
    # 2: invalid JSON
    'Sure! {pairs: [question: "broken, no closing',
    # 3: empty answers and a missing answer
    json.dumps([{"question": q(5), "answer": ""}, {"question": "", "answer": a(5)},
                {"question": q(6)}]),
    # 4: duplicates (exact, after normalisation) and a near-duplicate, nested two levels deep
    json.dumps({"data": {"items": [
        {"Question": q(1), "Answer": "A different answer to the same question, still long."},
        {"q": q(2).upper().replace("?", " ??"), "a": "Another different answer, long enough."},
        {"question": NEAR_DUP_OF_3, "answer": a(3)},
        qa(7)]}}),
    # 5: nothing at all
    "",
    # 6: one object in a fence without a language
    "```\n" + json.dumps(qa(8)) + "\n```",
    # 7: one object a line
    json.dumps(qa(9)) + "\n" + json.dumps(qa(10)),
    # 8: cut off by the token limit: the complete object is kept
    json.dumps({"pairs": [qa(11), {"question": q(12), "answer": "cut off"}]})[:-25],
    # 9: a Python literal: too short, not text, fine
    str([{"question": "Hi?", "answer": "Hello there, friend."},
         {"question": q(13), "answer": ["a", "list"]}, qa(14)]),
]
SQL = [
    # 0: chat-shaped rows (OpenAI messages and ShareGPT)
    json.dumps({"examples": [
        {"messages": [{"role": "user", "content": q(1, "S")}, {"role": "assistant", "content": a(1, "S")}]},
        {"conversations": [{"from": "human", "value": q(2, "S")}, {"from": "gpt", "value": a(2, "S")}]}]}),
    # 1: throttled, then a server error, then a good answer (see script())
    None,
    # 2: a multi-turn chat (rejected) and user/assistant keys
    json.dumps([{"messages": [{"role": r, "content": c * 20} for r, c in
                              [("user", "x"), ("assistant", "y"), ("user", "z"), ("assistant", "w")]]},
                {"user": q(4, "S"), "assistant": a(4, "S")}]),
    # 3: a duplicate of a python row (across topics) and a non-object item
    json.dumps(["just a string", qa(7), qa(5, "S")]),
]


def script(retry_after: str = "0") -> dict[tuple[str, int], Any]:
    """The scripted answers by (topic, i); ("sql", 1) is throttled with this Retry-After."""
    out: dict[tuple[str, int], Any] = {("python", i): c for i, c in enumerate(PY)}
    out.update({("sql", i): c for i, c in enumerate(SQL)})
    out[("python", 8)] = Reply(PY[8], finish_reason="length")
    out[("sql", 1)] = [Reply(status=429, headers={"Retry-After": retry_after}), Reply(status=500),
                       Reply(json.dumps([qa(3, "S")]))]
    return out


SCRIPT = script()

# What a correct run keeps (by prompt), and the rejects it counts.
EXPECTED_PROMPTS = {q(i) for i in (1, 2, 3, 7, 8, 9, 10, 11, 14)} | {q(4) + "\n\nsome context for four"} \
    | {q(i, "S") for i in (1, 2, 3, 4, 5)}
EXPECTED_REJECTS = {"invalid_json": 1, "empty_field": 2, "missing_field": 1, "duplicate": 3,
                    "near_duplicate": 1, "empty_response": 1, "partial_json": 1, "too_short": 1,
                    "not_text": 1, "multi_turn": 1, "not_an_object": 1}
# weights 10:4 with n=140 and max_requests=14 give each topic exactly its scripted requests
TOPICS_YAML = "topics:\n  - {name: python, weight: 10}\n  - {name: sql, weight: 4}\n"
N, MAX_REQUESTS = 140, 14


def group(prompt: str) -> str:
    """Which expected prompt a kept prompt stands for: with requests in parallel, the duplicate
    or the near-duplicate may arrive first and be the one kept."""
    return normalize(q(3) if prompt == NEAR_DUP_OF_3 else prompt)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompts_of(rows: list[dict[str, Any]], fmt: str = "prompt-response") -> list[str]:
    if fmt == "chat":
        return [r["messages"][0]["content"] for r in rows]
    if fmt == "alpaca":
        return [r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "") for r in rows]
    return [r["prompt"] for r in rows]


@pytest.fixture
def topics_file(tmp_path: Path) -> Path:
    p = tmp_path / "topics.yaml"
    p.write_text(TOPICS_YAML)
    return p


def make_cfg(url: str, out: str, tmp_path: Path, **kw: Any) -> SynthConfig:
    """A config for the scripted run; keyword arguments override fields (client_* for the client)."""
    client = {k.removeprefix("client_"): kw.pop(k) for k in list(kw) if k.startswith("client_")}
    settings = ClientSettings(**{"base_url": url, "model": "fake-model", "api_key": "test-key",
                                 "backoff_base": 0.01, **client})
    base: dict[str, Any] = dict(out=out, n=N, topics=[Topic(name="python", weight=10),
                                                      Topic(name="sql", weight=4)],
                                client=settings, format="prompt-response", template=TEMPLATE,
                                max_requests=MAX_REQUESTS, concurrency=4, workdir=tmp_path / "work")
    base.update(kw)
    return SynthConfig(**base)
