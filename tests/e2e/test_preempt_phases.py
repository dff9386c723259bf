"""A stop during an evaluation, and checkpoint uploads that fail, end to end: the CLI as a real
subprocess, output in S3 (moto on loopback, behind tests.servers.fault_proxy where 403s are
injected).

- SIGTERM while a training-time evaluation runs: the evaluation is abandoned at its next
  batch, the step it follows is checkpointed and committed, exit 75; the rerun evaluates that
  step first, then trains on, ending with weights, losses and eval losses identical to an
  uninterrupted run's. (SIGTERM during a periodic save: tests/e2e/test_preempt.py, where a
  signal landing in a save makes that save the stop checkpoint, and tests/unit/test_stop_phases.)
- One checkpoint upload denied (a transient 403): that checkpoint is not committed, is cleaned
  up, and the run ends with exit 0 and the same model. Every checkpoint upload denied: exit 3
  with one error line, nothing published.

Time on 2 shared cores: 1.6 min at load ~5, 3 min at load ~11 (five runs of a 12-step job
with a 1,800-row eval set).
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.e2e.preempt_helpers import (
    PREEMPTED,
    RESUMED,
    env_threads,
    final_weights,
    job,
    list_objects,
    loss_sequence,
    read,
    recording_proxy,
    step_dirs,
)
from tests.servers import S3Server, s3_server

pytestmark = pytest.mark.slow

BUCKET = "phases"
MAX_STEPS, SAVE_EVERY, EVAL_EVERY = 12, 2, 6


def cli_args(prefix: str, eval_file: Path) -> list[str]:
    sets = ["train.logging_steps=1", f"train.max_steps={MAX_STEPS}",
            f"output.save_every_steps={SAVE_EVERY}", "output.keep_checkpoints=2",
            f"train.eval_steps={EVAL_EVERY}", "data.eval_fraction=0", f"data.eval={eval_file}",
            "eval.num_samples=1", "eval.max_new_tokens=4", f"output.uri=s3://{BUCKET}/{prefix}"]
    return ["run", "jobs/smoke-cpu.yaml", *[a for s in sets for a in ("--set", s)]]


def env(endpoint: dict[str, str], work: Path) -> dict[str, str]:
    return {**endpoint, "SFT_JOB_WORKDIR": str(work), **env_threads()}


def eval_losses(c: Any, prefix: str) -> list[tuple[int, float]]:
    text = read(c, BUCKET, f"{prefix}/metrics/metrics.jsonl").decode()
    recs = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    return [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server(buckets=[BUCKET]) as server:
        yield server


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An eval set long enough (1,800 rows) that a signal reliably lands inside an evaluation."""
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text((REPO / "sft_job/sample_data/polite.jsonl").read_text() * 30)
    return path


@pytest.fixture(scope="module")
def baseline(s3: S3Server, eval_file: Path, sft_cache: Path,
             tmp_path_factory: pytest.TempPathFactory) -> str:
    with job(cli_args("baseline", eval_file), sft_cache,
             env(s3.env, tmp_path_factory.mktemp("w"))) as j:
        assert j.wait(600) == 0, j.tail()
    c = s3.client()
    # the periodic evaluation, then the final one at the last step
    assert [s for s, _ in eval_losses(c, "baseline")] == [EVAL_EVERY, MAX_STEPS]
    # the evaluation's own log record does not swallow its step's training loss
    assert [s for s, *_ in loss_sequence(c, BUCKET, "baseline")] == list(range(1, MAX_STEPS + 1))
    return "baseline"


def _same_result(c: Any, prefix: str, baseline: str) -> None:
    assert final_weights(c, BUCKET, prefix) == final_weights(c, BUCKET, baseline)
    assert loss_sequence(c, BUCKET, prefix) == loss_sequence(c, BUCKET, baseline)
    assert eval_losses(c, prefix) == eval_losses(c, baseline)


def test_sigterm_during_evaluation_aborts_it_and_resumes_exactly(
        s3: S3Server, baseline: str, eval_file: Path, sft_cache: Path, tmp_path: Path) -> None:
    prefix = "eval-stop"
    with job(cli_args(prefix, eval_file), sft_cache, env(s3.env, tmp_path / "w1")) as j:
        j.wait_for(rf"step {EVAL_EVERY}: evaluating \(\d+ rows\)")
        t0 = time.monotonic()
        j.send(signal.SIGTERM)
        assert j.wait(120) == 75, j.tail()
    assert f"stop requested during the evaluation at step {EVAL_EVERY}" in j.stderr, j.tail()
    m = PREEMPTED.search(j.stderr)
    assert m and int(m.group(2)) == EVAL_EVERY and "committed; rerun" in j.stderr, j.tail()
    assert j.line_time(f"checkpoint step-{EVAL_EVERY:06d} committed") - t0 < 25
    assert max(j.steps_logged()) == EVAL_EVERY  # no step after the aborted evaluation
    c = s3.client()
    state = json.loads(read(c, BUCKET, f"{prefix}/checkpoints/step-{EVAL_EVERY:06d}/"
                                       "sft_job_state.json"))
    assert state["eval_pending"] is True

    with job(cli_args(prefix, eval_file), sft_cache, env(s3.env, tmp_path / "w2")) as j:
        assert j.wait(600) == 0, j.tail()
    m = RESUMED.search(j.stderr)
    assert m and int(m.group(2)) == EVAL_EVERY, j.tail()
    assert j.steps_logged() == list(range(EVAL_EVERY + 1, MAX_STEPS + 1))
    assert re.search(rf"step {EVAL_EVERY}  eval_loss", j.stderr)  # the aborted one, first
    _same_result(c, prefix, baseline)


def test_one_denied_checkpoint_upload_does_not_fail_the_run(
        s3: S3Server, baseline: str, eval_file: Path, sft_cache: Path, tmp_path: Path) -> None:
    prefix = "one-403"
    with recording_proxy(s3.url, match=rf"^PUT /{BUCKET}/{prefix}/checkpoints/step-000004/"
                         ) as (proxy, _):
        proxy.fail_next(1, "deny")
        with job(cli_args(prefix, eval_file), sft_cache, env(proxy.env_for(s3), tmp_path)) as j:
            assert j.wait(600) == 0, j.tail()
        assert proxy.stats["deny"] == 1
    assert "checkpoint step-000004 was not committed; training goes on" in j.stderr, j.tail()
    c = s3.client()
    assert 4 not in step_dirs(c, BUCKET, prefix)  # the partial upload was cleaned up
    assert "_SUCCESS" in list_objects(c, BUCKET, prefix)
    _same_result(c, prefix, baseline)


def test_denied_checkpoint_uploads_that_persist_are_exit_3(
        s3: S3Server, eval_file: Path, sft_cache: Path, tmp_path: Path) -> None:
    prefix = "all-403"
    with recording_proxy(s3.url, match=rf"^PUT /{BUCKET}/{prefix}/checkpoints/") as (proxy, _):
        proxy.fail_next(10_000, "deny")
        with job(cli_args(prefix, eval_file), sft_cache, env(proxy.env_for(s3), tmp_path)) as j:
            rc = j.wait(600)
    assert rc == 3, j.tail()
    errors = [ln for ln in j.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "access denied" in errors[0], j.tail()
    assert "Traceback" not in j.stderr
    objs = list_objects(s3.client(), BUCKET, prefix)
    assert not {"_SUCCESS", "model/COMMITTED", "adapter/COMMITTED"} & set(objs)
    assert not [k for k in objs if k.endswith("/COMMITTED") and k.startswith("checkpoints/")]
