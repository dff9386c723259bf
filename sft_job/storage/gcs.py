"""Google Cloud Storage through google-cloud-storage: parallel transfers verified by CRC32C.

Credentials come from Application Default Credentials (Workload Identity, a service-account
key in GOOGLE_APPLICATION_CREDENTIALS, gcloud user login); STORAGE_EMULATOR_HOST points the
client at an emulator. Files upload in parallel (a thread each; resumable above 8 MB), large
files download in parallel ranges (`transfer_manager.download_chunks_concurrently`). Every
call retries 429/5xx/connection errors with google.api_core's exponential backoff for at most
SFT_JOB_STORAGE_RETRY_TIMEOUT seconds (default 120), uploads included (rewriting the same
bytes is idempotent here). Integrity is the client's own CRC32C check (`checksum="crc32c"`):
GCS verifies a one-request upload against it (400 on a mismatch), the client verifies
resumable uploads and every download; a failed check transfers the file again.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sft_job.errors import AccessError, SftJobError, SpecError, TransientError
from sft_job.storage.base import ObjectInfo
from sft_job.storage.bucket import BucketStore
from sft_job.storage.checksum import ChecksumError
from sft_job.storage.progress import Progress, ProgressReader
from sft_job.storage.retry import VERIFY_ATTEMPTS, retry_timeout, transfer_verified

WORKERS = 8
SLICED_MIN = 64 << 20  # files this large download in parallel ranges
SLICE = 32 << 20
_ENV_KEYS = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT",
             "SFT_JOB_STORAGE_RETRY_TIMEOUT")


class GCSStore(BucketStore):
    """One GCS bucket. Keys are object names; a prefix names the 'folder' `prefix/`."""

    scheme = "gs"

    def __init__(self, bucket: str) -> None:
        super().__init__(bucket)
        self._client: Any = None

    def read_bytes(self, key: str) -> bytes:
        from google.api_core.exceptions import NotFound
        from google.cloud.storage.exceptions import DataCorruption

        with self._errors(key):
            for _ in range(VERIFY_ATTEMPTS):
                try:
                    return self.bucket.blob(key).download_as_bytes(checksum="crc32c",
                                                                   retry=_retry())
                except NotFound:
                    self._check_bucket()
                    raise AccessError(f"{self._uri(key)}: no such object") from None
                except DataCorruption:
                    continue
            raise ChecksumError(f"{self._uri(key)}: downloaded bytes fail the CRC32C check "
                                f"after {VERIFY_ATTEMPTS} tries")

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self._transfer([key], lambda k: self.bucket.blob(k).upload_from_string(
                data, retry=_retry(), checksum="crc32c"), str)

    def credential_source(self) -> str:
        """The kind of Google credentials in use, e.g. 'google:compute_engine.Credentials'."""
        with self._errors(""):
            return _credential_kind(self.client)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client(tuple(os.environ.get(k) for k in _ENV_KEYS))
        return self._client

    @property
    def bucket(self) -> Any:
        return self.client.bucket(self.name)

    def _map_error(self, err: BaseException, uri: str) -> SftJobError | None:
        return map_error(err, uri, self.name)

    def _head(self, key: str) -> Any:
        blob = self.bucket.get_blob(key, retry=_retry())
        if blob is None:
            self._check_bucket()
        return blob

    def _objects(self, prefix: str, limit: int | None) -> Iterator[tuple[str, Any]]:
        for b in self.client.list_blobs(self.name, prefix=prefix or None, max_results=limit,
                                        retry=_retry()):
            yield b.name, b

    def _info(self, blob: Any) -> ObjectInfo:
        return ObjectInfo(int(blob.size or 0), f"{blob.generation}:{blob.crc32c or blob.md5_hash}")

    def _check_bucket(self, prefix: str = "") -> None:
        """Raise NotFound if the bucket is missing (needs only storage.objects.list)."""
        list(self._objects(prefix, 1))

    def _delete(self, names: list[str]) -> None:
        from google.api_core.exceptions import NotFound

        for name in names:
            with contextlib.suppress(NotFound):
                self.bucket.blob(name).delete(retry=_retry())

    def _upload(self, pairs: list[tuple[Path, str]], uri: str) -> None:
        with Progress(sum(p.stat().st_size for p, _ in pairs), f"upload {uri}") as progress:
            def one(pair: tuple[Path, str]) -> None:
                path, key = pair
                with open(path, "rb") as fh:
                    self.bucket.blob(key).upload_from_file(
                        ProgressReader(fh, progress), size=path.stat().st_size,
                        retry=_retry(), checksum="crc32c")

            self._transfer(pairs, one, lambda pair: pair[1])

    def _download(self, items: list[tuple[Path, Any]], uri: str) -> None:
        from google.cloud.storage import transfer_manager

        with Progress(sum(b.size or 0 for _, b in items), f"download {uri}") as progress:
            def one(item: tuple[Path, Any]) -> None:
                dest, blob = item
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
                try:
                    if (blob.size or 0) >= SLICED_MIN:
                        transfer_manager.download_chunks_concurrently(
                            blob, str(part), chunk_size=SLICE, max_workers=4,
                            worker_type=transfer_manager.THREAD, crc32c_checksum=True,
                            download_kwargs={"retry": _retry()})
                    else:
                        blob.download_to_filename(str(part), checksum="crc32c", retry=_retry())
                    os.replace(part, dest)
                finally:
                    part.unlink(missing_ok=True)
                progress.update(blob.size or 0)

            self._transfer(items, one, lambda item: item[1].name)

    def _transfer(self, items: list[Any], one: Callable[[Any], None],
                  key: Callable[[Any], str]) -> None:
        """`one(item)` for every item in parallel, through the client's own CRC32C check; an
        item whose check fails is transferred again (see transfer_verified)."""
        failed: dict[str, str] = {}

        def checked(item: Any) -> None:
            try:
                one(item)
                failed.pop(key(item), None)
            except Exception as err:
                if not _crc_mismatch(err):
                    raise
                failed[key(item)] = type(err).__name__

        def verify(item: Any) -> None:
            if key(item) in failed:
                raise ChecksumError(f"{self._uri(key(item))}: CRC32C of the bytes differs from "
                                    f"the object's ({failed[key(item)]})")

        transfer_verified(items, lambda batch: _parallel(checked, batch), verify,
                          lambda item: self._uri(key(item)))


def map_error(err: BaseException, uri: str, bucket: str) -> SftJobError | None:
    """The user-facing error for a google-cloud-storage failure, or None (a bug)."""
    import requests
    from google.api_core import exceptions as gx
    from google.auth import exceptions as ax
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    if isinstance(err, (ax.DefaultCredentialsError, ax.RefreshError)):
        return AccessError(
            f"{uri}: no usable Google credentials ({type(err).__name__}); use Workload Identity "
            "for the pod's ServiceAccount, or set GOOGLE_APPLICATION_CREDENTIALS")
    if isinstance(err, gx.NotFound):
        return AccessError(f"{uri}: bucket '{bucket}' does not exist (or the object is "
                           "missing); create it or fix the URI")
    if isinstance(err, (gx.Forbidden, gx.Unauthorized)):
        return AccessError(f"{uri}: access denied ({err.code}); grant the job's service account "
                           f"roles/storage.objectAdmin (or objectViewer to read) on '{bucket}'")
    if isinstance(err, gx.BadRequest):
        return SpecError(f"{uri}: GCS rejects this name or request ({err.code}: "
                         f"{str(err.message)[:160]}); fix the bucket name or object name")
    if isinstance(err, DataCorruption):
        return ChecksumError(f"{uri}: downloaded bytes fail their checksum")
    status = getattr(getattr(err, "response", None), "status_code", 0) or getattr(err, "code", 0)
    if isinstance(err, (gx.RetryError, gx.ServerError, gx.TooManyRequests, requests.RequestException,
                        ConnectionError, TimeoutError, ax.TransportError)) or (
            isinstance(status, int) and (status >= 500 or status == 429)):
        return TransientError(f"{uri}: GCS still failing after retrying for {retry_timeout():.0f}s "
                              f"({type(err).__name__}); rerun the job later")
    if isinstance(err, (gx.GoogleAPICallError, InvalidResponse)):
        return AccessError(f"{uri}: GCS refused the request ({status or type(err).__name__})")
    return None


def _crc_mismatch(err: BaseException) -> bool:
    """The client's CRC32C check failed: DataCorruption (downloads, resumable uploads), or GCS
    refusing a one-request upload whose CRC32C differs from the bytes it got (400)."""
    from google.api_core.exceptions import BadRequest
    from google.cloud.storage.exceptions import DataCorruption

    return isinstance(err, DataCorruption) or (
        isinstance(err, BadRequest) and "crc32c" in str(err.message).lower())


def _parallel(fn: Any, items: list[Any]) -> None:
    if len(items) == 1:
        fn(items[0])
        return
    with ThreadPoolExecutor(min(WORKERS, len(items))) as pool:
        for _ in pool.map(fn, items):
            pass


def _retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=0.5, multiplier=2.0, maximum=16.0).with_timeout(
        retry_timeout())


def _credential_kind(client: Any) -> str:
    creds = client._credentials
    return f"google:{type(creds).__module__.rsplit('.', 1)[-1]}.{type(creds).__name__}"


@functools.lru_cache(maxsize=4)
def _client(_env: tuple[str | None, ...]) -> Any:
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "test"),
                              credentials=AnonymousCredentials())
    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT"))
