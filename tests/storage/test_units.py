"""Checksums against the tools and servers that define them, the retry loops, progress bars, and
the local store listed while another process writes into it."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from sft_job import storage
from sft_job.errors import EXIT_ACCESS, EXIT_RETRY, AccessError, TransientError
from sft_job.storage import ChecksumError, retry
from sft_job.storage.checksum import git_blob_sha1, md5_hex, s3_etag
from sft_job.storage.progress import MIN_BYTES, Progress


def test_exit_codes() -> None:
    assert AccessError("x").exit_code == EXIT_ACCESS == 3
    assert TransientError("x").exit_code == ChecksumError("x").exit_code == EXIT_RETRY == 75


def test_s3_etag_matches_moto(s3: Any, s3_bucket: str, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    f = tmp_path / "f.bin"
    f.write_bytes(bytes(range(256)) * (5 * 4096 + 3))  # 5 MiB + 768 B
    client = s3.client()
    bucket = s3_bucket.removeprefix("s3://")
    cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    client.upload_file(str(f), bucket, "mp", Config=cfg)
    client.put_object(Bucket=bucket, Key="single", Body=f.read_bytes())
    assert client.head_object(Bucket=bucket, Key="mp")["ETag"].strip('"') == s3_etag(f, 5 << 20)
    assert s3_etag(f, 5 << 20).endswith("-2")
    assert client.head_object(Bucket=bucket, Key="single")["ETag"].strip('"') == md5_hex(f)


def test_s3_etag_exact_multiple_of_part_size(tmp_path: Path) -> None:
    import hashlib

    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 10 + b"b" * 10)
    parts = hashlib.md5(b"a" * 10).digest() + hashlib.md5(b"b" * 10).digest()
    assert s3_etag(f, 10) == f"{hashlib.md5(parts).hexdigest()}-2"


def test_git_blob_ids(tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_bytes(b"123456789")
    if shutil.which("git"):
        out = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True)
        assert git_blob_sha1(f) == out.stdout.strip()


def test_call_retries_only_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry.time, "sleep", lambda s: None)
    seen: list[int] = []

    def flaky() -> str:
        seen.append(1)
        if len(seen) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert retry.call(flaky, lambda e: isinstance(e, ConnectionError), attempts=3) == "ok"
    seen.clear()
    with pytest.raises(ConnectionError):
        retry.call(flaky, lambda e: isinstance(e, ConnectionError), attempts=2)
    assert len(seen) == 2
    with pytest.raises(ValueError):
        retry.call(lambda: int("x"), lambda e: isinstance(e, ConnectionError), attempts=5)


def test_transfer_verified_redoes_only_mismatches() -> None:
    batches: list[list[str]] = []
    bad = {"b": 2}  # b mismatches twice, then matches

    def verify(item: str) -> None:
        if bad.get(item):
            bad[item] -= 1
            raise ChecksumError(f"{item} differs")

    retry.transfer_verified(["a", "b", "c"], batches.append, verify, str)
    assert batches == [["a", "b", "c"], ["b"], ["b"]]

    def never(item: str) -> None:
        raise ChecksumError(f"{item} differs")

    with pytest.raises(ChecksumError, match="still differs after 3 transfers"):
        retry.transfer_verified(["a"], lambda b: None, never, str)


def test_progress_only_for_large_transfers(capsys: pytest.CaptureFixture[str]) -> None:
    with Progress(MIN_BYTES - 1, "small") as p:
        p.update(MIN_BYTES - 1)
    assert capsys.readouterr().err == ""
    with Progress(MIN_BYTES, "upload s3://b/k") as p:
        p.update(MIN_BYTES)
    err = capsys.readouterr().err
    assert "upload s3://b/k" in err and "100%" in err
    assert "\r" not in err  # off a terminal: plain log lines


def test_local_listing_while_another_process_writes(tmp_path: Path) -> None:
    """The nodes of a job on a shared volume write into one folder while node 0 lists it: a
    write in progress (its temp name) is no object, and a file renamed or removed between the
    listing and its stat is left out, not an error. (test_sharded_commit once failed so: node
    1's temp file was listed, then renamed before node 0's stat; exit 3 for a healthy upload.)"""
    root = tmp_path / "ck"
    root.mkdir()
    (root / ".a.bin.tmp-123").write_bytes(b"x")  # LocalStore._write's temp name
    (root / "b.bin").write_bytes(b"yy")
    assert storage.list_info(str(root)) == {"b.bin": storage.stat(str(root / "b.bin"))}

    stop, errors = threading.Event(), []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            storage.write_text(str(root / f"f{i % 40}.txt"), "z" * (i % 100))  # temp, rename
            (root / f"f{(i + 20) % 40}.txt").unlink(missing_ok=True)
            i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(400):
            try:
                keys = storage.list_info(str(root))
            except AccessError as e:
                errors.append(e)
                continue
            assert not [k for k in keys if ".tmp-" in k], keys
    finally:
        stop.set()
        writer.join()
    assert not errors, errors[:3]
