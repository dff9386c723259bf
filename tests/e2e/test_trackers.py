"""Trackers and progress end to end: the CLI as a real subprocess, output in S3 (moto on
loopback), `train.report_to: [tensorboard, wandb, mlflow]`, SIGTERM mid-run, then a rerun.

Each tracker is real and read back with its own reader: TensorBoard's EventAccumulator on the
event files downloaded from output.uri/metrics/tensorboard/, W&B in offline mode (its .wandb
record files decoded with wandb's own protobufs), MLflow with a local file store through
MlflowClient. After the resume every curve continues the step axis: each step 1..N once, the
same run (W&B id, MLflow run id) across both attempts. `sft-job status` reads the bucket in
between (preempted, checkpoint, exit 75) and at the end (done). A tracker that is not
installed (simulated: a sitecustomize that hides the package from the import system, as
uninstalling it from the shared venv is not an option) stops the job with exit 2 before
anything is written.

Time on 2 busy cores: about 60 s (two short training runs and a few CLI calls).
"""

from __future__ import annotations

import contextlib
import glob
import json
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, cli_env, run_cli
from tests.e2e.preempt_helpers import PREEMPTED, RESUMED, env_threads, job, read
from tests.servers import S3Server, s3_server, use_env

BUCKET = "tracker-tests"
MAX_STEPS = 8
TRACKERS = "train.report_to=[tensorboard,wandb,mlflow]"


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server(buckets=[BUCKET]) as server:
        yield server


def _args(prefix: str, *extra: str) -> list[str]:
    sets = [f"output.uri=s3://{BUCKET}/{prefix}", TRACKERS, f"train.max_steps={MAX_STEPS}",
            "train.logging_steps=1", "output.save_every_steps=2", *extra]
    return ["run", "jobs/smoke-cpu.yaml", *[a for s in sets for a in ("--set", s)]]


def _status(uri: str, cache: Path, env: dict[str, str]) -> dict[str, Any]:
    r = run_cli(["status", uri, "--json"], cache, timeout=120, **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _tb_scalars(client: Any, prefix: str, dest: Path) -> dict[str, list[tuple[int, float]]]:
    """Download output.uri/metrics/tensorboard/ and read it with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pre = f"{prefix}/metrics/tensorboard/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=pre).get("Contents", [])]
    assert keys, f"no TensorBoard files under s3://{BUCKET}/{pre}"
    dest.mkdir(parents=True)
    for k in keys:
        (dest / k.rsplit("/", 1)[-1]).write_bytes(read(client, BUCKET, k))
    acc = EventAccumulator(str(dest))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _wandb_runs(root: Path) -> list[dict[str, Any]]:
    """Every offline W&B run under root: id, name, history rows and exit code, decoded from
    the .wandb files (a LevelDB-style log of wandb's Record protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, buf = Path(path).read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        run: dict[str, Any] = {"history": []}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if n == 0 and kind == 0:
                break
            buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
            if kind not in (1, 4):  # first/middle fragments: wait for the last one
                continue
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            which = rec.WhichOneof("record_type")
            if which == "run":
                run.update(id=rec.run.run_id, name=rec.run.display_name)
            elif which == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in rec.history.item})
            elif which == "exit":
                run["exit_code"] = rec.exit.exit_code
        runs.append(run)
    return runs


def _steps(rows: list[dict[str, Any]], key: str) -> list[int]:
    return [r["train/global_step"] for r in rows if key in r]


