"""The storage verbs behave the same on a local path, moto's S3 server and the GCS emulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_job import storage
from sft_job.errors import AccessError
from sft_job.storage import COMMIT_MARKER, join
from tests.storage.conftest import tree


def test_folder_round_trip_with_commit_marker(root: str, folder: Path, tmp_path: Path) -> None:
    uri = join(root, "run", "checkpoints", "step-0000010")
    storage.put_dir(folder, uri)

    assert storage.list_keys(uri) == sorted([*tree(folder), COMMIT_MARKER])
    assert storage.is_committed(uri)
    info = storage.list_info(uri)
    assert info["model.safetensors"].size == (folder / "model.safetensors").stat().st_size
    if root.startswith("s3://"):  # 20 MiB in 16 MiB parts: a real multipart upload
        assert info["model.safetensors"].etag.endswith("-2")

    out = storage.get_dir(uri, tmp_path / "out")
    got = tree(out)
    assert b"model.safetensors" in got.pop(COMMIT_MARKER)  # the marker holds a manifest
    assert got == tree(folder)


def test_file_verbs(root: str, small: Path, tmp_path: Path) -> None:
    uri = join(root, "data", "train.json")
    storage.put_file(small / "config.json", uri)
    assert storage.exists(uri)
    assert not storage.exists(join(root, "data", "nope.json"))
    assert storage.stat(uri).size == 8
    assert storage.stat(join(root, "data", "nope.json")) is None
    assert storage.get(uri, tmp_path / "x" / "t.json").read_text() == '{"a": 1}'
    # a file is not a prefix: listing it finds nothing
    assert storage.list_keys(uri) == []

    storage.write_text(join(root, "job.yaml"), "name: x\n")
    assert storage.read_text(join(root, "job.yaml")) == "name: x\n"


def test_delete_prefix_takes_marker_and_only_that_prefix(root: str, small: Path) -> None:
    storage.put_dir(small, join(root, "ck"))
    storage.put_dir(small, join(root, "ck2"))
    storage.delete_prefix(join(root, "ck"))
    assert storage.list_keys(join(root, "ck")) == []
    assert not storage.is_committed(join(root, "ck"))
    assert storage.is_committed(join(root, "ck2"))
    assert storage.list_keys(join(root, "ck2")) == [COMMIT_MARKER, "config.json", "sub/state.bin"]


def test_latest_committed_skips_uncommitted(root: str, tmp_path: Path) -> None:
    src = tmp_path / "ck"
    src.mkdir()
    (src / "trainer_state.json").write_text("{}")
    ck = join(root, "checkpoints")
    assert storage.latest_committed(ck) is None
    for step, commit in ((5, True), (10, True), (20, False), (100, True)):
        storage.put_dir(src, join(ck, f"step-{step:07d}"), commit=commit)
    storage.put_dir(src, join(ck, "step-0000100", "nested", "step-0000999"))
    storage.delete_prefix(join(ck, "step-0000100"))  # gone: marker first

    assert storage.committed_dirs(ck) == [join(ck, "step-0000010"), join(ck, "step-0000005")]
    assert storage.latest_committed(ck) == join(ck, "step-0000010")
    assert storage.latest_committed(ck, r"other-\d+") is None


def test_reupload_uncommits_until_done(root: str, small: Path) -> None:
    uri = join(root, "model")
    storage.put_dir(small, uri)
    store, _ = storage.open_store(uri)

    def broken(*args: object, **kwargs: object) -> None:
        raise AccessError("upload cut short")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(store), "put_files", broken)
        with pytest.raises(AccessError):
            storage.put_dir(small, uri)
        assert not storage.is_committed(uri)  # the stale marker went before the upload
    storage.put_dir(small, uri)
    assert storage.is_committed(uri)


def test_missing_things_are_access_errors(root: str, tmp_path: Path) -> None:
    with pytest.raises(AccessError, match="no such"):
        storage.get(join(root, "nope.bin"), tmp_path / "x")
    with pytest.raises(AccessError):
        storage.get_dir(join(root, "nothing-here"), tmp_path / "y")
    with pytest.raises(AccessError) as err:
        storage.read_text(join(root, "nope.txt"))
    assert err.value.exit_code == 3


def test_probe(root: str, small: Path) -> None:
    storage.put_dir(small, join(root, "data"))
    who = storage.probe(join(root, "data"))
    assert who == {"file": "local", "s3": "aws:env",
                   "gs": "google:credentials.AnonymousCredentials"}[root.split(":")[0]
                                                                    if "://" in root else "file"]
    storage.probe(join(root, "data", "config.json"))
    storage.probe(join(root, "new", "output"), write=True)
    assert storage.list_keys(join(root, "new")) == []  # the write probe cleans up
    with pytest.raises(AccessError, match="no such"):
        storage.probe(join(root, "absent"))


def test_keys_escaping_the_target_are_refused(s3_bucket: str, s3: object, tmp_path: Path) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    s3.client().put_object(Bucket=bucket, Key="evil/../../escape.txt", Body=b"x")
    with pytest.raises(AccessError, match="outside the target"):
        storage.get_dir(f"{s3_bucket}/evil", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_credential_source(root: str) -> None:
    kind = root.split("://")[0] if "://" in root else "file"
    assert storage.credential_source(root) == {
        "file": "local", "s3": "aws:env", "gs": "google:credentials.AnonymousCredentials"}[kind]
