"""Retries and checksums against real faults: a proxy on loopback in front of moto / the GCS
emulator answers 503, drops connections and flips bytes in bodies."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sft_job import storage
from sft_job.errors import TransientError
from sft_job.storage import ChecksumError, conditional, join
from tests.servers import FaultProxy, fault_proxy, use_env
from tests.storage.conftest import tree

# Requests on object data (not listings or metadata), per backend.
OBJECT_GET = {"s3": r"^GET /{b}/", "gs": r"^GET /download/storage/v1/b/{b}/"}
OBJECT_PUT = {"s3": r"^PUT /{b}/", "gs": r"^PUT /upload/storage/v1/b/{b}/"}


@pytest.fixture(params=["s3", "gs"])
def proxied(request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, FaultProxy]]:
    """(backend, bucket URI, proxy): this process talks to the server through the proxy."""
    kind = request.param
    uri = request.getfixturevalue(f"{kind}_bucket")
    server = request.getfixturevalue({"s3": "s3", "gs": "gcs"}[kind])
    with fault_proxy(server.url, seed=7) as proxy:
        use_env(monkeypatch, {**proxy.env_for(server), "AWS_MAX_ATTEMPTS": "6",
                              "SFT_JOB_STORAGE_RETRY_TIMEOUT": "30"})
        yield kind, uri, proxy


def _bucket(uri: str) -> str:
    return re.escape(uri.split("://", 1)[1])


def test_survives_503s_and_dropped_connections(proxied: tuple[str, str, FaultProxy],
                                               folder: Path, tmp_path: Path) -> None:
    _, uri, proxy = proxied
    proxy.error_rate, proxy.drop_rate = 0.1, 0.05
    proxy.fail_next(1, "drop")
    storage.put_dir(folder, join(uri, "ck"))
    out = storage.get_dir(join(uri, "ck"), tmp_path / "out")
    proxy.error_rate = proxy.drop_rate = 0.0

    assert storage.is_committed(join(uri, "ck"))
    got = tree(out)
    got.pop("COMMITTED")
    assert got == tree(folder)
    assert proxy.stats["error"] >= 1 and proxy.stats["drop"] >= 1, proxy.stats


def test_lost_answers_are_retried(proxied: tuple[str, str, FaultProxy], small: Path,
                                  tmp_path: Path) -> None:
    """The server stored the object but the answer never came back: the retry must converge."""
    kind, uri, proxy = proxied
    proxy.match = OBJECT_PUT[kind].format(b=_bucket(uri)) + "|^POST /upload/"
    proxy.fail_next(2, "lose")
    storage.put_dir(small, join(uri, "ck"))
    assert proxy.stats["lose"] == 2
    got = tree(storage.get_dir(join(uri, "ck"), tmp_path / "out"))
    got.pop("COMMITTED")
    assert got == tree(small)


def test_persistent_outage_is_transient(proxied: tuple[str, str, FaultProxy], small: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, uri, proxy = proxied
    storage.put_dir(small, join(uri, "ck"))
    use_env(monkeypatch, {"AWS_MAX_ATTEMPTS": "2", "SFT_JOB_STORAGE_RETRY_TIMEOUT": "1.5"})
    proxy.error_rate = 1.0
    with pytest.raises(TransientError) as err:
        storage.read_text(join(uri, "ck", "config.json"))
    assert err.value.exit_code == 75
    assert uri in str(err.value)
    with pytest.raises(TransientError):
        storage.put_dir(small, join(uri, "ck2"))
    assert proxy.stats["error"] >= 2


def test_corrupted_download_is_retried(proxied: tuple[str, str, FaultProxy], small: Path,
                                       tmp_path: Path) -> None:
    kind, uri, proxy = proxied
    storage.put_dir(small, join(uri, "m"))
    proxy.match = OBJECT_GET[kind].format(b=_bucket(uri))
    proxy.fail_next(1, "corrupt")
    out = storage.get_dir(join(uri, "m"), tmp_path / "out")
    assert proxy.stats["corrupt"] == 1
    got = tree(out)
    got.pop("COMMITTED")
    assert got == tree(small)


def test_corruption_that_persists_fails_with_exit_75(proxied: tuple[str, str, FaultProxy],
                                                     small: Path, tmp_path: Path) -> None:
    kind, uri, proxy = proxied
    storage.put_dir(small, join(uri, "m"))
    proxy.match = OBJECT_GET[kind].format(b=_bucket(uri))
    proxy.corrupt_rate = 1.0
    with pytest.raises(ChecksumError) as err:
        storage.get(join(uri, "m", "sub", "state.bin"), tmp_path / "state.bin")
    assert err.value.exit_code == 75
    assert not (tmp_path / "state.bin").exists() or \
        (tmp_path / "state.bin").read_bytes() != (small / "sub" / "state.bin").read_bytes()
    with pytest.raises(ChecksumError):
        storage.read_text(join(uri, "m", "config.json"))


def test_corrupted_upload_is_detected_and_redone(proxied: tuple[str, str, FaultProxy],
                                                 tmp_path: Path, s3: Any, gcs: Any) -> None:
    kind, uri, proxy = proxied
    src = tmp_path / "shard"
    src.mkdir()
    data = bytes(range(256)) * (9 * 4096)  # 9 MiB: a PUT on S3 and a resumable PUT on GCS
    (src / "w.bin").write_bytes(data)
    proxy.match = OBJECT_PUT[kind].format(b=_bucket(uri))
    proxy.fail_next(1, "corrupt")
    storage.put_dir(src, join(uri, "m"))
    assert proxy.stats["corrupt"] == 1
    bucket = uri.split("://", 1)[1]
    if kind == "s3":
        stored = s3.client().get_object(Bucket=bucket, Key="m/w.bin")["Body"].read()
    else:
        stored = gcs.client().bucket(bucket).blob("m/w.bin").download_as_bytes()
    assert stored == data


def test_rot_inside_the_gcs_emulator_is_caught(gs_bucket: str, gcs: Any, small: Path,
                                               tmp_path: Path) -> None:
    storage.put_dir(small, join(gs_bucket, "m"))
    obj = gcs.object_path(gs_bucket.removeprefix("gs://"), "m/sub/state.bin")
    data = bytearray(obj.read_bytes())
    data[100] ^= 0x01
    obj.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="CRC32C"):
        storage.get_dir(join(gs_bucket, "m"), tmp_path / "out")


def test_s3_bucket_with_sse_kms(s3_bucket: str, s3: Any, folder: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket encrypted with SSE-KMS by default (as terraform/aws makes it): S3 then reports
    ETags that are not MD5s, in HEADs and in listings. moto does not emulate that, so the proxy
    rewrites every ETag it forwards (see FaultProxy.sse_kms). Uploads, downloads of a folder
    (verified against the listing) and of one object, small objects and a rerun's overwrite
    all work; before, every download of a folder failed its ETag check (exit 75, forever)."""
    with fault_proxy(s3.url, sse_kms=True) as proxy:
        use_env(monkeypatch, proxy.env_for(s3))
        ck = join(s3_bucket, "ck")
        storage.put_dir(folder, ck)
        storage.put_dir(folder, ck)  # a rerun uploads over it
        listed = storage.list_info(ck)
        head = s3.client().head_object(Bucket=s3_bucket[5:], Key="ck/config.json")
        assert listed["config.json"].etag != head["ETag"].strip('"')  # the proxy's work

        got = tree(storage.get_dir(ck, tmp_path / "out"))
        got.pop("COMMITTED")
        assert got == tree(folder)
        one = storage.get(join(ck, "model.safetensors"), tmp_path / "one" / "m")
        assert one.read_bytes() == (folder / "model.safetensors").read_bytes()
        storage.write_text(join(ck, "note.txt"), "hello")
        assert storage.read_text(join(ck, "note.txt")) == "hello"
        assert storage.is_committed(ck)
        lease = join(s3_bucket, "_LEASE")  # the run lease's conditional writes name ETags
        first = conditional.put_if(lease, b"a", None)
        assert first and conditional.put_if(lease, b"b", None) is None
        second = conditional.put_if(lease, b"b", first)
        assert second and conditional.read_tagged(lease) == (b"b", second)
        assert conditional.delete_if(lease, second)
