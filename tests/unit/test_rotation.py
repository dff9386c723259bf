"""checkpoint/uploader.py Uploader: commit, rotation to `keep`, and the clean-up of uploads a
preempted run left unfinished. Local storage (the same Store interface the buckets use; the
S3 path of rotation is covered end to end in tests/e2e/test_preempt.py)."""

from __future__ import annotations

from pathlib import Path

from sft_job import storage
from sft_job.checkpoint.commit import step_name
from sft_job.checkpoint.uploader import Uploader


def _folder(tmp: Path, step: int) -> Path:
    d = tmp / "staging" / step_name(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"w" * (100 + step))
    (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return d


def _dirs(root: Path) -> dict[str, bool]:
    return {p.name: (p / "COMMITTED").exists() for p in sorted(root.iterdir())}


def test_rotation_keeps_the_newest_and_removes_stale_partial_uploads(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket" / "checkpoints"
    # a preempted earlier run: step 10 committed, step 30 and 60 cut short mid-upload
    storage.put_dir(_folder(tmp_path / "old", 10), str(bucket / step_name(10)), commit=True)
    for step in (30, 60):
        partial = bucket / step_name(step)
        partial.mkdir(parents=True)
        (partial / "model.safetensors").write_bytes(b"half")
    assert _dirs(bucket) == {"step-000010": True, "step-000030": False, "step-000060": False}

    up = Uploader(str(bucket), keep=2)
    up.submit(20, _folder(tmp_path, 20))
    assert up.wait(timeout=60)
    # step 30 is newer than anything committed: it may still be resumed over, so it stays
    assert _dirs(bucket) == {"step-000010": True, "step-000020": True, "step-000030": False,
                             "step-000060": False}
    up.submit(40, _folder(tmp_path, 40))
    assert up.wait(timeout=60)
    # keep=2: step 10 goes; the unfinished step 30 is older than the committed 40: it goes too
    assert _dirs(bucket) == {"step-000020": True, "step-000040": True, "step-000060": False}
    up.submit(60, _folder(tmp_path, 60))  # this run reaches 60: the upload replaces the half one
    assert up.wait(timeout=60)
    up.close()
    assert _dirs(bucket) == {"step-000040": True, "step-000060": True}
    assert (bucket / "step-000060" / "model.safetensors").read_bytes() == b"w" * 160
    assert storage.latest_committed(str(bucket)).endswith("step-000060")
