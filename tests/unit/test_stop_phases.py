"""checkpoint/sync.py callback: a stop request during a periodic save makes that save the stop
checkpoint (no further step); a stop that abandoned a training-time evaluation is recorded in
the checkpoint, so the resumed run evaluates that step first.

The callback is driven with the real transformers objects the Trainer passes it (arguments,
state, control) and a real uploader process on a local store; the Trainer's loop itself is run
end to end in tests/e2e/test_preempt.py, where the moment of a signal cannot be pinned to the
few milliseconds a tiny model's save takes."""

from __future__ import annotations

import json
from pathlib import Path

from sft_job import storage
from sft_job.checkpoint.preempt import StopFlag
from sft_job.checkpoint.sync import STATE_FILE, callback
from sft_job.checkpoint.uploader import Uploader
from sft_job.specload import load_spec
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


def test_a_stop_that_abandoned_an_evaluation_is_recorded(tmp_path: Path) -> None:
    """Step 6 is an evaluation step (train.eval_steps=6): when the stop left its evaluation
    undone (no eval_loss logged at 6) the checkpoint says so, for the resumed run to evaluate
    first; when the evaluation was logged, it does not."""
    from transformers import TrainerControl, TrainerState

    spec, args = _parts(tmp_path)
    uri = str(tmp_path / "out" / "checkpoints")
    stop = StopFlag(requested=True, signame="SIGTERM")
    up = Uploader(uri, keep=5)
    try:
        cb = callback(spec, up, stop, {}, tmp_path / "m.jsonl", tmp_path / "stg", eval_every=6)
        for step, evaluated in ((6, False), (12, True)):
            state = TrainerState(global_step=step, max_steps=18)
            if evaluated:
                cb.on_log(args, state, TrainerControl(), logs={"eval_loss": 1.0})
            _saved(args, step)
            control = cb.on_save(args, state, TrainerControl())
            assert control.should_training_stop
            assert up.wait(60) and up.status[step] == "committed"
    finally:
        up.kill()
    saved = {s: json.loads(Path(uri, f"step-{s:06d}", STATE_FILE).read_text()) for s in (6, 12)}
    assert saved[6]["eval_pending"] is True and "eval_pending" not in saved[12]
