"""train.report_to in the spec: validation, what the trainer gets, and that trackers never
change the run's identity (hash, resume check). The trackers themselves run for real in
tests/e2e/test_trackers.py."""

from __future__ import annotations

import sys

import pytest

from sft_job.checkpoint.sync import _changed_fields, run_state
from sft_job.errors import SpecError
from sft_job.specload import load_spec
from sft_job.train import trackers
from tests.conftest import REPO

SMOKE = str(REPO / "jobs/smoke-cpu.yaml")


def test_report_to_values() -> None:
    assert load_spec(SMOKE).train.report_to == []
    spec = load_spec(SMOKE, ["train.report_to=[mlflow, tensorboard]"])
    assert trackers.trainer_args(spec) == {"report_to": ["mlflow", "tensorboard"],
                                           "run_name": "smoke-cpu"}
    assert trackers.trainer_args(load_spec(SMOKE)) == {"report_to": "none", "run_name": "smoke-cpu"}
    with pytest.raises(SpecError, match=r"train.report_to.0: Input should be 'tensorboard', "):
        load_spec(SMOKE, ["train.report_to=[comet]"])
    with pytest.raises(SpecError, match=r"train.report_to: wandb listed more than once"):
        load_spec(SMOKE, ["train.report_to=[wandb, wandb]"])


def test_trackers_are_not_part_of_the_run() -> None:
    """Adding a tracker to a preempted run's spec still resumes it, and a checkpoint written
    before the field existed (no report_to in its state) is the same run."""
    plain, tracked = load_spec(SMOKE), load_spec(SMOKE, ["train.report_to=[tensorboard]"])
    assert plain.run_hash() == tracked.run_hash()
    old = run_state(plain, [])
    assert "report_to" not in old["spec"]["train"]
    assert _changed_fields(old, run_state(tracked, [])) == []
    other = load_spec(SMOKE, ["train.learning_rate=0.1"])
    assert _changed_fields(old, run_state(other, [])) == ["spec train.learning_rate"]


def test_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec: not installed
    assert trackers.missing(["tensorboard", "mlflow"]) == [
        "mlflow is not installed; install the extra: pip install 'sft-job[mlflow]'"]
