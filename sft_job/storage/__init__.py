"""One storage API over local paths, file://, s3://, gs:// and hf:// URIs.

Callers use the module-level verbs with full URIs; each scheme has a backend class in its own
module implementing `Store` (see base.py). A directory is *committed* when its marker object
(`COMMITTED`) exists; readers treat an uncommitted directory as absent. The marker protocol
(put_dir, delete_prefix, committed_dirs) lives here once; backends only move bytes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sft_job.errors import AccessError
from sft_job.storage.base import COMMIT_MARKER, ObjectInfo, Store, key_join, local_files, manifest
from sft_job.storage.checksum import ChecksumError
from sft_job.uri import join, split_uri

__all__ = [
    "COMMIT_MARKER",
    "ChecksumError",
    "ObjectInfo",
    "Store",
    "committed_dirs",
    "credential_source",
    "delete_prefix",
    "exists",
    "export_s3_endpoint",
    "get",
    "get_dir",
    "is_committed",
    "join",
    "latest_committed",
    "list_info",
    "list_keys",
    "open_store",
    "probe",
    "put_dir",
    "put_file",
    "read_text",
    "split_uri",
    "stat",
    "write_text",
]


def export_s3_endpoint(url: str | None) -> None:
    """Point boto3 at `output.s3_endpoint_url` through its own AWS_ENDPOINT_URL_S3, in this
    process and every process it starts (the uploader, the ranks); None leaves the environment
    as it is (boto3 then uses AWS_ENDPOINT_URL_S3 if set, else AWS itself)."""
    if url:
        os.environ["AWS_ENDPOINT_URL_S3"] = url


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
    if not Path(src).is_file():
        raise AccessError(f"{src}: no such local file to upload")
    store, key = open_store(uri)
    store.put_files([(Path(src), key)], uri)


def put_dir(src: Path, uri: str, commit: bool = True) -> None:
    """Upload a local folder under the prefix `uri`. With commit, the folder's marker goes
    first (a re-upload must not look committed while it is in flux) and comes back last, once
    every file is uploaded and verified, as a manifest of the files."""
    store, key = open_store(uri)
    files = local_files(Path(src))
    marker = key_join(key, COMMIT_MARKER)
    commit = commit and not store.atomic
    if commit:
        store.delete(marker)
    store.put_files([(p, key_join(key, rel)) for rel, p in files], uri)
    if commit:
        store.write_bytes(marker, manifest(files))


def list_keys(uri: str) -> list[str]:
    """Object keys under the prefix `uri`, relative to it, sorted."""
    return sorted(list_info(uri))


def exists(uri: str) -> bool:
    """Whether the object `uri` exists."""
    store, key = open_store(uri)
    return store.exists(key)


def is_committed(uri: str) -> bool:
    """Whether the directory `uri` has its commit marker."""
    return exists(join(uri, COMMIT_MARKER))


def delete_prefix(uri: str) -> None:
    """Delete every object under the prefix `uri` (and the object `uri` itself); the marker
    first, so a half-deleted directory never looks committed."""
    store, key = open_store(uri)
    if not key.strip("/"):
        raise ValueError(f"refusing to delete the whole bucket {uri}")
    if not store.atomic:
        store.delete(key_join(key, COMMIT_MARKER))
    store.delete_prefix(key.rstrip("/"))


def read_text(uri: str) -> str:
    """Read a small UTF-8 object."""
    store, key = open_store(uri)
    return store.read_bytes(key).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a small UTF-8 object."""
    store, key = open_store(uri)
    store.write_bytes(key, text.encode("utf-8"))


def stat(uri: str) -> ObjectInfo | None:
    """Size and content tag of the object `uri`, or None if it does not exist."""
    store, key = open_store(uri)
    return store.stat(key)


def list_info(uri: str) -> dict[str, ObjectInfo]:
    """Objects under the prefix `uri` with size and content tag, by key relative to it
    (folder placeholders left out), sorted."""
    store, key = open_store(uri)
    return dict(sorted(store.list_info(key).items()))


def probe(uri: str, write: bool = False) -> str:
    """Check now that `uri` can be read (it exists) or written; raises AccessError (exit 3) or
    TransientError (exit 75). Returns the credential source used, e.g. 'aws:iam-role',
    'google:compute_engine.Credentials', 'hf:HF_TOKEN', 'local' (never the secret itself)."""
    store, key = open_store(uri)
    return store.probe(key, write)


def credential_source(uri: str) -> str:
    """Which credentials serve `uri` ('aws:iam-role', 'aws:env', 'hf:HF_TOKEN', 'local'...),
    without touching the bucket; AccessError if there are none (S3, GCS)."""
    store, _ = open_store(uri)
    return store.credential_source()


def committed_dirs(uri: str, pattern: str = r"step-\d+") -> list[str]:
    """URIs of the directories directly under `uri` whose name matches `pattern` and that hold
    a commit marker, newest (highest number in the name, then name) first. Directories without
    the marker (an upload cut short, a delete half done) are left out."""
    rx = re.compile(pattern)
    names = [k[: -len(COMMIT_MARKER) - 1] for k in list_keys(uri)
             if k.endswith("/" + COMMIT_MARKER) and k.count("/") == 1]
    names = [n for n in names if rx.fullmatch(n)]
    names.sort(key=lambda n: ([int(d) for d in re.findall(r"\d+", n)], n), reverse=True)
    return [join(uri, n) for n in names]


def latest_committed(uri: str, pattern: str = r"step-\d+") -> str | None:
    """The newest committed directory under `uri` (see committed_dirs), or None."""
    dirs = committed_dirs(uri, pattern)
    return dirs[0] if dirs else None
