"""The topics file of `data synth`: what to ask the model about, and the prompt it gets.

    topics:                      # strings, or {name, weight, vars}
      - Python interview questions for a junior backend developer
      - name: SQL query optimisation
        weight: 2                # gets twice the rows of a weight-1 topic
        vars: {level: senior}    # extra {placeholders} for the template
    system: You write precise, correct training data.   # optional system message
    template: |                  # optional; the default is DEFAULT_TEMPLATE
      ... {topic} ... {n} ... {level} ...

A bare YAML list of topics is accepted too. Template placeholders: {topic}, {n} (pairs asked
for), {i} (the request's number within its topic) and the topic's vars; other braces (JSON
examples) are left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sft_job.errors import SpecError

DEFAULT_TEMPLATE = """\
Write {n} different question-and-answer pairs for fine-tuning an assistant on this topic:
{topic}

Each question must stand on its own (no reference to other questions or to "the text above").
Each answer must be correct, complete and written as the assistant would reply to the user.
Vary the difficulty and the phrasing, and do not repeat a question.

Reply with JSON only, no prose and no code fences, in exactly this shape:
{"pairs": [{"question": "...", "answer": "..."}]}
"""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
BUILTIN_VARS = ("topic", "n", "i")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Topic(_Strict):
    name: str = Field(min_length=1, description="What the pairs are about; fills {topic}.")
    weight: float = Field(1.0, gt=0, description="Share of --n relative to the other topics.")
    vars: dict[str, str] = Field(default_factory=dict, description="Extra template values.")


class TopicsFile(_Strict):
    topics: list[str | Topic] = Field(min_length=1, description="The topics to generate.")
    system: str | None = Field(None, description="System message sent with every request.")
    template: str | None = Field(None, description="User prompt template (see module doc).")

    def topic_list(self) -> list[Topic]:
        return [Topic(name=t) if isinstance(t, str) else t for t in self.topics]


def load_topics(uri: str) -> TopicsFile:
    """Read and check a topics YAML file (path or bucket URI)."""
    import yaml

    from sft_job import storage
    from sft_job.uri import is_remote

    if is_remote(uri):
        text = storage.read_text(uri)
    else:
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise SpecError(f"--topics {uri}: no such file")
        text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{uri}: not valid YAML ({' '.join(str(e).split())})") from None
    if isinstance(doc, list):
        doc = {"topics": doc}
    try:
        tf = TopicsFile.model_validate(doc if doc is not None else {})
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                         for err in e.errors())
        raise SpecError(f"{uri}: {errs}") from None
    names = [t.name for t in tf.topic_list()]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SpecError(f"{uri}: topic names must be unique; repeated: {dups}")
    return tf


def check_template(template: str, topics: list[Topic], where: str) -> None:
    """Every placeholder must be known for every topic; {topic} must be used."""
    used = set(_PLACEHOLDER.findall(template))
    if "topic" not in used:
        raise SpecError(f"{where}: the prompt template must contain {{topic}}")
    for t in topics:
        unknown = sorted(used - set(BUILTIN_VARS) - set(t.vars))
        if unknown:
            raise SpecError(f"{where}: placeholders {unknown} have no value for topic "
                            f"'{t.name}' (add them to its vars)")


def render(template: str, topic: Topic, n: int, i: int) -> str:
    """The user prompt for request `i` of `topic`, asking for `n` pairs."""
    values = {**topic.vars, "topic": topic.name, "n": str(n), "i": str(i)}
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def quotas(topics: list[Topic], n: int) -> dict[str, int]:
    """Split `n` rows over topics by weight (largest remainder), in topic order."""
    total = sum(t.weight for t in topics)
    exact = [n * t.weight / total for t in topics]
    out = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(topics)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: n - sum(out)]:
        out[i] += 1
    return {t.name: q for t, q in zip(topics, out, strict=True)}


def fingerprint(topics: list[Topic], template: str, system: str | None, model: str) -> dict[str, Any]:
    """What makes two runs the same generation (a resumed run must match it)."""
    def h(x: Any) -> str:
        return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]

    # weights only move quotas, so they may change between runs; names and vars may not
    return {"model": model, "topics": h([[t.name, t.vars] for t in topics]),
            "template": h(template), "system": h(system)}
