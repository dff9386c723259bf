"""progress.json as the job writes it (sft_job.progress.Reporter), on local storage: written
only once started, a heartbeat while finishing, the outcome on the way out, attempts counted
across a resume. The Reporter inside a whole job is covered by tests/e2e/test_trackers.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from sft_job.errors import DataError, Preempted
from sft_job.progress import Reporter
from sft_job.specload import load_spec
from tests.conftest import REPO


def _spec(out: Path, every: float = 60.0):
    return load_spec(str(REPO / "jobs/smoke-cpu.yaml"),
                     [f"output.uri={out}", f"output.progress_every_seconds={every}"])


def _read(out: Path) -> dict:
    return json.loads((out / "progress.json").read_text())


def test_nothing_is_written_before_start(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError), Reporter(_spec(out)):
        raise DataError("bad row")  # a job refused by its checks leaves the output alone
    assert not out.exists()


def test_phases_heartbeat_and_outcome(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(Preempted), Reporter(_spec(out, every=0.2)) as rep:
        rep.start(tmp_path / "stage", resume_step=None)
        assert rep.flush(10)
        first = _read(out)
        assert (first["phase"], first["step"], first["attempt"]) == ("starting", 0, 1)
        rep.update(step=3)  # throttled: not forced, written with the next write
        rep.finishing()
        time.sleep(1.3)  # heartbeats every 0.2 s while finishing (updated_at has 1 s resolution)
        assert rep.flush(10)
        beat = _read(out)
        assert beat["phase"] == "finishing" and beat["step"] == 3
        assert beat["updated_at"] > first["updated_at"]
        raise Preempted("preempted by SIGTERM at step 3: checkpoint step-000003 committed")
    end = _read(out)
    assert end["phase"] == "preempted" and end["exit_code"] == 75
    assert end["error"].startswith("preempted by SIGTERM at step 3")

    with Reporter(_spec(out)) as rep:  # the rerun resumes from step 3: attempt 2, same start
        rep.start(tmp_path / "stage", resume_step=3)
    again = _read(out)
    assert (again["phase"], again["attempt"], again["resumed_from_step"]) == ("done", 2, 3)
    assert again["started_at"] == first["started_at"] and "exit_code" not in again

    with pytest.raises(ValueError), Reporter(_spec(out)) as rep:  # a fresh start: attempt 1
        rep.start(tmp_path / "stage", resume_step=None)
        raise ValueError("a bug")
    bug = _read(out)
    assert (bug["phase"], bug["exit_code"], bug["attempt"]) == ("failed", 1, 1)
    assert bug["error"] == "ValueError: a bug"
