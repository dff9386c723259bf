"""Turn what chat models actually return into instruction/response pairs, counting every reject.

Models asked for JSON answer with bare JSON, JSON in ```json fences, JSON with prose around it,
a list or an object holding a list (`{"pairs": [...]}`, `{"data": {"items": [...]}}`), one
object per line, Python-style literals, trailing commas, or JSON cut off by the token limit.
`extract` finds every JSON value in the text, walks it down to objects, and maps their keys
(question/answer, prompt/response, instruction/input/output, user/assistant messages...) to a
`Pair`. Nothing is dropped silently: each response or row that yields no pair adds one count
under a reason (see REASONS).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# Reasons a whole response or one row is rejected, for the stats line.
REASONS = {
    "empty_response": "the model answered nothing",
    "invalid_json": "no parseable JSON in the answer",
    "partial_json": "JSON was cut off or broken; the complete objects in it were kept",
    "no_rows": "valid JSON that holds no question/answer objects",
    "not_an_object": "a list item that is not an object",
    "missing_field": "an object without a recognised question or answer key",
    "empty_field": "an empty question or answer",
    "not_text": "a question or answer that is not a string",
    "multi_turn": "a conversation with more than one exchange",
}

PROMPT_KEYS = ("instruction", "question", "prompt", "query", "q", "user", "human", "problem",
               "task", "request")
RESPONSE_KEYS = ("output", "answer", "response", "completion", "a", "assistant", "gpt",
                 "solution", "reply", "ans")
CONTEXT_KEYS = ("input", "context")
MESSAGE_KEYS = ("messages", "conversations", "conversation", "dialogue")
_MAX_DEPTH = 4
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_VALUE_START = re.compile(r"[\[{]")
_JSONISH_START = re.compile(r"[\[{]\s*[\"'{\[]")  # where a failed decode means broken JSON


@dataclass(frozen=True)
class Pair:
    """One training example in neutral form: prompt (+ optional context input) and response."""

    prompt: str
    response: str
    input: str = ""

    def to_json(self) -> dict[str, str]:
        out = {"prompt": self.prompt, "response": self.response}
        if self.input:
            out["input"] = self.input
        return out

    @classmethod
    def from_json(cls, d: dict[str, str]) -> Pair:
        return cls(d["prompt"], d["response"], d.get("input", ""))


@dataclass
class Parsed:
    """The pairs found in one answer and the count of rejects by reason."""

    pairs: list[Pair] = field(default_factory=list)
    rejects: Counter[str] = field(default_factory=Counter)


def extract(content: str | None) -> Parsed:
    """Every usable pair in a model answer, plus reject counts (see module docstring)."""
    out = Parsed()
    if content is None or not content.strip():
        out.rejects["empty_response"] += 1
        return out
    values, partial = _json_values(content)
    if not values:
        out.rejects["invalid_json"] += 1
        return out
    if partial:
        out.rejects["partial_json"] += 1
    items: list[Any] = []
    for v in values:
        items.extend(_items(v, 0))
    if not items:
        out.rejects["no_rows"] += 1
    for item in items:
        pair = to_pair(item)
        if isinstance(pair, Pair):
            out.pairs.append(pair)
        else:
            out.rejects[pair] += 1
    return out


def _json_values(text: str) -> tuple[list[Any], bool]:
    """JSON values in `text`: the whole text, else every fenced block, else a scan for values.
    The flag says some JSON-looking text could not be parsed (truncated or broken)."""
    whole = _loads(text.strip())
    if whole is not _NONE:
        return [whole], False
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "json", "jsonl")]
    values: list[Any] = []
    partial = False
    for body in blocks:
        v = _loads(body.strip())
        if v is not _NONE:
            values.append(v)
        else:
            found, _ = _scan(body)
            values.extend(found)
            partial = True
    if values:
        return values, partial
    return _scan(text)


_NONE = object()


def _loads(text: str) -> Any:
    """json.loads with two lenient retries (trailing commas, Python literals); _NONE if all fail."""
    if not text or text[0] not in "[{":
        return _NONE
    for attempt in (text, _TRAILING_COMMA.sub(r"\1", text)):
        try:
            return json.loads(attempt)
        except json.JSONDecodeError:
            pass
    try:  # single-quoted dicts ({'question': ...}); literal_eval only builds literals
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return _NONE
    return v if isinstance(v, (list, dict)) else _NONE


def _scan(text: str) -> tuple[list[Any], bool]:
    """Decode JSON values wherever an object or array starts; skip what each one covers.
    Inner objects of a truncated list are recovered; the flag says something failed."""
    dec = json.JSONDecoder()
    values: list[Any] = []
    failed = False
    i = 0
    while True:
        m = _VALUE_START.search(text, i)
        if not m:
            return values, failed and bool(values)
        try:
            v, end = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            failed = failed or bool(_JSONISH_START.match(text, m.start()))
            i = m.start() + 1
            continue
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
            values.append(v)  # a bare [1] or ["a"] in prose is not data
        i = end


def _items(value: Any, depth: int) -> list[Any]:
    """The row candidates inside a JSON value: list items, a row object itself, or the list
    held by an object (`{"pairs": [...]}`), searched a few levels deep."""
    if isinstance(value, list):
        if depth < _MAX_DEPTH and value and all(isinstance(v, list) for v in value):
            return [x for v in value for x in _items(v, depth + 1)]
        return value
    if not isinstance(value, dict) or depth >= _MAX_DEPTH:
        return []
    if _looks_like_row(value):
        return [value]
    found: list[Any] = []
    for v in value.values():
        if isinstance(v, (list, dict)):
            found.extend(_items(v, depth + 1))
    return found


def _looks_like_row(d: dict[str, Any]) -> bool:
    keys = {_norm_key(k) for k in d}
    return bool(keys & set(PROMPT_KEYS + RESPONSE_KEYS + MESSAGE_KEYS + CONTEXT_KEYS))


def _norm_key(k: Any) -> str:
    return str(k).strip().lower().replace(" ", "_")


def to_pair(item: Any) -> Pair | str:
    """A Pair from one object, or the reject reason."""
    if not isinstance(item, dict):
        return "not_an_object"
    row = {_norm_key(k): v for k, v in item.items()}
    for key in MESSAGE_KEYS:
        if isinstance(row.get(key), list):
            return _from_messages(row[key])
    prompt_key = next((k for k in PROMPT_KEYS if k in row), None)
    response_key = next((k for k in RESPONSE_KEYS if k in row), None)
    context_key = next((k for k in CONTEXT_KEYS if k in row), None)
    if prompt_key is None and context_key == "input":  # {"input": q, "output": a}
        prompt_key, context_key = "input", None
    if prompt_key is None or response_key is None:
        return "missing_field"
    prompt, response = _text(row[prompt_key]), _text(row[response_key])
    context = _text(row[context_key]) if context_key else ""
    for v in (prompt, response, context):
        if isinstance(v, Reject):
            return v.reason
    if not prompt or not response:
        return "empty_field"
    return Pair(prompt, response, context)


@dataclass(frozen=True)
class Reject:
    reason: str


def _text(v: Any) -> str | Reject:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return Reject("not_text")
    return str(v).strip()


def _from_messages(msgs: list[Any]) -> Pair | str:
    turns = []
    for m in msgs:
        if not isinstance(m, dict):
            return "not_an_object"
        m = {_norm_key(k): v for k, v in m.items()}
        role = str(m.get("role", m.get("from", ""))).lower()
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role == "system":
            continue
        text = _text(m.get("content", m.get("value")))
        if isinstance(text, Reject):
            return text.reason
        turns.append((role, text))
    if len(turns) > 2:
        return "multi_turn"
    if [r for r, _ in turns] != ["user", "assistant"]:
        return "missing_field"
    if not turns[0][1] or not turns[1][1]:
        return "empty_field"
    return Pair(turns[0][1], turns[1][1])
