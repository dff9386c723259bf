"""Two nodes on one machine, for real: two `sft-job run` launchers (NNODES=2, NODE_RANK=0/1, one
rank each) with separate work dirs (no shared filesystem between the "nodes"), DeepSpeed ZeRO
over gloo (SFT_JOB_DEEPSPEED_ON_CPU=1, a testing path: see test_distributed.py), output in S3
(moto on loopback, each node through its own fault proxy so one node's uploads can be held).

Each node's uploader puts its own rank's ZeRO partitions and RNG state in the bucket; node 0
commits only once both parts are in. A stop (SIGTERM to one node; the ranks agree) commits a
checkpoint; both work dirs are then deleted and the rerun resumes from the bucket alone, each
rank downloading only the common files and its own. Killing node 1's uploader in the middle of
the stop checkpoint's upload leaves it uncommitted: the rerun resumes from the one before, and
the half-uploaded one is deleted. The result is compared with an uninterrupted two-node run,
at least as closely as test_distributed.py asks of a ZeRO resume (bitwise in practice).

Time on 2 shared cores: 2 min at load ~5, 7.5 min at load ~11 (six two-node runs of a 16-step
job, one two-rank run).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.e2e.preempt_helpers import (
    RESUMED,
    Job,
    env_threads,
    job,
    list_objects,
    loss_sequence,
    read,
    recording_proxy,
    step_dirs,
)
from tests.servers import S3Server, free_port, s3_server

pytestmark = pytest.mark.slow

BUCKET = "multinode"
COMMON = ["train.logging_steps=1", "train.max_steps=16", "output.save_every_steps=4",
          "output.keep_checkpoints=2", "output.stop_budget_seconds=15", "train.batch_size=4",
          "eval.num_samples=1", "eval.max_new_tokens=4"]
STAGES = {"zero2": ["deepspeed=zero2"],  # LoRA: ZeRO-2 partitions the optimizer state
          "zero3": ["deepspeed=zero3", "method.kind=full", "train.learning_rate=1e-3"]}
STOPPED = re.compile(r"error: preempted .*at step (\d+)")  # node 0 did not get the signal
UPLOADER = re.compile(r"\[node 1 uploader\] checkpoint uploader started \(pid (\d+)\)")


def cli_args(prefix: str, *sets: str) -> list[str]:
    args = ["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri=s3://{BUCKET}/{prefix}"]
    for s in [*COMMON, *sets]:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server(buckets=[BUCKET]) as server:
        yield server


@contextlib.contextmanager
def two_nodes(args: list[str], cache: Path, work: Path, envs: list[dict[str, str]]
              ) -> Iterator[list[Job]]:
    """Both nodes' launchers, each with its own work dir; killed if the test leaves them."""
    port = str(free_port())
    with contextlib.ExitStack() as stack:
        jobs = []
        for node in (0, 1):
            env = {**envs[node], **env_threads(), "NNODES": "2", "NODE_RANK": str(node),
                   "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                   "SFT_JOB_DEEPSPEED_ON_CPU": "1", "SFT_JOB_WORKDIR": str(work / f"node{node}")}
            jobs.append(stack.enter_context(job(args, cache, env)))
        yield jobs


@pytest.fixture(scope="module")
def reference(s3: S3Server, sft_cache: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, str]:
    """An uninterrupted two-node run per stage: what the stopped and resumed one must match."""
    for stage, sets in STAGES.items():
        work = tmp_path_factory.mktemp(f"ref-{stage}")
        with two_nodes(cli_args(f"ref-{stage}", *sets), sft_cache, work, [s3.env, s3.env]) as ns:
            rcs = [n.wait(900) for n in ns]
            assert rcs == [0, 0], (rcs, ns[0].tail(), ns[1].tail())
    return {stage: f"ref-{stage}" for stage in STAGES}


def _stop(s3: S3Server, cache: Path, prefix: str, stage: str, work: Path,
          kill_uploader: bool) -> tuple[int, str]:
    """SIGTERM to node 1 once step-000004 is committed. With `kill_uploader`, node 1's
    checkpoint PUTs after step 4 are held 30 s each and its uploader is killed while the first
    is held: that checkpoint (the stop one, or step 8 if the stop came later) and every later
    one stay uncommitted. Returns the stop step and node 0's log."""
    with recording_proxy(s3.url) as (p0, _), recording_proxy(s3.url) as (p1, rec1):
        rec1.delay_s = 30.0 if kill_uploader else 0.0
        rec1.delay_match = rf"^PUT /{BUCKET}/{prefix}/checkpoints/step-(?!000004/)"
        held = rec1.watch(rec1.delay_match)
        envs = [p0.env_for(s3), p1.env_for(s3)]
        with two_nodes(cli_args(prefix, *STAGES[stage]), cache, work, envs) as (n0, n1):
            n0.wait_for(r"checkpoint step-000004 committed", timeout=600)
            n1.send(signal.SIGTERM)
            if kill_uploader:
                pid = int(n1.wait_for(UPLOADER).group(1))
                assert held.wait(120), n1.tail()
                time.sleep(0.3)
                os.kill(pid, signal.SIGKILL)
            rcs = (n0.wait(300), n1.wait(300))
        assert rcs == (75, 75), (rcs, n0.tail(), n1.tail())
    m = STOPPED.search(n0.stderr)
    assert m, n0.tail()
    return int(m.group(1)), n0.stderr


def _resume(s3: S3Server, cache: Path, prefix: str, stage: str, work: Path,
            from_step: int) -> None:
    shutil.rmtree(work)  # new machines: nothing local, only the bucket
    with two_nodes(cli_args(prefix, *STAGES[stage]), cache, work, [s3.env, s3.env]) as (n0, n1):
        rcs = (n0.wait(900), n1.wait(900))
        assert rcs == (0, 0), (rcs, n0.tail(), n1.tail())
    m = RESUMED.search(n0.stderr)
    assert m and int(m.group(2)) == from_step, n0.tail()
    # each rank fetched the common files and its own; none of the other rank's
    got = {p.relative_to(d).as_posix() for d in (work / "node1").glob("*/rank1/resume/step-*")
           for p in d.rglob("*") if p.is_file()}
    assert "rng_state_1.pth" in got and "trainer_state.json" in got, sorted(got)
    assert not [f for f in got if "rank_0_" in f or f == "rng_state_0.pth"], sorted(got)


def _check_final(s3: S3Server, prefix: str, ref: str, tmp: Path, tol: float) -> None:
    """Complete, and close to the uninterrupted run: the same loss sequence (to 5e-3), eval
    loss (to 2e-3) and weight update (`tol`, relative; test_distributed.py asks 0.05 of a ZeRO
    resume; on CPU with one thread per rank it is bitwise, 0.0 measured)."""
    c = s3.client()
    committed, partial = _checkpoints(c, BUCKET, prefix)
    assert len(committed) == 2 and committed[-1] == 16 and not partial, (committed, partial)
    man = json.loads(read(c, BUCKET, f"{prefix}/checkpoints/step-000016/COMMITTED"))
    assert man["world_size"] == 2 and "_parts/node-001.json" in man["files"]
    assert "_SUCCESS" in list_objects(c, BUCKET, prefix)
    got, want = (json.loads(read(c, BUCKET, f"{p}/metrics/summary.json")) for p in (prefix, ref))
    assert got["steps"] == want["steps"] == 16
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=2e-3)
    losses = [[s for s, *_ in loss_sequence(c, BUCKET, p)] for p in (prefix, ref)]
    assert losses[0] == losses[1] == list(range(1, 17))
    assert [x[1] for x in loss_sequence(c, BUCKET, prefix)] == pytest.approx(
        [x[1] for x in loss_sequence(c, BUCKET, ref)], rel=5e-3)
    for p in (prefix, ref):
        (tmp / p).mkdir()
        (tmp / p / "model.safetensors").write_bytes(read(c, BUCKET, f"{p}/model/model.safetensors"))
    _assert_same_update(tmp / prefix / "model.safetensors", tmp / ref / "model.safetensors", tol)


