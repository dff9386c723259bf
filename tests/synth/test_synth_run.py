"""`synthesize` against the fake endpoint: the exact valid de-duplicated set, rejects by
reason, retries, JSON-mode fallback, error classes, and resuming without duplicates."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sft_job.data import formats, load
from sft_job.errors import AccessError, SpecError, TransientError
from sft_job.spec import DataSpec
from sft_job.synth.journal import SUFFIX
from sft_job.synth.run import stats_line, synthesize
from tests.synth.conftest import (
    EXPECTED_PROMPTS,
    EXPECTED_REJECTS,
    SCRIPT,
    N,
    group,
    make_cfg,
    prompts_of,
    read_jsonl,
    script,
)
from tests.synth.fake_openai import FakeOpenAI


def assert_expected_output(out: Path, fmt: str = "prompt-response") -> list[dict]:
    rows = read_jsonl(out)
    groups = [group(p) for p in prompts_of(rows, fmt)]
    assert len(groups) == len(set(groups)), "a duplicate reached the output"
    assert sorted(groups) == sorted(group(p) for p in EXPECTED_PROMPTS)
    return rows


def journal_keys(out: Path) -> list[tuple[str, int]]:
    lines = read_jsonl(Path(str(out) + SUFFIX))
    return [(e["topic"], e["i"]) for e in lines[1:]]


def test_messy_answers_give_exactly_the_valid_unique_set(tmp_path: Path) -> None:
    out = tmp_path / "data" / "synth.jsonl"
    with FakeOpenAI(script(retry_after="1")) as api:
        stats = synthesize(make_cfg(api.url, str(out), tmp_path))
    assert_expected_output(out)
    assert stats["kept"] == len(EXPECTED_PROMPTS) == 15
    assert stats["rejects"] == EXPECTED_REJECTS
    assert stats["duplicates"] == 4
    assert stats["requests"] == 14 and stats["surplus"] == 0 and stats["cut_off"] == 1
    assert stats["short_topics"]  # 14 of 140 asked: the run says it came up short
    assert f"kept 15/{N}" in stats_line(stats) and "duplicate 3" in stats_line(stats)
    # every scripted request answered once; the throttled one after its Retry-After
    assert sorted(api.ok_keys()) == sorted(SCRIPT)
    sql1 = [s for s in api.seen if s.key == ("sql", 1)]
    assert [s.status for s in sql1] == [429, 500, 200]
    assert sql1[1].at - sql1[0].at >= 0.95
    assert all(s.body["response_format"] == {"type": "json_object"} for s in api.seen)
    # the job reads the file as prompt-response data
    recs = load.read(out).records
    assert formats.detect([r.row for r in recs], DataSpec(train=str(out))) == "prompt-response"
    assert sorted(journal_keys(out)) == sorted(SCRIPT)


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_output_formats(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"synth-{fmt}.jsonl"
    with FakeOpenAI(SCRIPT) as api:
        synthesize(make_cfg(api.url, str(out), tmp_path, format=fmt))
    rows = assert_expected_output(out, fmt)
    recs = load.read(out).records
    assert formats.detect([r.row for r in recs], DataSpec(train=str(out))) == fmt
    if fmt == "alpaca":
        assert {r["input"] for r in rows} == {"", "some context for four"}


def test_rerun_after_completion_asks_nothing(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    with FakeOpenAI(SCRIPT) as api:
        synthesize(make_cfg(api.url, str(out), tmp_path))
        first = out.read_bytes()
        seen = len(api.seen)
        stats = synthesize(make_cfg(api.url, str(out), tmp_path))
    assert len(api.seen) == seen and stats["requests_this_run"] == 0
    assert out.read_bytes() == first


def test_quota_gives_exactly_n_rows(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    with FakeOpenAI(SCRIPT) as api:
        stats = synthesize(make_cfg(api.url, str(out), tmp_path, n=5, concurrency=1,
                                    max_requests=None))
    rows = read_jsonl(out)
    assert len(rows) == 5 and stats["kept"] == 5 and not stats["short_topics"]
    assert len({group(p) for p in prompts_of(rows)}) == 5


def test_server_down_mid_run_then_resume_without_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    with FakeOpenAI(SCRIPT, fail_after=5) as api:
        with pytest.raises(TransientError, match="gave up after 3 attempts"):
            synthesize(make_cfg(api.url, str(out), tmp_path, client_max_retries=2))
        assert not out.exists()  # no half output that looks complete
        done = journal_keys(out)
        assert 5 <= len(done) < 14
        with Path(str(out) + SUFFIX).open("a") as f:
            f.write('{"kind": "request", "topic": "py')  # a line cut off by a kill
        api.fail_after = None
        n_seen = len(api.seen)
        synthesize(make_cfg(api.url, str(out), tmp_path))
        second = [s.key for s in api.seen[n_seen:] if s.status == 200]
    assert not set(second) & set(done), "a finished request was asked again"
    assert sorted(journal_keys(out)) == sorted(SCRIPT)
    assert_expected_output(out)


def test_json_mode_refused_falls_back(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    with FakeOpenAI(SCRIPT, json_mode=False) as api:
        synthesize(make_cfg(api.url, str(out), tmp_path, concurrency=2))
    refused = [s for s in api.seen if s.status == 400]
    assert 1 <= len(refused) <= 2  # those already in flight when the first 400 came back
    assert all("response_format" in s.body for s in refused)
    assert all("response_format" not in s.body for s in api.seen if s.status == 200)
    assert_expected_output(out)


def test_json_mode_on_and_refused_is_a_spec_error(tmp_path: Path) -> None:
    with FakeOpenAI(SCRIPT, json_mode=False) as api, pytest.raises(SpecError, match="HTTP 400"):
        synthesize(make_cfg(api.url, str(tmp_path / "o.jsonl"), tmp_path, client_json_mode="on"))


def test_wrong_key_is_access_error_and_never_shown(tmp_path: Path) -> None:
    with FakeOpenAI(SCRIPT) as api, pytest.raises(AccessError, match="HTTP 401") as err:
        synthesize(make_cfg(api.url, str(tmp_path / "o.jsonl"), tmp_path,
                            client_api_key="sk-proj-verysecretvalue123"))
    assert "verysecret" not in str(err.value)


def test_wrong_path_is_spec_error(tmp_path: Path) -> None:
    with FakeOpenAI(SCRIPT) as api, pytest.raises(SpecError, match=r"404.*--base-url"):
        synthesize(make_cfg(api.url + "/v2", str(tmp_path / "o.jsonl"), tmp_path))


def test_unreachable_endpoint_is_transient(tmp_path: Path) -> None:
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(TransientError, match="cannot connect"):
        synthesize(make_cfg(url, str(tmp_path / "o.jsonl"), tmp_path, client_max_retries=1))


def test_changed_settings_are_refused_unless_restart(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    with FakeOpenAI(SCRIPT) as api:
        synthesize(make_cfg(api.url, str(out), tmp_path))
        with pytest.raises(SpecError, match=r"different model.*--restart"):
            synthesize(make_cfg(api.url, str(out), tmp_path, client_model="other-model"))
        stats = synthesize(make_cfg(api.url, str(out), tmp_path, client_model="other-model",
                                    restart=True))
    assert stats["requests_this_run"] == 14


def test_existing_foreign_output_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "precious.jsonl"
    out.write_text('{"prompt": "mine", "response": "keep me"}\n')
    with FakeOpenAI(SCRIPT) as api, pytest.raises(SpecError, match="not made by `data synth`"):
        synthesize(make_cfg(api.url, str(out), tmp_path))
    assert out.read_text() == '{"prompt": "mine", "response": "keep me"}\n'


def test_rate_limit_spaces_requests(tmp_path: Path) -> None:
    with FakeOpenAI(SCRIPT) as api:
        synthesize(make_cfg(api.url, str(tmp_path / "o.jsonl"), tmp_path, client_rpm=600,
                            concurrency=4))
    # 600/min = one start every 0.1 s, even with 4 workers (the span, not each gap: a busy
    # machine may delay single arrivals, but never makes requests start early)
    arrivals = sorted(s.arrived for s in api.seen)
    assert arrivals[-1] - arrivals[0] >= 0.1 * (len(arrivals) - 1) * 0.9
    assert len(arrivals) == 16  # 14 requests + the 429 and the 500 retries


def test_nothing_usable_is_a_data_error(tmp_path: Path) -> None:
    from sft_job.errors import DataError

    with FakeOpenAI(default=lambda key: "no JSON here at all") as api, \
            pytest.raises(DataError, match=r"no usable rows.*invalid_json 14"):
        synthesize(make_cfg(api.url, str(tmp_path / "o.jsonl"), tmp_path))
    lines = read_jsonl(tmp_path / ("o.jsonl" + SUFFIX))
    assert lines[1]["raw"] == "no JSON here at all"  # kept for debugging


def test_journal_lines_are_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "synth.jsonl"
    with FakeOpenAI(SCRIPT) as api:
        synthesize(make_cfg(api.url, str(out), tmp_path))
    lines = Path(str(out) + SUFFIX).read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "header"
    counts = Counter(json.loads(x)["topic"] for x in lines[1:])
    assert counts == {"python": 10, "sql": 4}


def test_resume_redoes_a_request_left_unfinished_under_its_own_number(tmp_path: Path) -> None:
    """The journal has requests 0, 1, 2 and 4 of a topic (3 was in flight at the stop): the next
    run asks 3 first, then 5; never a number already done."""
    from sft_job.synth.dedup import Keeper
    from sft_job.synth.run import Planner, Progress
    from sft_job.synth.topics import Topic

    cfg = make_cfg("http://127.0.0.1:1", str(tmp_path / "o.jsonl"), tmp_path,
                   topics=[Topic(name="python", weight=1)], max_requests=20)
    progress = Progress(quota={"python": cfg.n}, keeper=Keeper())
    for i in (0, 1, 2, 4):
        progress.apply({"topic": "python", "i": i, "pairs": []})
    planner = Planner(cfg, progress)
    assert [planner.next().i for _ in range(3)] == [3, 5, 6]
