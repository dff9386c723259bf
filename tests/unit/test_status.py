"""`sft-job status`: the phase and facts of a run read back from its output location.

Run folders are laid out here as the job writes them (job.yaml, progress.json, committed
checkpoints, metrics/summary.json, _SUCCESS), locally and in S3 (moto on loopback); the CLI runs
as a subprocess for the exit codes (2: no run, 3: a bucket that cannot be read) and --watch.
A whole job writing these files for real is covered by tests/e2e/test_trackers.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sft_job import storage
from sft_job.errors import NoRunError
from sft_job.spec import dump_spec
from sft_job.specload import load_spec
from sft_job.status import read_status, render
from tests.conftest import REPO, cli_env
from tests.servers import S3Server, fault_proxy, s3_server, use_env

NOW = 1_800_000_000.0


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def lay_out(root: Path, progress: dict[str, Any] | None = None, ckpts: tuple[int, ...] = (),
            done: bool = False, job: bool = True) -> Path:
    """A run folder as the job leaves it."""
    root.mkdir(parents=True, exist_ok=True)
    if job:
        spec = load_spec(str(REPO / "jobs/smoke-cpu.yaml"), [f"output.uri={root}"])
        (root / "job.yaml").write_text(dump_spec(spec))
    if progress is not None:
        (root / "progress.json").write_text(json.dumps(progress))
    for step in ckpts:
        d = root / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text("{}")
        (d / "COMMITTED").write_text(json.dumps({"committed_at": iso(NOW - 120 + step),
                                                 "files": {"trainer_state.json": 2}}))
    (root / "checkpoints" / "step-000900").mkdir(parents=True)  # an upload cut short: ignored
    if done:
        (root / "metrics").mkdir()
        (root / "metrics" / "summary.json").write_text(json.dumps(
            {"steps": 1000, "train_loss": 1.5, "eval_loss": 1.6, "tokens_per_s": 900.0,
             "wall_s": 3600.0}))
        (root / "_SUCCESS").write_text("")
    return root


def training(ago: float = 20.0, **extra: Any) -> dict[str, Any]:
    return {"version": 1, "name": "smoke-cpu", "phase": "training", "step": 250,
            "max_steps": 1000, "epoch": 0.75, "train_loss": 2.25, "train_loss_step": 250,
            "eval_loss": 2.5, "eval_loss_step": 200, "tokens_per_s": 1234.5,
            "seconds_per_step": 2.0, "attempt": 2, "updated_at": iso(NOW - ago), **extra}


def test_training_run(tmp_path: Path) -> None:
    st = read_status(str(lay_out(tmp_path / "r", training(), ckpts=(100, 200))), now=NOW)
    assert st["phase"] == "training" and st["step"] == 250 and st["max_steps"] == 1000
    assert st["checkpoint"]["step"] == 200 and st["checkpoint"]["committed_at"] == iso(NOW + 80)
    assert (st["name"], st["model"], st["method"]) == ("smoke-cpu", "builtin:tiny-llama", "lora")
    assert st["data"] == "sft_job/sample_data/polite.jsonl"
    assert (st["train_loss"], st["eval_loss"], st["tokens_per_s"]) == (2.25, 2.5, 1234.5)
    # 750 steps left at 2 s from the last update, 20 s ago
    assert st["eta_s"] == 1480.0 and st["eta"] == iso(NOW - 20 + 1500)
    text = render(st)
    for line in ("phase       training (updated 20s ago)", "step        250 / 1000 (25.0%)",
                 "loss        train 2.2500 (step 250), eval 2.5000 (step 200)",
                 "speed       1,234 tokens/s, 2.00 s/step", "checkpoint  step-000200 committed"):
        assert line in text, text


@pytest.mark.parametrize(("progress", "ckpts", "done", "phase"), [
    (None, (), False, "not-started"),                               # job.yaml only
    ({"phase": "starting", "updated_at": iso(NOW - 5)}, (), False, "not-started"),
    (training(ago=31 * 60), (200,), False, "stalled"),               # no update for 31 min
    (training(phase="finishing", ago=60), (1000,), False, "finishing"),
    (training(phase="preempted", exit_code=75, error="preempted by SIGTERM"), (250,), False,
     "preempted"),
    (training(phase="preempted", ago=5 * 3600, exit_code=75), (250,), False, "preempted"),
    (training(phase="failed", exit_code=2, error="bad data"), (), False, "failed"),
    (None, (300,), False, "training"),                                # a run without progress.json
    (training(phase="finishing"), (1000,), True, "done"),
])
def test_phases(tmp_path: Path, progress: Any, ckpts: tuple[int, ...], done: bool,
                phase: str) -> None:
    st = read_status(str(lay_out(tmp_path / "r", progress, ckpts, done)), now=NOW)
    assert st["phase"] == phase, st
    assert (st["eta"] is not None) == (phase == "training" and progress is not None)
    if phase == "done":
        assert (st["step"], st["train_loss"], st["eval_loss"]) == (1000, 1.5, 1.6)
    if phase == "failed":
        assert "error       exit 2: bad data" in render(st)
    if phase == "stalled":
        assert "no progress for 31m" in render(st)


def test_no_run_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.txt").write_text("x")
    for uri in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(NoRunError, match="no sft-job run there"):
            read_status(str(uri))


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sft_job", "status", *args], cwd=REPO,
                          env=cli_env(Path("/nonexistent"), **(env or {})), capture_output=True,
                          text=True, timeout=timeout)


def test_cli_exit_codes_and_json(tmp_path: Path) -> None:
    r = _cli(str(tmp_path / "nothing"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "no sft-job run" in r.stderr
    run = lay_out(tmp_path / "r", training(ago=0), ckpts=(200,))
    r = _cli(str(run), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["phase"] == "training" and st["checkpoint"]["name"] == "step-000200"


def test_watch_refreshes_until_done(tmp_path: Path) -> None:
    """--watch prints a line per refresh while the run trains and stops after `done`; the run
    finishes only once two refreshes were read (a fixed sleep raced a slow start under load)."""
    run = lay_out(tmp_path / "r", training(ago=0), ckpts=(200,))
    p = subprocess.Popen([sys.executable, "-m", "sft_job", "status", str(run), "--json", "--watch",
                          "--interval", "0.2"], cwd=REPO, env=cli_env(Path("/nonexistent")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        lines = [p.stdout.readline(), p.stdout.readline()]
        (run / "_SUCCESS").write_text("")
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    phases = [json.loads(ln)["phase"] for ln in lines + out.splitlines()]
    assert len(phases) >= 3 and phases[-1] == "done" and set(phases[:-1]) == {"training"}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server(buckets=["runs"]) as server:
        yield server


def test_status_of_a_run_in_s3(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, s3.env)
    local = lay_out(tmp_path / "r", training(), ckpts=(100, 200))
    for sub in ("checkpoints/step-000100", "checkpoints/step-000200"):
        storage.put_dir(local / sub, f"s3://runs/x/{sub}", commit=True)
    for f in ("job.yaml", "progress.json"):
        storage.put_file(local / f, f"s3://runs/x/{f}")
    st = read_status("s3://runs/x", now=NOW)
    assert st["phase"] == "training" and st["checkpoint"]["step"] == 200
    assert st["name"] == "smoke-cpu" and st["step"] == 250
    r = _cli("s3://runs/x", "--json", env=s3.env)
    assert r.returncode == 0 and json.loads(r.stdout)["checkpoint"]["uri"] == \
        "s3://runs/x/checkpoints/step-000200"
    r = _cli("s3://runs/nothing-here", env=s3.env)
    assert r.returncode == 2, r.stderr
    r = _cli("s3://no-such-bucket/x", env=s3.env)
    assert r.returncode == 3 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    with fault_proxy(s3.url, match=r"^GET /runs") as proxy:  # every read of the bucket: 403
        proxy.fail_next(1000, "deny")
        r = _cli("s3://runs/x", env=proxy.env_for(s3))
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: s3://runs/")