def test_trackers_continue_across_a_preemption(s3: S3Server, sft_cache: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from sft_job.status import read_status

    use_env(monkeypatch, s3.env)  # read_status in this process, while the job runs
    uri = f"s3://{BUCKET}/run"
    env = {**s3.env, **env_threads(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
           "MLFLOW_ALLOW_FILE_STORE": "true", "SFT_JOB_WORKDIR": str(tmp_path / "work1")}
    # the status as `sft-job status` sees it while the job runs, polled from the side: the
    # tiny job trains 8 steps in ~2 s, too fast to read between a step and the SIGTERM
    seen: list[dict[str, Any]] = []
    polling = threading.Event()

    def poll() -> None:
        while not polling.is_set():
            with contextlib.suppress(Exception):  # no run there yet (NoRunError), ...
                seen.append(read_status(uri))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    with job(_args("run"), sft_cache, env) as j:
        poller.start()
        j.wait_step(3)
        j.send(signal.SIGTERM)
        rc = j.wait(300)
    polling.set()
    poller.join(30)
    assert rc == 75, j.tail()
    stopped = int(PREEMPTED.search(j.stderr).group(2))
    running = [st for st in seen if st.get("phase") == "training" and (st.get("step") or 0) >= 2]
    assert running, [(st.get("phase"), st.get("step")) for st in seen]
    assert running[-1]["max_steps"] == MAX_STEPS, running[-1]
    assert running[-1]["eta"] is not None, running[-1]  # written at the step-2 save
    st = _status(uri, sft_cache, s3.env)
    assert st["phase"] == "preempted" and st["exit_code"] == 75, st
    assert st["checkpoint"]["step"] == stopped and st["step"] == stopped
    assert st["name"] == "smoke-cpu" and st["model"] == "builtin:tiny-llama"
    client = s3.client()
    early = _tb_scalars(client, "run", tmp_path / "tb-early")  # uploaded with the checkpoint
    assert [s for s, _ in early["train/loss"]] == list(range(1, stopped + 1))

    env["SFT_JOB_WORKDIR"] = str(tmp_path / "work2")  # a new machine: only the bucket is left
    with job(_args("run"), sft_cache, env) as j2:
        assert j2.wait(300) == 0, j2.tail()
    assert int(RESUMED.search(j2.stderr).group(2)) == stopped
    st = _status(uri, sft_cache, s3.env)
    assert st["phase"] == "done" and st["step"] == MAX_STEPS, st
    assert st["attempt"] == 2 and st["eval_loss"] is not None

    losses = [(r["step"], r["loss"]) for r in map(json.loads, read(
        client, BUCKET, "run/metrics/metrics.jsonl").decode().splitlines()) if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, MAX_STEPS + 1))

    tb = _tb_scalars(client, "run", tmp_path / "tb-final")
    assert [s for s, _ in tb["train/loss"]] == list(range(1, MAX_STEPS + 1))  # once each
    assert [v for _, v in tb["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert [s for s, _ in tb["eval/loss"]] == [MAX_STEPS]

    wb = _wandb_runs(tmp_path)
    assert len(wb) == 2 and wb[0]["id"] == wb[1]["id"] == st["trackers"]["wandb_run_id"]
    assert [r["name"] for r in wb] == ["smoke-cpu"] * 2
    assert [r.get("exit_code") for r in wb] == [75, 0]
    assert _steps(wb[0]["history"], "train/loss") == list(range(1, stopped + 1))
    assert _steps(wb[1]["history"], "train/loss") == list(range(stopped + 1, MAX_STEPS + 1))
    assert _steps(wb[1]["history"], "eval/loss") == [MAX_STEPS]

    _check_mlflow(tmp_path / "mlruns", st["trackers"]["mlflow_run_id"], losses)


def _check_mlflow(store: Path, run_id: str, losses: list[tuple[int, float]]) -> None:
    code = f"""
import json, mlflow
c = mlflow.tracking.MlflowClient({store.as_uri()!r})
runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
r = c.get_run({run_id!r})
print(json.dumps({{"runs": len(runs), "name": r.info.run_name, "status": r.info.status,
  "loss": sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "loss")),
  "eval": [m.step for m in c.get_metric_history(r.info.run_id, "eval_loss")]}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**cli_env(Path("/nonexistent")), "MLFLOW_ALLOW_FILE_STORE": "true"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["runs"] == 1 and got["name"] == "smoke-cpu" and got["status"] == "FINISHED"
    assert [s for s, _ in got["loss"]] == list(range(1, MAX_STEPS + 1))
    assert [v for _, v in got["loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert got["eval"] == [MAX_STEPS]


@pytest.mark.parametrize("command", ["run", "validate"])
def test_missing_tracker_is_exit_2_before_anything_is_written(command: str, sft_cache: Path,
                                                              tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    out = tmp_path / "out"
    r = run_cli([command, "jobs/smoke-cpu.yaml", "--set", f"output.uri={out}",
                 "--set", "train.report_to=[tensorboard,wandb]"], sft_cache, timeout=300,
                PYTHONPATH=str(hide), SFT_JOB_WORKDIR=str(tmp_path / "work"))
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "train.report_to" in err[0] and "sft-job[wandb]" in err[0], r.stderr
    assert "tensorboard" not in err[0] and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_tensorboard_resume_hides_what_a_killed_attempt_logged_past_the_checkpoint(
        tmp_path: Path) -> None:
    """An attempt killed at step 6 had logged steps 1-6, its last checkpoint is step 4: the
    resumed attempt's writer purges 5-6, so TensorBoard shows each step once, the new values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from sft_job.specload import load_spec
    from sft_job.train.trackers import Trackers

    logdir = tmp_path / "tb"
    old = SummaryWriter(str(logdir))
    for step in range(1, 7):
        old.add_scalar("train/loss", 10.0 + step, step)
    old.close()
    spec = load_spec(str(REPO / "jobs/smoke-cpu.yaml"), ["train.report_to=[tensorboard]"])
    tr = Trackers(spec, logdir)
    tr.open(resume_step=4, previous_ids={})
    for step in range(5, 9):
        tr._tb_writer.add_scalar("train/loss", 20.0 + step, step)
    tr.close(0)
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0), (7, 27.0),
                   (8, 28.0)]


def test_tracker_that_cannot_start_is_exit_3_before_anything_is_written(sft_cache: Path,
                                                                        tmp_path: Path) -> None:
    """W&B online without an API key (none in the environment, an empty HOME): one line naming
    the tracker and what to set, exit 3, and nothing but the prepared data (which the rerun
    reuses) written to the output location: no job.yaml, progress, checkpoint or result."""
    out = tmp_path / "out"
    r = run_cli(["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri={out}",
                 "--set", "train.report_to=[tensorboard,wandb]"], sft_cache, timeout=300,
                WANDB_MODE="online", WANDB_API_KEY="", HOME=str(tmp_path / "home"),
                WANDB_DIR=str(tmp_path), SFT_JOB_WORKDIR=str(tmp_path / "work"))
    assert r.returncode == 3, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "train.report_to: wandb could not start its run" in err[0]
    assert "WANDB_API_KEY" in err[0] and "Traceback" not in r.stderr
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"prepared"}, \
        sorted(out.rglob("*"))
