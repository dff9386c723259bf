"""`sft-job data synth` as a real subprocess: exit codes, stats line, and runs that are killed
(SIGKILL) or stopped (SIGTERM) part-way and resumed without duplicates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.synth.conftest import (
    EXPECTED_PROMPTS,
    MAX_REQUESTS,
    TOPICS_YAML,
    N,
    group,
    prompts_of,
    qa,
    read_jsonl,
    script,
)
from tests.synth.fake_openai import TEMPLATE, FakeOpenAI

SFT_JOB = REPO / ".venv" / "bin" / "sft-job"


def _cmd() -> list[str]:
    return [str(SFT_JOB)] if SFT_JOB.exists() else [sys.executable, "-m", "sft_job"]


def fast_script() -> dict:
    """The scripted answers without the throttled request (its backoff would slow the CLI)."""
    s = script()
    s[("sql", 1)] = json.dumps([qa(3, "S")])
    return s


@pytest.fixture
def setup(tmp_path: Path) -> dict:
    (tmp_path / "topics.yaml").write_text(TOPICS_YAML)
    (tmp_path / "template.txt").write_text(TEMPLATE)
    env = {**os.environ, "OPENAI_API_KEY": "test-key", "SFT_JOB_WORKDIR": str(tmp_path / "work"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("SFT_JOB_DEBUG", None)
    env.pop("OPENAI_BASE_URL", None)
    return {"tmp": tmp_path, "env": env}


def args(setup: dict, url: str, out: Path, *extra: str) -> list[str]:
    t = setup["tmp"]
    return [*_cmd(), "data", "synth", "--topics", str(t / "topics.yaml"), "--template",
            str(t / "template.txt"), "--n", str(N), "--max-requests", str(MAX_REQUESTS),
            "--out", str(out), "--base-url", url, "--model", "fake-model",
            "--format", "prompt-response", "--concurrency", "2", *extra]


def run(cmd: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_complete(out: Path) -> None:
    groups = [group(p) for p in prompts_of(read_jsonl(out))]
    assert len(groups) == len(set(groups))
    assert sorted(groups) == sorted(group(p) for p in EXPECTED_PROMPTS)


def journal_keys(out: Path) -> list[tuple[str, int]]:
    return [(e["topic"], e["i"]) for e in read_jsonl(Path(f"{out}.synth-journal"))[1:]]


def test_cli_run_prints_stats_and_writes_data(setup: dict) -> None:
    out = setup["tmp"] / "o.jsonl"
    stats = setup["tmp"] / "stats.json"
    with FakeOpenAI(fast_script()) as api:
        r = run(args(setup, api.url, out, "--stats", str(stats)), setup["env"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"synth: kept 15/{N} rows (prompt-response) -> {out}")
    assert "duplicate 3" in r.stdout and "near_duplicate 1" in r.stdout
    assert "short of --n" in r.stderr
    assert json.loads(stats.read_text())["kept"] == 15
    assert "test-key" not in r.stdout + r.stderr
    assert_complete(out)


def _wait_for(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_without_duplicates(setup: dict, sig: signal.Signals) -> None:
    out = setup["tmp"] / "o.jsonl"
    with FakeOpenAI(fast_script(), hang_after=6) as api:
        proc = subprocess.Popen(args(setup, api.url, out), env=setup["env"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda: api.waiting() >= 8)  # both workers wait on a hung request
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        if sig == signal.SIGTERM:
            assert proc.returncode == 75, err
            assert "run the same command again" in err
        else:
            assert proc.returncode == -signal.SIGKILL
        assert not out.exists()
        first = journal_keys(out)
        assert len(first) == 6
        api.hang_after = None
        seen = len(api.seen)
        r = run(args(setup, api.url, out), setup["env"])
        assert r.returncode == 0, r.stderr
        second = [s.key for s in api.seen[seen:] if s.status == 200]
    assert not set(first) & set(second), "a finished request was asked again"
    assert len(second) == MAX_REQUESTS - 6
    assert "(8 this run)" in r.stdout
    assert_complete(out)


def test_no_key_is_exit_2_and_writes_nothing(setup: dict) -> None:
    out = setup["tmp"] / "o.jsonl"
    env = {k: v for k, v in setup["env"].items() if k != "OPENAI_API_KEY"}
    r = run(args(setup, "http://127.0.0.1:9/v1", out), env)
    assert r.returncode == 2
    assert "error: OPENAI_API_KEY is not set" in r.stderr
    assert not out.exists() and not Path(f"{out}.synth-journal").exists()


def test_no_endpoint_is_exit_2(setup: dict) -> None:
    r = run(args(setup, "", setup["tmp"] / "o.jsonl"), setup["env"])
    assert r.returncode == 2
    assert "--base-url '': no endpoint" in r.stderr


def test_refused_key_is_exit_3(setup: dict) -> None:
    env = {**setup["env"], "OPENAI_API_KEY": "sk-wrongwrongwrong42"}
    with FakeOpenAI(fast_script()) as api:
        r = run(args(setup, api.url, setup["tmp"] / "o.jsonl"), env)
    assert r.returncode == 3
    assert "HTTP 401" in r.stderr and "wrongwrong" not in r.stderr


def test_commands_import_light() -> None:
    """`sft-job --help` imports cli/data.py: it must not pull httpx, numpy, pydantic, boto3."""
    r = run([sys.executable, "-c", "import sys, sft_job.cli.data; "
             "print(sorted(m for m in ('httpx', 'numpy', 'pydantic', 'boto3') if m in sys.modules))"],
            dict(os.environ))
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
