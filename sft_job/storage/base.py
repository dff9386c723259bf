"""The storage protocol every backend implements, and URI parsing."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from sft_job.errors import SpecError

COMMIT_MARKER = "COMMITTED"
SCHEMES = ("file", "s3", "gs", "hf")


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


def split_uri(uri: str) -> tuple[str, str, str]:
    """'s3://b/k/x' -> ('s3', 'b', 'k/x'); a plain path or file:// -> ('file', '', abs path)."""
    if "://" not in uri:
        return "file", "", str(Path(uri).expanduser().absolute())
    scheme, rest = uri.split("://", 1)
    if scheme not in SCHEMES:
        raise SpecError(f"{uri}: unsupported URI scheme '{scheme}://' "
                        f"(use a path, file://, s3://, gs:// or hf://)")
    if scheme == "file":
        return "file", "", str(Path(rest).expanduser().absolute())
    if scheme == "hf":
        return "hf", "", rest.strip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise SpecError(f"{uri}: no bucket name")
    return scheme, bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or path with '/'."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def is_remote(uri: str) -> bool:
    """Whether `uri` names object storage or the Hub rather than the local filesystem."""
    return "://" in uri and not uri.startswith("file://")
