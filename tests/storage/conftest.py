"""Storage test fixtures: one moto S3 server and one GCS emulator per session, a fresh bucket
per test, and the fake Hub per test (with HF_HUB_OFFLINE lifted for that test only)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import GCSServer, S3Server, gcs_server, hub_server, s3_server, use_env

BACKENDS = ["file", "s3", "gs"]


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs() -> Iterator[GCSServer]:
    with gcs_server() as server:
        yield server


def _name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """s3://<new bucket>, with this process's env pointed at moto."""
    name = _name()
    s3.client().create_bucket(Bucket=name)
    use_env(monkeypatch, s3.env)
    return f"s3://{name}"


@pytest.fixture
def gs_bucket(gcs: GCSServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """gs://<new bucket>, with this process's env pointed at the emulator."""
    name = _name()
    gcs.client().create_bucket(name)
    use_env(monkeypatch, gcs.env)
    return f"gs://{name}"


@pytest.fixture(params=BACKENDS)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty place to write to, on each backend in turn."""
    if request.param == "file":
        return str(tmp_path / "bucket")
    return str(request.getfixturevalue(f"{request.param}_bucket"))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """The fake Hub, with HF_ENDPOINT/HF_TOKEN set and offline mode off for this test."""
    with hub_server() as server:
        use_env(monkeypatch, {**server.env, "HF_HOME": str(tmp_path / "hf-home")})
        yield server


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` by relative posix path, with its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A checkpoint-like folder: small files, a nested one, and a 20 MiB shard (multipart)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "empty.txt").write_bytes(b"")
    (src / "sub" / "state.bin").write_bytes(bytes(range(256)) * 40)
    (src / "model.safetensors").write_bytes(uuid.uuid4().bytes * (20 * 65536 + 7))
    return src


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A small folder (no multipart) for tests about semantics rather than volume."""
    src = tmp_path / "small"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "state.bin").write_bytes(bytes(range(256)) * 40)
    return src
