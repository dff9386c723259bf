"""One storage API over local paths, file://, s3://, gs:// and hf:// URIs.

Callers use the module-level verbs with full URIs; each scheme has a backend class in its own
module implementing `Store` (see base.py). A directory is *committed* when its marker object
(`COMMITTED`) exists; readers treat an uncommitted directory as absent.
"""

from __future__ import annotations

from pathlib import Path

from sft_job.storage.base import COMMIT_MARKER, Store, join, split_uri

__all__ = [
    "COMMIT_MARKER",
    "Store",
    "delete_prefix",
    "exists",
    "get",
    "get_dir",
    "is_committed",
    "join",
    "list_keys",
    "open_store",
    "put_dir",
    "put_file",
    "read_text",
    "split_uri",
    "write_text",
]


def open_store(uri: str) -> tuple[Store, str]:
    """The backend for `uri` and the key (path inside the bucket/root) it names."""
    scheme, bucket, key = split_uri(uri)
    if scheme == "file":
        from sft_job.storage.local import LocalStore

        return LocalStore(), key
    if scheme == "s3":
        from sft_job.storage.s3 import S3Store

        return S3Store(bucket), key
    if scheme == "gs":
        from sft_job.storage.gcs import GCSStore

        return GCSStore(bucket), key
    if scheme == "hf":
        from sft_job.storage.hub import HubStore

        return HubStore(bucket), key
    raise AssertionError(scheme)  # split_uri rejects other schemes


def get(uri: str, dest: Path) -> Path:
    """Download one object to `dest` (a file path); returns dest."""
    store, key = open_store(uri)
    return store.get_file(key, Path(dest))


def get_dir(uri: str, dest: Path) -> Path:
    """Download every object under the prefix `uri` into the folder `dest`."""
    store, key = open_store(uri)
    return store.get_prefix(key, Path(dest))


def put_file(src: Path, uri: str) -> None:
    """Upload one local file to `uri`."""
    store, key = open_store(uri)
    store.put_file(Path(src), key)


def put_dir(src: Path, uri: str, commit: bool = True) -> None:
    """Upload a local folder under the prefix `uri`; with commit, write the marker last."""
    store, key = open_store(uri)
    store.put_dir(Path(src), key, commit=commit)


def list_keys(uri: str) -> list[str]:
    """Object keys under the prefix `uri`, relative to it, sorted."""
    store, key = open_store(uri)
    return store.list(key)


def exists(uri: str) -> bool:
    """Whether the object `uri` exists."""
    store, key = open_store(uri)
    return store.exists(key)


def is_committed(uri: str) -> bool:
    """Whether the directory `uri` has its commit marker."""
    return exists(join(uri, COMMIT_MARKER))


def delete_prefix(uri: str) -> None:
    """Delete every object under the prefix `uri` (the marker first, so it never outlives data)."""
    store, key = open_store(uri)
    store.delete_prefix(key)


def read_text(uri: str) -> str:
    """Read a small UTF-8 object."""
    store, key = open_store(uri)
    return store.read_bytes(key).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a small UTF-8 object."""
    store, key = open_store(uri)
    store.write_bytes(key, text.encode("utf-8"))
