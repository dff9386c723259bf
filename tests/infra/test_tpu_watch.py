"""`make submit-tpu` as a managed run (WATCH=1): it recovers a Spot TPU slice from preemption.

The real Makefile target and scripts/tpu-vm/tpu.sh run against a scripted `gcloud` on PATH
(tests/infra/fake_gcloud.py: no Google Cloud here), with the real `sft-job status` reading the
job's output folder. Each test asserts the exact gcloud calls in order and the outcome: the
slice is preempted twice and the job exits 75 once, then it finishes (exit 0); a job that
exits 2 is not retried; recoveries and wall clock are bounded. About 15 s in all.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from k8s_helpers import REPO, make

WHERE = ["--project=proj-1", "--zone=us-west4-a"]
STAMP = r"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] "


def _label(argv: list[str]) -> str:
    """A short name for one gcloud call."""
    group, verb = argv[2], argv[3]
    if verb != "ssh":
        return {"queued-resources": "qr", "tpu-vm": "vm"}[group] + " " + verb
    (cmd,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return ("ssh status" if "sft-job-status" in cmd else "ssh restart" if "docker stop" in cmd
            and "docker run" in cmd else "ssh start" if "docker run" in cmd else
            "ssh stop" if "docker stop" in cmd else "ssh mkdir" if "mkdir" in cmd else "ssh ?")


def _managed_run(tmp_path: Path, slices: list[dict[str, Any]], *make_args: str,
                 workers: int = 1) -> tuple[Any, list[list[str]]]:
    """`make submit-tpu` (WATCH=1, the default) against the fake gcloud; returns the make
    result and the gcloud calls. make itself exits 2 on any failure of its recipe: the watch's
    own exit code is in its last line (see `_exit`) and is the exit code of tpu.sh run alone."""
    out = tmp_path / "out"
    spec = tmp_path / "job.yaml"
    spec.write_text(re.sub(r"uri: .*", f"uri: {out}", (REPO / "jobs/smoke-cpu.yaml").read_text()))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "gcloud").write_text(f"#!/bin/sh\nexec {sys.executable} "
                                 f"{REPO / 'tests/infra/fake_gcloud.py'} \"$@\"\n")
    (bin_ / "gcloud").chmod(0o755)
    scenario, log = tmp_path / "scenario.json", tmp_path / "gcloud.log"
    scenario.write_text(json.dumps({"slices": slices, "workers": workers, "output": str(out)}))
    import os

    r = make("submit-tpu", "PROJECT=proj-1", "ZONE=us-west4-a", "TAG=t9", f"JOB={spec}",
             "REGISTRY=us-docker.pkg.dev/proj-1/sft-job", "MAX_HOURS=0.03",  # a runaway loop ends
             *make_args, check=False,
             env_extra={"PATH": f"{bin_}:{os.environ['PATH']}", "TPU_POLL_SECONDS": "0",
                        "STAGE": str(tmp_path / "stage"), "FAKE_GCLOUD_SCENARIO": str(scenario),
                        "FAKE_GCLOUD_LOG": str(log)})
    calls = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    return r, calls


def _exit(r: Any) -> int:
    """The managed run's exit code, from its last line (make turns any non-zero into 2)."""
    m = re.search(r", exit (\d+)\n(\+ [^\n]*\n)?$", r.stdout)
    assert m, r.stdout + r.stderr
    assert r.returncode == (0 if m.group(1) == "0" else 2), r.stderr
    return int(m.group(1))


START = ["ssh mkdir", "vm scp", "ssh start"]
LOOK = ["qr describe", "vm describe"]