def _checkpoints(c: object, bucket: str, prefix: str) -> tuple[list[int], list[int]]:
    """(committed, partial) steps; each committed one holds exactly its manifest's files, both
    ranks' ZeRO partitions and RNG states, and the trainer state at its own step."""
    committed, partial = [], []
    for step, objs in sorted(step_dirs(c, bucket, prefix).items()):
        if "COMMITTED" not in objs:
            partial.append(step)
            continue
        committed.append(step)
        man = json.loads(read(c, bucket, f"{prefix}/checkpoints/step-{step:06d}/COMMITTED"))
        have = {k: o["Size"] for k, o in objs.items() if k != "COMMITTED"}
        assert have == man["files"], f"step-{step:06d}: {sorted(have)} != {sorted(man['files'])}"
        assert set(man["checksums"]) == set(have)
        for rank in (0, 1):
            assert f"rng_state_{rank}.pth" in have
            assert f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in have
        state = json.loads(read(c, bucket, f"{prefix}/checkpoints/step-{step:06d}/trainer_state.json"))
        assert state["global_step"] == step
    return committed, partial


def _assert_same_update(got_path: Path, ref_path: Path, tol: float) -> None:
    from sft_job.models.builtin import build_builtin

    base = load_file(str(build_builtin("builtin:tiny-llama") / "model.safetensors"))
    got, ref = load_file(str(got_path)), load_file(str(ref_path))
    assert got.keys() == ref.keys() == base.keys()
    err = sum(float(((got[k] - ref[k]) ** 2).sum()) for k in got)
    moved = sum(float(((ref[k] - base[k]) ** 2).sum()) for k in got)
    assert moved > 0, "training changed nothing"
    assert (err / moved) ** 0.5 < tol, f"updates differ by {(err / moved) ** 0.5:.3f} (relative)"


