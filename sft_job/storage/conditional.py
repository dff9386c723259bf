"""Compare-and-swap on one small object, for the run lease (checkpoint/lease.py).

    read_tagged(uri) -> (bytes, tag) | None
    put_if(uri, data, match) -> new tag | None     match=None: only if absent
    delete_if(uri, match) -> bool

Each store's own condition does the deciding, so two writers can never both win: S3
`If-None-Match: *` / `If-Match: <etag>` (stores that do not implement them, answering 501, get
a plain write: read-compare-write, with a small race window), GCS `ifGenerationMatch`
(0 = absent), a local file `O_EXCL` to create and an exclusive `flock` to compare and replace.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from sft_job.errors import SpecError
from sft_job.storage import open_store

log = logging.getLogger(__name__)


def read_tagged(uri: str) -> tuple[bytes, str] | None:
    """The object's bytes and its tag (what put_if/delete_if compare), or None if absent."""
    store, key = open_store(uri)
    return _ops(store, uri)[0](store, key)


def put_if(uri: str, data: bytes, match: str | None) -> str | None:
    """Write `data` if the object is absent (match None) or still has the tag `match`; the
    new tag, or None when the condition failed (someone else wrote first)."""
    store, key = open_store(uri)
    return _ops(store, uri)[1](store, key, data, match)


def delete_if(uri: str, match: str) -> bool:
    """Delete the object if it still has the tag `match`."""
    store, key = open_store(uri)
    return _ops(store, uri)[2](store, key, match)


# ------------------------------------------------------------------ local files


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _open(key: str) -> Any:
    """The file `key` opened for reading and writing, or None if it does not exist."""
    try:
        return Path(key).open("r+b")
    except FileNotFoundError:
        return None


def _local_read(store: Any, key: str) -> tuple[bytes, str] | None:
    with store._errors(key):
        f = _open(key)
        if f is None:
            return None
        with f:
            fcntl.flock(f, fcntl.LOCK_SH)
            data = f.read()
        return data, _tag(data)


def _local_put(store: Any, key: str, data: bytes, match: str | None) -> str | None:
    p = Path(key)
    with store._errors(key):
        if match is None:
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            mode = "wb"
        else:
            try:
                fd = os.open(p, os.O_RDWR)
            except FileNotFoundError:
                return None
            mode = "r+b"
        with os.fdopen(fd, mode) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if match is not None and _tag(f.read()) != match:
                return None
            f.seek(0)
            f.truncate()
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return _tag(data)


def _local_delete(store: Any, key: str, match: str) -> bool:
    with store._errors(key):
        f = _open(key)
        if f is None:
            return False
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if _tag(f.read()) != match:
                return False
            os.unlink(key)
            return True


# ------------------------------------------------------------------ S3


def _s3_code(err: Any) -> tuple[str, int]:
    return (str(err.response.get("Error", {}).get("Code", "")),
            int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0))


def _s3_read(store: Any, key: str) -> tuple[bytes, str] | None:
    from botocore.exceptions import ClientError

    with store._errors(key):
        try:
            resp = store.client.get_object(Bucket=store.name, Key=key)
        except ClientError as e:
            if _s3_code(e)[0] in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return resp["Body"].read(), resp["ETag"]


def _s3_put(store: Any, key: str, data: bytes, match: str | None) -> str | None:
    from botocore.exceptions import ClientError

    cond = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}
    with store._errors(key):
        try:
            return store.client.put_object(Bucket=store.name, Key=key, Body=data,
                                           **cond)["ETag"]
        except ClientError as e:
            code, status = _s3_code(e)
            if status in (409, 412) or (match and code in ("NoSuchKey", "404")):
                return None
            if status != 501:
                raise
        log.warning("s3://%s does not support conditional writes: the lease is written "
                    "without one", store.name)
        cur = _s3_read(store, key)
        if (cur is None) != (match is None) or (cur is not None and cur[1] != match):
            return None
        return store.client.put_object(Bucket=store.name, Key=key, Body=data)["ETag"]


def _s3_delete(store: Any, key: str, match: str) -> bool:
    from botocore.exceptions import ClientError

    with store._errors(key):
        try:
            store.client.delete_object(Bucket=store.name, Key=key, IfMatch=match)
            return True
        except ClientError as e:
            status = _s3_code(e)[1]
            if status in (404, 409, 412):
                return False
            if status != 501:
                raise
        cur = _s3_read(store, key)
        if cur is None or cur[1] != match:
            return False
        store.client.delete_object(Bucket=store.name, Key=key)
        return True


# ------------------------------------------------------------------ GCS


def _gcs_read(store: Any, key: str) -> tuple[bytes, str] | None:
    from google.api_core.exceptions import NotFound, PreconditionFailed

    with store._errors(key):
        blob = store.bucket.get_blob(key)
        if blob is None:
            return None
        gen = blob.generation  # before the download, which may reset the blob's properties
        try:
            return blob.download_as_bytes(if_generation_match=gen), str(gen)
        except (NotFound, PreconditionFailed):  # replaced or deleted meanwhile: read again
            return _gcs_read(store, key)


def _gcs_put(store: Any, key: str, data: bytes, match: str | None) -> str | None:
    from google.api_core.exceptions import NotFound, PreconditionFailed

    with store._errors(key):
        blob = store.bucket.blob(key)
        try:
            blob.upload_from_string(data, if_generation_match=0 if match is None else int(match))
        except (PreconditionFailed, NotFound):
            return None
        if blob.generation is None:  # some servers do not echo it
            blob = store.bucket.get_blob(key)
        return str(blob.generation) if blob is not None else None


def _gcs_delete(store: Any, key: str, match: str) -> bool:
    from google.api_core.exceptions import NotFound, PreconditionFailed

    with store._errors(key):
        try:
            store.bucket.blob(key).delete(if_generation_match=int(match))
            return True
        except (PreconditionFailed, NotFound):
            return False


_OPS: dict[str, tuple[Any, Any, Any]] = {
    "file": (_local_read, _local_put, _local_delete),
    "s3": (_s3_read, _s3_put, _s3_delete),
    "gs": (_gcs_read, _gcs_put, _gcs_delete),
}


def _ops(store: Any, uri: str) -> tuple[Any, Any, Any]:
    if store.scheme not in _OPS:  # the Hub: its commits have no compare-and-swap
        raise SpecError(f"{uri}: conditional writes need a local path, s3:// or gs://")
    return _OPS[store.scheme]
