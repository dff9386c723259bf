"""The topics file: the shipped example loads, quotas add up, template mistakes are caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_job.errors import SpecError
from sft_job.synth.topics import DEFAULT_TEMPLATE, Topic, check_template, load_topics, quotas, render
from tests.conftest import REPO


def test_example_topics_file_is_valid() -> None:
    tf = load_topics(str(REPO / "jobs" / "synth" / "topics.yaml"))
    topics = tf.topic_list()
    assert len(topics) == 5 and tf.system and tf.template
    check_template(tf.template, topics, "example")
    text = render(tf.template, topics[0], 5, 3)
    assert "Write 5 different" in text and "mid-level backend" in text
    assert '{"pairs": [{"question": "...", "answer": "..."}]}' in text
    q = quotas(topics, 500)
    assert sum(q.values()) == 500 and q[topics[0].name] == 143  # weight 2 of 7


def test_default_template_asks_for_json() -> None:
    check_template(DEFAULT_TEMPLATE, [Topic(name="x")], "default")
    assert "JSON" in DEFAULT_TEMPLATE  # OpenAI's JSON mode refuses prompts without the word


@pytest.mark.parametrize(("n", "weights", "want"), [
    (10, [1, 1, 1], [4, 3, 3]), (2, [1, 1, 1], [1, 1, 0]), (7, [5, 2], [5, 2]), (1, [1], [1])])
def test_quotas(n: int, weights: list[float], want: list[int]) -> None:
    topics = [Topic(name=f"t{i}", weight=w) for i, w in enumerate(weights)]
    assert list(quotas(topics, n).values()) == want


def test_template_errors() -> None:
    with pytest.raises(SpecError, match=r"must contain \{topic\}"):
        check_template("Write {n} pairs as JSON", [Topic(name="a")], "t")
    with pytest.raises(SpecError, match=r"\['level'\] have no value for topic 'b'"):
        check_template("{topic} {level}", [Topic(name="a", vars={"level": "x"}), Topic(name="b")], "t")


@pytest.mark.parametrize(("text", "match"), [
    ("topics: []", "topics: List should have at least 1 item"),
    ("topics: [{name: a, wieght: 2}]", "wieght: Extra inputs are not permitted"),
    ("topics: [a, a]", r"repeated: \['a'\]"),
    ("topics: [a\n", "not valid YAML"),
    ("- just\n- a list\n", None),
])
def test_topics_file_errors(tmp_path: Path, text: str, match: str | None) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(text)
    if match is None:
        assert [t.name for t in load_topics(str(p)).topic_list()] == ["just", "a list"]
    else:
        with pytest.raises(SpecError, match=match):
            load_topics(str(p))