def test_zero2_two_nodes_stop_then_resume_from_the_bucket_alone(
        s3: S3Server, reference: dict[str, Path], sft_cache: Path, tmp_path: Path) -> None:
    prefix = "zero2"
    stopped, log0 = _stop(s3, sft_cache, prefix, "zero2", tmp_path / "w", kill_uploader=False)
    assert f"checkpoint step-{stopped:06d} committed" in log0
    committed, _ = _checkpoints(s3.client(), BUCKET, prefix)
    assert committed[-1] == stopped
    _resume(s3, sft_cache, prefix, "zero2", tmp_path / "w", stopped)
    _check_final(s3, prefix, reference["zero2"], tmp_path, tol=1e-3)


def test_zero3_uploader_killed_mid_upload_resumes_from_the_previous_checkpoint(
        s3: S3Server, reference: dict[str, Path], sft_cache: Path, tmp_path: Path) -> None:
    prefix = "zero3"
    stopped, log0 = _stop(s3, sft_cache, prefix, "zero3", tmp_path / "w", kill_uploader=True)
    assert re.search(rf"checkpoint step-{stopped:06d} is not committed", log0), log0[-3000:]
    committed, partial = _checkpoints(s3.client(), BUCKET, prefix)
    assert committed == [4] and partial and min(partial) > 4, (committed, partial)
    _resume(s3, sft_cache, prefix, "zero3", tmp_path / "w", 4)
    _check_final(s3, prefix, reference["zero3"], tmp_path, tol=1e-3)


def test_the_launcher_gives_its_ranks_the_whole_stop_budget(
        s3: S3Server, sft_cache: Path, tmp_path: Path) -> None:
    """Two ranks on one node (DDP): on SIGTERM torch's launcher kills its ranks 30 s after
    passing the signal on, unless told otherwise; with output.stop_budget_seconds=60 a stop
    checkpoint whose upload takes over 30 s (every checkpoint request held 12 s) still commits."""
    prefix = "budget"
    args = ["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri=s3://{BUCKET}/{prefix}"]
    for s in ("train.logging_steps=1", "train.max_steps=400", "output.stop_budget_seconds=60",
              "eval.num_samples=0"):
        args += ["--set", s]
    with recording_proxy(s3.url) as (proxy, rec):
        rec.delay_s, rec.delay_match = 12.0, rf"^PUT /{BUCKET}/{prefix}/checkpoints/"
        env = {**proxy.env_for(s3), **env_threads(), "NPROC_PER_NODE": "2",
               "MASTER_PORT": str(free_port()), "SFT_JOB_WORKDIR": str(tmp_path)}
        with job(args, sft_cache, env) as j:
            j.wait_step(3)
            t0 = time.monotonic()
            j.send(signal.SIGTERM)
            assert j.wait(120) == 75, j.tail()
    m = re.search(r"checkpoint (step-\d+) committed to \S+ in ([\d.]+)s", j.stderr)
    assert m, j.tail()
    assert j.line_time(m.group(0)) - t0 > 30  # past torch's default, within the budget
    assert f"{m.group(1)}/COMMITTED" in list_objects(s3.client(), BUCKET, f"{prefix}/checkpoints")
