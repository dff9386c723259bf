"""Several ranks on CPU, for real: `sft-job run` starts two ranks itself (NPROC_PER_NODE=2,
torch's elastic launcher), DDP over gloo, and DeepSpeed ZeRO-2/ZeRO-3 over gloo.

DeepSpeed on CPU is a testing path only (the spec refuses it unless SFT_JOB_DEEPSPEED_ON_CPU=1);
it runs the same config generation, ZeRO partitioning, checkpointing and consolidation code
that GPUs run. The silent trap is closed: two ranks must split the data (different first
batches, half the steps), not train two copies of the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env

BASE = ["--set", "train.logging_steps=1", "--set", "eval.num_samples=1",
        "--set", "eval.max_new_tokens=4", "--set", "train.epochs=1"]


def _run(out: Path, cache: Path, *sets: str, nproc: int = 1, deepspeed: bool = False,
         work: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "sft_job", "run", "jobs/smoke-cpu.yaml",
            "--set", f"output.uri={out}", *BASE]
    for s in sets:
        args += ["--set", s]
    env = cli_env(cache, NPROC_PER_NODE=str(nproc), MASTER_PORT=str(29500 + os.getpid() % 1000),
                  SFT_JOB_WORKDIR=str(work or out.parent / f"work-{out.name}"))
    if deepspeed:
        env["SFT_JOB_DEEPSPEED_ON_CPU"] = "1"
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def _summary(out: Path) -> dict:
    return json.loads((out / "metrics/summary.json").read_text())


def _losses(out: Path) -> list[float]:
    lines = (out / "metrics/metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


@pytest.fixture(scope="module")
def single(sft_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 8: the reference for two ranks of batch 4."""
    out = tmp_path_factory.mktemp("single") / "out"
    res = _run(out, sft_cache, "train.batch_size=8")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _check_data_parallel(out: Path, single: Path) -> dict:
    s, ref = _summary(out), _summary(single)
    ranks = s["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["first_batch_sha"] != ranks[1]["first_batch_sha"], "both ranks saw the same data"
    assert s["steps"] == ref["steps"], "2 ranks x batch 4 must take the steps of 1 x batch 8"
    return s


def test_ddp_two_ranks_split_the_data(single: Path, sft_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    res = _run(out, sft_cache, "train.batch_size=4", nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 1]" not in res.stderr or "INFO [rank 1]" not in res.stderr  # rank 1 is quiet
    s = _check_data_parallel(out, single)
    # the data was prepared once, by rank 0; rank 1 waited for its commit and loaded it
    assert [r["prepared_data"] for r in s["ranks"]] == [True, False]
    assert res.stderr.count("data: preparing") == 1
    got, want = _losses(out), _losses(single)
    assert got == pytest.approx(want, rel=2e-3, abs=2e-3)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_ranks(stage: str, single: Path, sft_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / stage
    res = _run(out, sft_cache, "train.batch_size=4", f"deepspeed={stage}", nproc=2,
               deepspeed=True)
    assert res.returncode == 0, res.stderr[-4000:]
    s = _check_data_parallel(out, single)
    # the data was prepared once, by rank 0; rank 1 waited for its commit and loaded it
    assert [r["prepared_data"] for r in s["ranks"]] == [True, False]
    assert res.stderr.count("data: preparing") == 1
    got, want = _losses(out), _losses(single)
    assert got == pytest.approx(want, rel=5e-3, abs=5e-3)
    # The adapter (gathered from the ZeRO partitions) merged into a plain safetensors model.
    # Weights are not compared with the 1-process run: ZeRO normalises the loss per rank, and
    # Adam's first steps turn any tiny gradient difference into a full-size update (m/sqrt(v)
    # is +-1 elementwise), so the eval loss is the fair comparison.
    merged = load_file(str(out / "model/model.safetensors"))
    ref = load_file(str(single / "model/model.safetensors"))
    assert merged.keys() == ref.keys()
    assert all(merged[k].shape == ref[k].shape and merged[k].isfinite().all() for k in merged)
    assert _summary(out)["eval_loss"] == pytest.approx(_summary(single)["eval_loss"], rel=2e-3)


def _assert_same_update(got_path: Path, ref_path: Path, tol: float = 0.1) -> None:
    from sft_job.models.builtin import build_builtin

    base = load_file(str(build_builtin("builtin:tiny-llama") / "model.safetensors"))
    got, ref = load_file(str(got_path)), load_file(str(ref_path))
    assert got.keys() == ref.keys() == base.keys()
    err = sum(float(((got[k] - ref[k]) ** 2).sum()) for k in got)
    moved = sum(float(((ref[k] - base[k]) ** 2).sum()) for k in got)
    assert moved > 0, "training changed nothing"
    assert (err / moved) ** 0.5 < tol, f"updates differ by {(err / moved) ** 0.5:.3f} (relative)"


def test_zero3_full_finetune_resumes_and_consolidates(sft_cache: Path, tmp_path: Path) -> None:
    """Full fine-tune under ZeRO-3: SIGTERM mid-run commits a (partitioned) checkpoint and exits
    75; the rerun resumes from it; the final model is one consolidated safetensors file that
    plain transformers loads, close to an uninterrupted run."""
    sets = ("train.batch_size=4", "deepspeed=zero3", "method.kind=full",
            "train.learning_rate=1e-3", "train.max_steps=8")
    ref_out = tmp_path / "ref"
    ref = _run(ref_out, sft_cache, *sets, nproc=2, deepspeed=True)
    assert ref.returncode == 0, ref.stderr[-4000:]

    out = tmp_path / "run"
    args = [sys.executable, "-m", "sft_job", "run", "jobs/smoke-cpu.yaml",
            "--set", f"output.uri={out}", *BASE]
    for s in sets:
        args += ["--set", s]
    env = cli_env(sft_cache, NPROC_PER_NODE="2", SFT_JOB_DEEPSPEED_ON_CPU="1",
                  MASTER_PORT=str(29700 + os.getpid() % 200), SFT_JOB_WORKDIR=str(tmp_path / "w"))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "step 3/" in line or not line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=600)[1]
    assert proc.returncode == 75, (seen + rest)[-4000:]
    assert any((out / "checkpoints").glob("step-*/COMMITTED"))

    again = _run(out, sft_cache, *sets, nproc=2, deepspeed=True, work=tmp_path / "w2")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from committed checkpoint" in again.stderr
    files = sorted(p.name for p in (out / "model").glob("*.safetensors"))
    assert files == ["model.safetensors"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")
    _assert_same_update(out / "model/model.safetensors", ref_out / "model/model.safetensors",
                        tol=0.05)
