"""Preemption end to end: the CLI as a real subprocess, outputs in S3 (moto on loopback, reached
through tests.servers.fault_proxy where requests must be recorded, delayed or failed).

SIGTERM -> exit 75 with a committed checkpoint -> a rerun (fresh work dir, as on a new pod)
resumes and ends with final weights bitwise equal to an uninterrupted run's and the same loss
sequence. Bitwise is expected: CPU, fp32, same seed, one intra-op thread in every run, and the
checkpoint carries optimizer, scheduler, RNG states and the data position. SIGKILL at random
moments (mid-upload too) never leaves a committed checkpoint incomplete; a second SIGTERM exits
at once without a commit marker; 503s and dropped connections change nothing; the resume
guards refuse a changed spec or data; old checkpoints go only after a newer one is committed;
a SIGTERM before training exits 75; a rerun after the last checkpoint only finishes.

Time on 2 busy cores (load ~10): 4m10s (2 CPU-minutes) without the `slow` cases, 8m50s with
them (SIGTERM at two more steps, SIGKILL, faulty S3).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
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
    Job,
    check_checkpoints,
    copy_prefix,
    env_threads,
    final_weights,
    job,
    list_objects,
    loss_sequence,
    read,
    recording_proxy,
    step_dirs,
)
from tests.servers import S3Server, s3_server, use_env

BUCKET = "preempt-tests"
MAX_STEPS = 12  # 20 packed rows / batch 4 = 5 steps an epoch: resumes cross epoch boundaries
SAVE_EVERY = 2
KEEP = 2
COMMON = ["train.logging_steps=1", f"train.max_steps={MAX_STEPS}",
          f"output.save_every_steps={SAVE_EVERY}", f"output.keep_checkpoints={KEEP}"]
CKPT_DATA_PUT = r"^PUT /{bucket}/{prefix}/checkpoints/step-\d+/(?!COMMITTED)"


def cli_args(prefix: str, *extra: str) -> list[str]:
    args = ["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri=s3://{BUCKET}/{prefix}"]
    for s in [*COMMON, *extra]:
        args += ["--set", s]
    return args


def run_env(endpoint_env: dict[str, str], workdir: Path) -> dict[str, str]:
    """A fresh SFT_JOB_WORKDIR per run: a rerun finds nothing locally, only the bucket."""
    workdir.mkdir(parents=True, exist_ok=True)
    return {**endpoint_env, "SFT_JOB_WORKDIR": str(workdir), **env_threads()}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server(buckets=[BUCKET]) as server:
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process pointed at moto too, for sft_job.storage reads."""
    use_env(monkeypatch, s3.env)
    return s3


def latest(prefix: str) -> str | None:
    from sft_job import storage

    return storage.latest_committed(f"s3://{BUCKET}/{prefix}/checkpoints")


def step_uri(prefix: str, step: int) -> str:
    return f"s3://{BUCKET}/{prefix}/checkpoints/step-{step:06d}"


class Baseline:
    def __init__(self, weights: dict[str, str], losses: list[Any], requests: list[tuple[str, str]],
                 stderr: str) -> None:
        self.weights, self.losses, self.requests, self.stderr = weights, losses, requests, stderr


