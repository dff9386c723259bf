"""The storage protocol every backend implements (URI parsing is sft_job/uri.py)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sft_job.errors import AccessError

COMMIT_MARKER = "COMMITTED"


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object: its size and a tag that changes with its content
    (S3 ETag, GCS generation+MD5, Hub blob id, local mtime)."""

    size: int
    etag: str


@dataclass
class Settings:
    """Process-wide storage settings that come from the spec (see `storage.configure`)."""

    s3_endpoint_url: str | None = None


SETTINGS = Settings()


class Store(Protocol):
    """A bucket-like store. Keys are '/'-separated paths inside the bucket (or root)."""

    def get_file(self, key: str, dest: Path) -> Path: ...
    def get_prefix(self, prefix: str, dest: Path) -> Path: ...
    def put_file(self, src: Path, key: str) -> None: ...
    def put_dir(self, src: Path, prefix: str, commit: bool = True) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def stat(self, key: str) -> ObjectInfo | None: ...
    def list_info(self, prefix: str) -> dict[str, ObjectInfo]: ...
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
