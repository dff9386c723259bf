"""checkpoint/sync.py callback: a stop request during a periodic save makes that save the stop
checkpoint (no further step); during a training-time evaluation it aborts the evaluation; the
final evaluation (finish phase) is never aborted.

The callback is driven with the real transformers objects the Trainer passes it (arguments,
state, control) and a real uploader process on a local store; the Trainer's loop itself is run
end to end in tests/e2e/test_preempt.py, where the moment of a signal cannot be pinned to the
few milliseconds a tiny model's save takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_job import storage
from sft_job.checkpoint.preempt import StopFlag
from sft_job.checkpoint.sync import STATE_FILE, EvalAborted, callback
from sft_job.checkpoint.uploader import Uploader
from sft_job.spec import load_spec
from tests.conftest import REPO


def _parts(tmp_path: Path) -> tuple[object, object]:
    from transformers import TrainingArguments

    spec = load_spec(str(REPO / "jobs/smoke-cpu.yaml"), [f"output.uri={tmp_path / 'out'}"])
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), use_cpu=True,
                             report_to="none", save_total_limit=2)
    return spec, args


def _saved(args: object, step: int) -> None:
    d = Path(args.output_dir) / f"checkpoint-{step}"  # type: ignore[attr-defined]
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / "optimizer.pt").write_bytes(b"o" * step)


def test_stop_during_a_periodic_save_makes_it_the_stop_checkpoint(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    spec, args = _parts(tmp_path)
    uri = str(tmp_path / "out" / "checkpoints")
    up = Uploader(uri, keep=2)
    stop = StopFlag()
    try:
        cb = callback(spec, up, stop, {"spec_hash": "h"}, tmp_path / "m.jsonl", tmp_path / "stg")
        _saved(args, 2)
        control = cb.on_save(args, TrainerState(global_step=2), TrainerControl())
        assert not control.should_training_stop and cb.stopped_at is None
        assert up.wait(60)
        _saved(args, 4)
        stop.requested, stop.signame = True, "SIGTERM"  # arrived while step 4 was being saved
        control = cb.on_save(args, TrainerState(global_step=4), TrainerControl())
        assert control.should_training_stop and cb.stopped_at == cb.last_saved == 4
        assert up.wait(60) and up.status == {2: "committed", 4: "committed"}
    finally:
        up.kill()
    latest = storage.latest_committed(uri)
    assert latest and latest.endswith("step-000004")
    state = json.loads(Path(latest, STATE_FILE).read_text())
    assert state["step"] == 4 and "eval_pending" not in state


def test_stop_aborts_a_training_evaluation_only(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    spec, args = _parts(tmp_path)
    stop = StopFlag()
    cb = callback(spec, None, stop, {}, tmp_path / "m.jsonl", tmp_path / "stg")
    state, control = TrainerState(global_step=6), TrainerControl()
    cb.on_train_begin(args, state, control)
    cb.on_prediction_step(args, state, control)  # no stop: the evaluation goes on
    stop.requested = True
    with pytest.raises(EvalAborted):
        cb.on_prediction_step(args, state, control)
    assert cb.eval_aborted_at == cb.stopped_at == 6
    cb.on_train_end(args, state, control)  # the finish phase: its evaluation runs to the end
    cb.on_prediction_step(args, state, control)