def test_recovers_from_preemptions_until_done(tmp_path: Path) -> None:
    slices = [
        {"qr": ["WAITING_FOR_RESOURCES", "ACTIVE"], "node": ["READY", "READY", "PREEMPTED"]},
        {"qr": ["WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "SUSPENDED"],
         "containers": ["exited 75"]},
        {"qr": ["ACTIVE"], "containers": ["running", "exited 0"]},
    ]
    r, calls = _managed_run(tmp_path, slices)
    assert _exit(r) == 0
    assert [_label(c) for c in calls] == [
        "qr describe", "qr create",                                # submit: not found -> create
        "qr describe",                                             # WAITING_FOR_RESOURCES
        *LOOK, *START,                                             # ACTIVE + READY: start
        *LOOK, "ssh status",                                       # running
        *LOOK, "qr delete", "qr create",                           # VM PREEMPTED: recreate
        "qr describe",                                             # WAITING_FOR_RESOURCES
        *LOOK, *START,
        *LOOK, "ssh status", "ssh restart",                        # exited 75: restart there
        "qr describe", "qr delete", "qr create",                   # SUSPENDED: recreate
        *LOOK, *START,
        *LOOK, "ssh status",                                       # running
        *LOOK, "ssh status", "qr delete",                          # exited 0: done, delete
    ]
    creates = [c for c in calls if _label(c) == "qr create"]
    assert all(c == creates[0] for c in creates) and "--spot" in creates[0]
    assert {"--node-id=sft-job-v5e", "--accelerator-type=v5litepod-8", *WHERE} <= set(creates[0])
    for c in calls:
        assert (c[4] == "sft-job-v5e" or c[5].startswith("sft-job-v5e:")) and set(WHERE) <= set(c)
        if _label(c) == "qr delete":
            assert {"--force", "--quiet"} <= set(c)
        if c[3] in ("ssh", "scp"):
            assert "--worker=all" in c
    (restart,) = [c for c in calls if _label(c) == "ssh restart"]
    (start, *_) = [c for c in calls if _label(c) == "ssh start"]
    cmd = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in restart if a.startswith("--command=")}
    assert cmd["--command"].startswith("sudo docker stop sft-job")
    assert cmd["--command"].endswith(start[-1].removeprefix("--command="))  # the same docker run
    lines = [ln for ln in r.stdout.splitlines() if re.match(STAMP, ln)]
    events = " | ".join(re.sub(STAMP, "", ln) for ln in lines)
    for want in ("recovery 1/10: the VM is PREEMPTED: delete and recreate",
                 "recovery 2/10: the job exited (t1v-worker-0:75) on a running slice: start",
                 "recovery 3/10: the queued resource is SUSPENDED: delete and recreate",
                 "the job is done (exit 0; output: done"):
        assert want in events, events
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_exit_2_is_not_retried_on_any_worker(tmp_path: Path) -> None:
    slices = [{"qr": ["ACTIVE"], "containers": ["exited 2"]}]
    r, calls = _managed_run(tmp_path, slices, "TPU_ACCELERATOR=v5litepod-16", workers=4)
    assert _exit(r) == 2
    assert [_label(c) for c in calls] == ["qr describe", "qr create", *LOOK, *START,
                                          *LOOK, "ssh status", "qr delete"]
    assert "the job exited 2 (t1v-worker-0:2 t1v-worker-1:2 t1v-worker-2:2 t1v-worker-3:2): " \
        "retrying cannot fix it" in r.stdout
    assert "recovery" not in r.stdout
    # tpu.sh itself (what make runs) exits with the job's code, for scripts that call it
    script = [ln for ln in (REPO / "mk/cluster.mk").read_text().splitlines()
              if "tpu.sh submit" in ln]
    assert script == ["\t@$(TPU_ENV) bash scripts/tpu-vm/tpu.sh submit"]
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TPU_POLL_SECONDS": "0",
           "PROJECT": "proj-1", "ZONE": "us-west4-a", "TPU_NAME": "sft-job-v5e",
           "TPU_ACCELERATOR": "v5litepod-8", "TPU_RUNTIME": "v2-alpha-tpuv5-lite",
           "JOB": str(tmp_path / "job.yaml"), "IMAGE": "reg.example/sft-job-tpu:t9",
           "PYTHON": str(REPO / ".venv/bin/python"), "WATCH": "1", "MAX_HOURS": "0.03",
           "STAGE": str(tmp_path / "stage"), "FAKE_GCLOUD_LOG": str(tmp_path / "direct.log"),
           "FAKE_GCLOUD_SCENARIO": str(tmp_path / "scenario.json")}
    (tmp_path / "scenario.json").write_text(json.dumps({"slices": slices}))
    direct = subprocess.run(["bash", "scripts/tpu-vm/tpu.sh", "submit"], cwd=REPO, env=env,
                            text=True, capture_output=True, timeout=120)
    assert direct.returncode == 2, direct.stdout + direct.stderr