@pytest.fixture(scope="module")
def baseline(s3: S3Server, sft_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """One uninterrupted run, through a recording (fault-free) proxy."""
    with recording_proxy(s3.url) as (proxy, rec):
        env = run_env(proxy.env_for(s3), tmp_path_factory.mktemp("work-baseline"))
        with job(cli_args("baseline"), sft_cache, env) as j:
            rc = j.wait(600)
    assert rc == 0, j.tail()
    assert j.steps_logged() == list(range(1, MAX_STEPS + 1))
    c = s3.client()
    losses = loss_sequence(c, BUCKET, "baseline")
    assert [s for s, *_ in losses] == list(range(1, MAX_STEPS + 1))
    return Baseline(final_weights(c, BUCKET, "baseline"), losses, rec.forwarded(), j.stderr)


def _finish_resumed(s3: S3Server, sft_cache: Path, prefix: str, workdir: Path,
                    baseline: Baseline, from_step: int, endpoint_env: dict[str, str] | None = None,
                    sigterm_at: str | None = None, cached: bool = True) -> Job:
    """Rerun on a fresh work dir: it must resume at `from_step`, train only the remaining
    steps and end with the baseline's weights and loss sequence (with `sigterm_at`, a SIGTERM
    when that line is logged changes nothing)."""
    with job(cli_args(prefix), sft_cache, run_env(endpoint_env or s3.env, workdir)) as j:
        if sigterm_at:
            j.wait_for(sigterm_at)
            j.send(signal.SIGTERM)
        rc = j.wait(600)
    assert rc == 0, j.tail()
    m = RESUMED.search(j.stderr)
    assert m, f"the rerun did not resume:\n{j.tail()}"
    assert (m.group(1), int(m.group(2))) == (step_uri(prefix, from_step), from_step)
    assert j.steps_logged() == list(range(from_step + 1, MAX_STEPS + 1))
    # the rows came from the prepared data the first run committed to the bucket, not again
    used = f"data: using the prepared data s3://{BUCKET}/{prefix}/prepared/"
    assert not cached or (used in j.stderr and "data: preparing" not in j.stderr
                          and "skipping the row scan" in j.stderr), j.tail()
    c = s3.client()
    assert final_weights(c, BUCKET, prefix) == baseline.weights, "final weights differ"
    assert loss_sequence(c, BUCKET, prefix) == baseline.losses
    return j


# ------------------------------------------------------------------------------ 1. SIGTERM


@pytest.mark.parametrize("after_step", [
    pytest.param(1, marks=pytest.mark.slow),  # stops during epoch 1, on the save grid (2)
    6,                                          # epoch 2, off the save grid
    pytest.param(9, marks=pytest.mark.slow),  # the last step of epoch 2
])
def test_sigterm_commits_then_rerun_matches_uninterrupted(
        after_step: int, s3_env: S3Server, baseline: Baseline, sft_cache: Path,
        tmp_path: Path) -> None:
    prefix = f"sigterm-{after_step}"
    with job(cli_args(prefix), sft_cache, run_env(s3_env.env, tmp_path / "w1")) as j:
        j.wait_step(after_step)
        t0 = time.monotonic()
        j.send(signal.SIGTERM)
        rc = j.wait(120)
    assert rc == 75, j.tail()
    m = PREEMPTED.search(j.stderr)
    assert m and m.group(1) == "SIGTERM", j.tail()
    stopped = int(m.group(2))
    # the next step, or this one when the signal lands while this step's checkpoint is being
    # saved (on the save grid): that checkpoint is then the stop checkpoint
    assert after_step < stopped < MAX_STEPS or (stopped == after_step and not stopped % SAVE_EVERY)
    if stopped == after_step:
        assert "stop requested during the save of step" in j.stderr, j.tail()
    commit_s = j.line_time(f"checkpoint step-{stopped:06d} committed") - t0
    assert commit_s < 25, f"SIGTERM -> committed took {commit_s:.1f}s (stop budget 25s)"
    assert max(j.steps_logged()) == stopped  # finished the current step, started no other

    c = s3_env.client()
    committed, partial = check_checkpoints(c, BUCKET, prefix)
    assert committed[-1] == stopped and not partial
    assert latest(prefix) == step_uri(prefix, stopped)
    assert not set(list_objects(c, BUCKET, prefix)) & {"_SUCCESS", "model/COMMITTED"}

    _finish_resumed(s3_env, sft_cache, prefix, tmp_path / "w2", baseline, stopped)


# ------------------------------------------------------------------------------ 2. SIGKILL


@pytest.mark.slow
def test_sigkill_anywhere_never_exposes_a_partial_checkpoint(
        s3_env: S3Server, baseline: Baseline, sft_cache: Path, tmp_path: Path) -> None:
    """Kill 1: a random moment of training. Kill 2: while a checkpoint's files upload (every
    checkpoint PUT held 1s by the proxy, the kill 1.1-1.7s after the first). Then a rerun
    finishes. (A kill after the last checkpoint: test_resume_at_the_last_step.)"""
    rng = random.Random(20261124)
    prefix = "sigkill"
    c = s3_env.client()
    with recording_proxy(s3_env.url) as (proxy, rec):
        env_of = proxy.env_for(s3_env)
        resume_from = None
        for round_ in (1, 2):
            rec.delay_s = 1.0 if round_ == 2 else 0.0
            started = rec.watch(CKPT_DATA_PUT.format(bucket=BUCKET, prefix=prefix))
            with job(cli_args(prefix), sft_cache, run_env(env_of, tmp_path / f"w{round_}")) as j:
                if round_ == 1:
                    j.wait_step(rng.randint(2, 8))
                    # at least one commit to resume from: the uploader process runs at nice
                    # 10 and lags behind training on a loaded machine
                    j.wait_for(r"checkpoint step-\d+ committed")
                    time.sleep(rng.uniform(0, 0.6))
                else:
                    assert started.wait(300), j.tail()
                    time.sleep(rec.delay_s + rng.uniform(0.1, 0.7))
                j.send(signal.SIGKILL)
                assert j.wait(60) == -signal.SIGKILL
            if resume_from is not None:
                assert f"resuming from committed checkpoint {step_uri(prefix, resume_from)} " \
                       in j.stderr, j.tail()
            time.sleep(2 * rec.delay_s + 0.5)  # requests the proxy still holds land (or not)
            committed, partial = check_checkpoints(c, BUCKET, prefix)
            if round_ == 2:  # the newest folder is the one cut short: readers must skip it
                assert partial and max(partial) > max(committed, default=0), (committed, partial)
            assert latest(prefix) == (step_uri(prefix, committed[-1]) if committed else None)
            resume_from = committed[-1] if committed else None
        rec.delay_s = 0.0
        assert resume_from, "no checkpoint was committed before the kills"
        _finish_resumed(s3_env, sft_cache, prefix, tmp_path / "w3", baseline, resume_from,
                        env_of)
    check_checkpoints(c, BUCKET, prefix)


def test_resume_at_the_last_step(s3_env: S3Server, baseline: Baseline, sft_cache: Path,
                                 tmp_path: Path) -> None:
    """The bucket as a kill during merge/upload leaves it: the baseline's committed
    checkpoints, no model, no _SUCCESS. The rerun must only finish: no step 13/12 (HF Trainer
    checks max_steps only after a step), no step-000013, no 13th loss; with a constant lr that
    extra step would also change the weights. A SIGTERM during that finish (while merging) is
    noted and the finish goes on: exit 0, _SUCCESS."""
    prefix = "last-step"
    c = s3_env.client()
    for step in (MAX_STEPS - SAVE_EVERY, MAX_STEPS):
        copy_prefix(c, BUCKET, f"baseline/checkpoints/step-{step:06d}",
                    f"{prefix}/checkpoints/step-{step:06d}")
    j = _finish_resumed(s3_env, sft_cache, prefix, tmp_path, baseline, MAX_STEPS,
                        sigterm_at=r"merging the adapter", cached=False)  # checkpoints only
    assert "SIGTERM received" in j.stderr
    assert check_checkpoints(c, BUCKET, prefix) == ([MAX_STEPS - SAVE_EVERY, MAX_STEPS], [])
    assert "_SUCCESS" in list_objects(c, BUCKET, prefix)


# ------------------------------------------------------------------- 3. second SIGTERM


class DoubleStop:
    def __init__(self, job_: Job, prefix: str, data: Path, exit_s: float, rc: int) -> None:
        self.job, self.prefix, self.data, self.exit_s, self.rc = job_, prefix, data, exit_s, rc


@pytest.fixture(scope="module")
def double_stop(s3: S3Server, sft_cache: Path,
                tmp_path_factory: pytest.TempPathFactory) -> DoubleStop:
    """A run whose data file is a private copy (the data-change guard edits it), stopped by
    SIGTERM while checkpoint uploads are slow, then hit by a second SIGTERM mid-upload.
    step-000002 is committed before the first signal."""
    tmp = tmp_path_factory.mktemp("double")
    data = tmp / "polite.jsonl"
    shutil.copyfile(REPO / "sft_job/sample_data/polite.jsonl", data)
    prefix = "double"
    with recording_proxy(s3.url) as (proxy, rec):
        rec.delay_s = 2.0
        rec.delay_match = rf"^PUT .*/{prefix}/checkpoints/step-(?!000002/)"
        args = cli_args(prefix, f"data.train={data}")
        with job(args, sft_cache, run_env(proxy.env_for(s3), tmp / "w")) as j:
            j.wait_for(r"checkpoint step-000002 committed")
            started = rec.watch(rf"^PUT /{BUCKET}/{prefix}/checkpoints/step-(?!000002/)\d+/"
                                r"(?!COMMITTED)")
            j.send(signal.SIGTERM)
            j.wait_for(r"SIGTERM received")
            assert started.wait(60), j.tail()
            time.sleep(0.3)
            t0 = time.monotonic()
            j.send(signal.SIGTERM)
            rc = j.wait(60)
            exit_s = time.monotonic() - t0
        time.sleep(2 * rec.delay_s + 1)  # let the proxy finish the requests it holds
    return DoubleStop(j, prefix, data, exit_s, rc)


def test_second_sigterm_exits_at_once_without_commit(double_stop: DoubleStop,
                                                     s3_env: S3Server) -> None:
    d = double_stop
    assert d.rc == 75, d.job.tail()
    assert d.exit_s < 3, f"second SIGTERM took {d.exit_s:.1f}s to exit"
    assert "second SIGTERM" in d.job.stderr
    assert not PREEMPTED.search(d.job.stderr)  # it never claimed a commit
    committed, partial = check_checkpoints(s3_env.client(), BUCKET, d.prefix)
    assert committed == [2], (committed, partial)
    assert partial and min(partial) > 2  # the interrupted upload left files, no marker
    assert latest(d.prefix) == step_uri(d.prefix, 2)


# ---------------------------------------------------------------------- 5. resume guards


def test_success_marker_means_done(baseline: Baseline, s3: S3Server, sft_cache: Path,
                                   tmp_path: Path) -> None:
    c = s3.client()
    before = {k: (o["ETag"], o["LastModified"]) for k, o in
              list_objects(c, BUCKET, "baseline").items()}
    assert "_SUCCESS" in before
    with recording_proxy(s3.url) as (proxy, rec):
        t0 = time.monotonic()
        with job(cli_args("baseline"), sft_cache, run_env(proxy.env_for(s3), tmp_path)) as j:
            rc = j.wait(120)
        took = time.monotonic() - t0
    assert rc == 0, j.tail()
    assert "already done" in j.stderr
    assert not j.steps_logged() and "plan:" not in j.stderr
    assert took < 30, f"an already-done rerun took {took:.0f}s"
    writes = [(m, p) for m, p in rec.forwarded() if m in ("PUT", "POST", "DELETE")]
    assert not writes, writes
    assert {k: (o["ETag"], o["LastModified"]) for k, o in
            list_objects(c, BUCKET, "baseline").items()} == before


def _guard_copy(s3: S3Server, d: DoubleStop, name: str) -> str:
    """A copy of the double-stop run's job.yaml and checkpoints (step-000002 committed, no
    _SUCCESS)."""
    c = s3.client()
    c.copy_object(Bucket=BUCKET, Key=f"{name}/job.yaml",
                  CopySource={"Bucket": BUCKET, "Key": f"{d.prefix}/job.yaml"})
    copy_prefix(c, BUCKET, f"{d.prefix}/checkpoints/step-000002",
                f"{name}/checkpoints/step-000002")
    return name


class Refused:
    def __init__(self, job_: Job, rc: int, prefix: str, yaml_before: bytes,
                 yaml_after: bytes) -> None:
        self.job, self.rc, self.prefix = job_, rc, prefix
        self.yaml_before, self.yaml_after = yaml_before, yaml_after


@pytest.fixture(scope="module")
def refused(double_stop: DoubleStop, s3: S3Server, sft_cache: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Refused:
    """One rerun for both guards (each start costs ~20s): the learning rate changed, and one
    data row was edited in place (same size, same row count)."""
    prefix = _guard_copy(s3, double_stop, "guard-changed")
    c = s3.client()
    yaml_before = read(c, BUCKET, f"{prefix}/job.yaml")
    original = double_stop.data.read_bytes()
    changed = original.replace(b"Paris", b"Lyon!", 1)
    assert changed != original and len(changed) == len(original)
    try:
        double_stop.data.write_bytes(changed)
        args = cli_args(prefix, f"data.train={double_stop.data}", "train.learning_rate=1e-3")
        env = run_env(s3.env, tmp_path_factory.mktemp("work-refused"))
        with job(args, sft_cache, env) as j:
            rc = j.wait(300)
    finally:
        double_stop.data.write_bytes(original)
    return Refused(j, rc, prefix, yaml_before, read(c, BUCKET, f"{prefix}/job.yaml"))


def test_spec_and_data_changes_are_refused(refused: Refused, s3: S3Server) -> None:
    j = refused.job
    assert refused.rc == 2, j.tail()
    err = j.stderr.split("error:", 1)[-1]
    for needle in ("--allow-changed", "step-000002", "spec train.learning_rate", "data files"):
        assert needle in err, f"{needle!r} not in:\n{j.tail()}"
    assert re.findall(r"spec ([\w.]+)", err) == ["train.learning_rate"], err  # nothing else
    assert not j.steps_logged(), "it trained although the resume was refused"
    assert sorted(step_dirs(s3.client(), BUCKET, refused.prefix)) == [2]


def test_refused_rerun_leaves_job_yaml_alone(refused: Refused) -> None:
    """output.uri/job.yaml keeps describing the run its checkpoints belong to."""
    assert refused.rc == 2
    assert refused.yaml_after == refused.yaml_before


def test_allow_changed_resumes(double_stop: DoubleStop, s3: S3Server, sft_cache: Path,
                               tmp_path: Path) -> None:
    prefix = _guard_copy(s3, double_stop, "guard-allow")
    args = [*cli_args(prefix, f"data.train={double_stop.data}", "train.learning_rate=1e-3"),
            "--allow-changed"]
    with job(args, sft_cache, run_env(s3.env, tmp_path)) as j:
        j.wait_step(3)
        j.send(signal.SIGTERM)
        rc = j.wait(120)
    assert rc == 75, j.tail()
    assert re.search(r"resuming from .*step-000002 although .*train\.learning_rate", j.stderr)
    assert RESUMED.search(j.stderr).group(2) == "2"  # type: ignore[union-attr]
    assert j.steps_logged()[0] == 3


def test_sigterm_before_training_exits_75(s3_env: S3Server, sft_cache: Path,
                                          tmp_path: Path) -> None:
    """While data and model load there is nothing to save: exit 75 (not killed by the signal,
    which a pod reports as 143 and a podFailurePolicy counts as a failure), nothing trained."""
    with job(cli_args("early"), sft_cache, run_env(s3_env.env, tmp_path)) as j:
        j.wait_for(r"job smoke-cpu: backend")
        j.send(signal.SIGTERM)
        rc = j.wait(120)
    assert rc == 75, j.tail()
    assert not j.steps_logged() and "preempted by SIGTERM" in j.stderr


# ------------------------------------------------------------------- 4. faulty storage


@pytest.mark.slow
def test_faulty_storage_same_result_every_object_verifies(
        s3_env: S3Server, baseline: Baseline, sft_cache: Path, tmp_path: Path) -> None:
    prefix = "faults"
    c = s3_env.client()
    with recording_proxy(s3_env.url, error_rate=0.08, drop_rate=0.05, seed=7) as (proxy, _rec):
        env = run_env(proxy.env_for(s3_env), tmp_path / "w")
        with job(cli_args(prefix), sft_cache, env) as j:
            rc = j.wait(600)
    assert rc == 0, j.tail()
    assert proxy.stats["error"] >= 5 and proxy.stats["drop"] >= 3, proxy.stats
    assert final_weights(c, BUCKET, prefix) == baseline.weights
    assert loss_sequence(c, BUCKET, prefix) == baseline.losses

    committed, partial = check_checkpoints(c, BUCKET, prefix)
    assert committed == [MAX_STEPS - SAVE_EVERY, MAX_STEPS] and not partial
    work = next((tmp_path / "w").glob("smoke-cpu-*"))
    objs = list_objects(c, BUCKET, prefix)
    for section in ("model", "adapter", "metrics"):
        _verify_committed(c, objs, prefix, section, work / "out" / section)
    for step in committed:  # the trainer keeps its last two local checkpoints: the same ones
        _verify_committed(c, objs, prefix, f"checkpoints/step-{step:06d}",
                          work / "trainer" / f"checkpoint-{step}",
                          skip={"sft_job_state.json", "sft_job_metrics.jsonl"})


def _verify_committed(c: Any, objs: dict[str, Any], prefix: str, section: str, local: Path,
                      skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Every object of a committed section: listed in the manifest, bytes (read straight from
    moto with plain boto3) equal to the local file, and the ETag their MD5."""
    manifest = json.loads(read(c, BUCKET, f"{prefix}/{section}/COMMITTED"))["files"]
    keys = {k[len(section) + 1:]: o for k, o in objs.items() if k.startswith(section + "/")}
    assert set(keys) - {"COMMITTED"} == set(manifest), section
    for rel, size in manifest.items():
        data = read(c, BUCKET, f"{prefix}/{section}/{rel}")
        assert len(data) == size, f"{section}/{rel}"
        assert hashlib.md5(data).hexdigest() == keys[rel]["ETag"].strip('"'), f"{section}/{rel}"
        if rel not in skip:
            assert data == (local / rel).read_bytes(), f"{section}/{rel} differs from the local"


# ----------------------------------------------------------------------- 6. rotation


def test_old_checkpoints_go_only_after_a_newer_commit(baseline: Baseline, s3: S3Server) -> None:
    committed, partial = check_checkpoints(s3.client(), BUCKET, "baseline")
    assert committed == [MAX_STEPS - SAVE_EVERY, MAX_STEPS] and not partial
    marker = re.compile(rf"^/{BUCKET}/baseline/checkpoints/step-(\d+)/COMMITTED(\?|$)")
    live: set[int] = set()
    ever, deleted = [], []
    for method, path in baseline.requests:
        m = marker.match(path)
        if not m:
            continue
        step = int(m.group(1))
        if method == "PUT":
            live.add(step)
            ever.append(step)
        elif method == "DELETE" and step in live:  # (a DELETE before an upload is a no-op)
            newer = sorted(s for s in live if s > step)
            assert len(newer) >= KEEP, f"step-{step} deleted while only {newer} were committed"
            live.discard(step)
            deleted.append(step)
    assert ever == list(range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY))
    assert deleted == list(range(SAVE_EVERY, MAX_STEPS - SAVE_EVERY * KEEP + 1, SAVE_EVERY))
    assert live == {MAX_STEPS - SAVE_EVERY, MAX_STEPS}
