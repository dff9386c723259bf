"""The primitives every backend implements, and the helpers they share (URI parsing is
sft_job/uri.py; the commit-marker protocol lives above the backends, in __init__.py)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sft_job.errors import AccessError, SftJobError

COMMIT_MARKER = "COMMITTED"


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object: its size and a tag that changes with its content
    (S3 ETag, GCS generation+CRC32C, Hub blob id, local mtime)."""

    size: int
    etag: str


class Store(Protocol):
    """A bucket-like store. Keys are '/'-separated paths inside the bucket (or root). Transfers
    are verified (checksums) and retried by the backend; `atomic` stores (the Hub) commit a
    folder at once and get no marker."""

    atomic: bool
    scheme: str  # the URI scheme it serves: file, s3, gs, hf

    def get_file(self, key: str, dest: Path) -> Path: ...
    def get_prefix(self, prefix: str, dest: Path) -> Path: ...
    def put_files(self, pairs: list[tuple[Path, str]], desc: str) -> None: ...
    def list_info(self, prefix: str) -> dict[str, ObjectInfo]: ...
    def stat(self, key: str) -> ObjectInfo | None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def probe(self, key: str, write: bool) -> str: ...
    def credential_source(self) -> str: ...


def local_files(src: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every file under `src`, sorted, without a commit marker."""
    if not src.is_dir():
        raise AccessError(f"{src}: no such local directory to upload")
    files = sorted((p.relative_to(src).as_posix(), p) for p in src.rglob("*") if p.is_file())
    return [(rel, p) for rel, p in files if rel != COMMIT_MARKER]


def manifest(files: list[tuple[str, Path]]) -> bytes:
    """The commit marker's content: which files the committed directory holds."""
    body = {"committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {rel: p.stat().st_size for rel, p in files}}
    return json.dumps(body, indent=1, sort_keys=True).encode()


def key_join(prefix: str, rel: str) -> str:
    """Join a key prefix and a relative key ('' prefix = bucket root)."""
    return f"{prefix.rstrip('/')}/{rel}" if prefix.strip("/") else rel


def safe_dest(dest: Path, rel: str, uri: str) -> Path:
    """dest/rel, refusing keys that would escape `dest` ('..' segments, absolute)."""
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts:
        raise AccessError(f"{uri}: refusing to download key '{rel}' outside the target folder")
    return dest.joinpath(*[p for p in parts if p])


def targets(objs: dict[str, Any], dest: Path, uri: str) -> list[tuple[Path, Any]]:
    """(local path under `dest`, object) for each object listed under the prefix `uri`."""
    if not objs:
        raise AccessError(f"{uri}: no objects under this prefix")
    return [(safe_dest(dest, rel, uri), o) for rel, o in sorted(objs.items())]


@contextlib.contextmanager
def mapped_errors(map_error: Callable[..., SftJobError | None], uri: str,
                  *args: Any) -> Iterator[None]:
    """Turn a client library's errors into the user-facing ones `map_error(err, uri, *args)`
    names (AccessError exit 3, TransientError exit 75, SpecError exit 2); others propagate."""
    try:
        yield
    except SftJobError:
        raise
    except Exception as err:
        mapped = map_error(err, uri, *args)
        if mapped is None:
            raise
        raise mapped from err
