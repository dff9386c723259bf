"""Hostile and careless runs (issue 15) that get as far as training, as real CLI subprocesses:
a run that diverges to NaN stops with exit 2, publishes nothing and keeps the checkpoints it
committed (all finite), with metrics.jsonl strict JSON; two runs on one S3 output (moto on
127.0.0.1): the second is refused naming the first, which finishes untouched; the same job
twice on one machine is refused at once by its work folder's lock.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, run_cli
from tests.servers import s3_server

DIVERGE = ["--set", "method.kind=full", "--set", "trainer.optim=sgd", "--set",
           "train.learning_rate=10", "--set", "train.max_grad_norm=1e30", "--set",
           "train.lr_scheduler=constant", "--set", "train.warmup_ratio=0", "--set",
           "train.max_steps=12", "--set", "train.logging_steps=1", "--set",
           "output.save_every_steps=2", "--set", "eval.num_samples=1", "--set",
           "eval.max_new_tokens=2", "--set", "data.eval_fraction=0"]


def _strict_json(line: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"{token} in metrics.jsonl")

    return json.loads(line, parse_constant=refuse)


def test_divergence_stops_with_nothing_published(tmp_path: Path, sft_cache: Path) -> None:
    """SGD at lr 10 without clipping blows the tiny model up to NaN weights after a few steps
    (deterministic on CPU): exit 2 naming the step, no model/adapter/_SUCCESS/_LEASE (progress.json
    says failed), the
    checkpoints committed before it finite, every metrics line strict JSON."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    r = run_cli(["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri={out}", *DIVERGE],
                sft_cache, SFT_JOB_WORKDIR=str(tmp_path / "w"))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train: training diverged at step"), last
    assert "nothing was published" in last and "Traceback" not in r.stderr
    names = {p.name for p in out.iterdir()}
    # the spec, the checkpoints before it, the prepared data (a rerun reuses it) and the status
    assert names == {"job.yaml", "checkpoints", "prepared", "progress.json"}, names
    progress = json.loads((out / "progress.json").read_text())
    assert progress["phase"] == "failed" and progress["exit_code"] == 2, progress
    committed = sorted(p for p in (out / "checkpoints").iterdir() if (p / "COMMITTED").is_file())
    assert committed, "the checkpoints before the divergence are kept"
    for ckpt in committed:
        for name, t in load_file(str(ckpt / "model.safetensors")).items():
            assert bool(t.isfinite().all()), f"{ckpt.name}/{name} is not finite"
        for line in (ckpt / "sft_job_metrics.jsonl").read_text().splitlines():
            _strict_json(line)
    local = next((tmp_path / "w").glob("smoke-cpu-*")) / "out" / "metrics" / "metrics.jsonl"
    rows = [_strict_json(ln) for ln in local.read_text().splitlines()]
    assert rows and all(math.isfinite(x) for r in rows for x in r.values()
                        if isinstance(x, float))


@pytest.fixture(scope="module")
def s3():
    with s3_server(["runs"]) as server:
        yield server


def _spec(tmp: Path, name: str, steps: int) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(
        f"name: {name}\nmodel: {{base: 'builtin:tiny-llama'}}\n"
        f"data: {{train: {REPO}/sft_job/sample_data/polite.jsonl, max_length: 64}}\n"
        f"train: {{max_steps: {steps}, batch_size: 2, logging_steps: 5}}\n"
        "eval: {num_samples: 0}\nbackend: cpu\noutput: {uri: 's3://runs/shared'}\n")
    return p


def test_a_second_run_on_the_same_output_is_refused(tmp_path: Path, sft_cache: Path, s3) -> None:
    """Run A holds s3://runs/shared; B (another job) is refused with exit 2 naming A, and C (A's
    spec again, same machine) is refused by the work folder's lock; A ends with its own
    job.yaml and model under _SUCCESS, and its lease deleted."""
    env = cli_env(sft_cache, **s3.env, SFT_JOB_WORKDIR=str(tmp_path / "w"))
    a_spec = _spec(tmp_path, "run-a", 60)
    a = subprocess.Popen([sys.executable, "-m", "sft_job", "run", str(a_spec)], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    c = s3.client()
    try:
        deadline = time.monotonic() + 300
        while not c.list_objects_v2(Bucket="runs", Prefix="shared/_LEASE").get("KeyCount"):
            assert a.poll() is None and time.monotonic() < deadline, "A never took the lease"
            time.sleep(0.2)
        b = run_cli(["run", str(_spec(tmp_path, "run-b", 2))], sft_cache, **s3.env,
                    SFT_JOB_WORKDIR=str(tmp_path / "w"))
        same = run_cli(["run", str(a_spec)], sft_cache, **s3.env,
                       SFT_JOB_WORKDIR=str(tmp_path / "w"))
        log, _ = a.communicate(timeout=600)
    finally:
        if a.poll() is None:
            a.kill()
    assert b.returncode == 2, b.stderr[-2000:]
    assert "in use by another run: job 'run-a'" in b.stderr.strip().splitlines()[-1]
    assert same.returncode == 2 and "already running on this machine" in same.stderr, same.stderr
    assert a.returncode == 0, log[-3000:]
    keys = {o["Key"] for o in c.list_objects_v2(Bucket="runs", Prefix="shared/")["Contents"]}
    assert "shared/_SUCCESS" in keys and "shared/_LEASE" not in keys
    job = c.get_object(Bucket="runs", Key="shared/job.yaml")["Body"].read().decode()
    assert "name: run-a" in job


def test_work_folders_are_keyed_by_output(tmp_path: Path, monkeypatch) -> None:
    """One spec, two outputs: two work folders (metrics never interleave)."""
    from sft_job.pipeline import workdir_for
    from sft_job.specload import load_spec

    monkeypatch.setenv("SFT_JOB_WORKDIR", str(tmp_path))
    one = workdir_for(load_spec(str(REPO / "jobs/smoke-cpu.yaml"), [f"output.uri={tmp_path}/a"]))
    two = workdir_for(load_spec(str(REPO / "jobs/smoke-cpu.yaml"), [f"output.uri={tmp_path}/b"]))
    assert one != two and one.parent == two.parent == tmp_path
