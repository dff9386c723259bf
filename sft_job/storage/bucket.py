"""What the S3 and GCS backends share: one bucket, a prefix naming the 'folder' `prefix/`,
the verbs in terms of a few object calls each backend gives, errors mapped by its map_error."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sft_job.errors import AccessError, SftJobError
from sft_job.storage.base import ObjectInfo, key_join, mapped_errors, targets


class BucketStore:
    """A bucket-like store (see base.Store). Subclasses give `scheme` and the calls below."""

    atomic = False
    scheme = ""

    def __init__(self, bucket: str) -> None:
        self.name = bucket

    def get_file(self, key: str, dest: Path) -> Path:
        with self._errors(key):
            obj = self._head(key)
            if obj is None:
                raise AccessError(f"{self._uri(key)}: no such object")
            self._download([(dest, obj)], self._uri(key))
        return dest

    def get_prefix(self, prefix: str, dest: Path) -> Path:
        with self._errors(prefix):
            self._download(targets(self._list(prefix), dest, self._uri(prefix)),
                           self._uri(prefix))
        return dest

    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        with self._errors(prefix):
            return {rel: self._info(o) for rel, o in self._list(prefix).items()}

    def stat(self, key: str) -> ObjectInfo | None:
        with self._errors(key):
            obj = self._head(key) if key else self._check_bucket()
            return None if obj is None else self._info(obj)

    def exists(self, key: str) -> bool:
        if not key:
            with self._errors(key):
                self._check_bucket()
                return True
        return self.stat(key) is not None

    def put_files(self, pairs: list[tuple[Path, str]], uri: str) -> None:
        with mapped_errors(self._map_error, uri):
            self._upload(pairs, uri)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._delete([key])

    def delete_prefix(self, prefix: str) -> None:
        with self._errors(prefix):
            self._delete([k for k in self._keys(prefix)
                          if k == prefix or k.startswith(prefix + "/")])

    def probe(self, key: str, write: bool) -> str:
        """Check credentials and access now; returns the credential source in use."""
        source = self.credential_source()
        with self._errors(key):
            self._check_bucket(key)
            if write:
                probe = key_join(key, f".sft-job-probe-{uuid.uuid4().hex}")
                self.write_bytes(probe, b"")
                self._delete([probe])
            elif key and self._head(key) is None and not self._list(key, limit=1):
                raise AccessError(f"{self._uri(key)}: no such object or prefix")
            return source

    def _uri(self, key: str) -> str:
        return f"{self.scheme}://{self.name}/{key}".rstrip("/")

    def _errors(self, key: str) -> contextlib.AbstractContextManager[None]:
        return mapped_errors(self._map_error, self._uri(key))

    def _list(self, prefix: str, limit: int | None = None) -> dict[str, Any]:
        """Objects under `prefix/`, by key relative to it (folder placeholders skipped)."""
        p = prefix.strip("/") + "/" if prefix.strip("/") else ""
        out: dict[str, Any] = {}
        for key, obj in self._objects(p, limit):
            if not key.endswith("/"):
                out[key[len(p):]] = obj
                if limit and len(out) >= limit:
                    break
        return out

    def _keys(self, prefix: str) -> list[str]:
        return [key for key, _ in self._objects(prefix, None)]

    # what each backend gives
    def _map_error(self, err: BaseException, uri: str) -> SftJobError | None: ...
    def _head(self, key: str) -> Any: ...  # the object, or None (missing bucket: raises)
    def _objects(self, prefix: str, limit: int | None) -> Iterable[tuple[str, Any]]: ...
    def _info(self, obj: Any) -> ObjectInfo: ...
    def _check_bucket(self, prefix: str = "") -> None: ...  # raises if the bucket is missing
    def _upload(self, pairs: list[tuple[Path, str]], uri: str) -> None: ...
    def _download(self, items: list[tuple[Path, Any]], uri: str) -> None: ...
    def _delete(self, keys: list[str]) -> None: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def credential_source(self) -> str: ...