def test_gives_up_after_max_recoveries(tmp_path: Path) -> None:
    slices = [{"qr": ["ACTIVE", "ACTIVE", "SUSPENDED"]}, {"qr": ["FAILED"]}]
    r, calls = _managed_run(tmp_path, slices, "MAX_RECOVERIES=1")
    assert _exit(r) == 1
    assert [_label(c) for c in calls] == ["qr describe", "qr create", *LOOK, *START,
                                          *LOOK, "ssh status", "qr describe", "qr delete",
                                          "qr create", "qr describe", "qr delete"]
    assert "giving up: the queued resource is FAILED: delete and recreate the queued resource " \
        "after 1 recoveries" in r.stdout


def test_wall_clock_limit_stops_the_job_and_deletes_the_slice(tmp_path: Path) -> None:
    r, calls = _managed_run(tmp_path, [{"qr": ["ACTIVE"]}], "MAX_HOURS=0")
    assert _exit(r) == 75
    assert [_label(c) for c in calls] == ["qr describe", "qr create", "ssh stop", "qr delete"]
    assert "wall-clock limit MAX_HOURS=0 reached" in r.stdout


def test_dry_run_prints_the_watch_plan(tmp_path: Path) -> None:
    r, calls = _managed_run(tmp_path, [], "DRY_RUN=1")
    assert r.returncode == 0 and calls == [], r.stderr
    plus = [shlex.split(ln[2:]) for ln in r.stdout.splitlines() if ln.startswith("+ ")]
    assert [_label(a[1:]) for a in plus] == [
        "qr describe", "qr create", "qr describe", *START, "vm describe", "ssh status",
        "qr delete"]
    assert "then watch (WATCH=1)" in r.stdout and "-m sft_job status" in r.stdout


@pytest.mark.parametrize("args", [("WATCH=0",)])
def test_watch_off_submits_once(tmp_path: Path, args: tuple[str, ...]) -> None:
    r, calls = _managed_run(tmp_path, [{"qr": ["ACTIVE"]}], *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [_label(c) for c in calls] == ["qr describe", "qr create", "qr describe", *START]
    assert "make tpu-watch" in r.stdout


@pytest.mark.parametrize(("after", "tail"), [
    ("exited 0", [*LOOK, "ssh status", "qr delete"]),   # the job exits: done
    ("preempted", ["qr describe", "qr delete"]),         # lost after _SUCCESS: not recreated
])
def test_success_waits_for_the_job_to_exit_and_is_never_redone(tmp_path: Path, after: str,
                                                               tail: list[str]) -> None:
    """_SUCCESS appears while the containers still run (the job closes its trackers): the
    watch waits for them to exit rather than deleting the slice under them, and a slice lost
    then is not recreated."""
    first = {"qr": ["ACTIVE"], "containers": ["running +success", "exited 0"]}
    if after == "preempted":
        first = {"qr": ["ACTIVE", "ACTIVE", "SUSPENDED"], "containers": ["running +success"]}
    r, calls = _managed_run(tmp_path, [first])
    assert _exit(r) == 0
    assert [_label(c) for c in calls] == ["qr describe", "qr create", *LOOK, *START,
                                          *LOOK, "ssh status", *tail]
    assert "recovery" not in r.stdout
    # a second submit finds _SUCCESS: nothing is created
    (tmp_path / "bin").rename(tmp_path / "bin-old")
    r2, calls2 = _managed_run(tmp_path, [first])
    assert r2.returncode == 0 and "the job is done already, nothing to submit" in r2.stdout
    assert len(calls2) == len(calls)  # the log only holds the first run's calls
