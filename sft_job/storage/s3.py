"""S3 and S3-compatible stores through boto3: parallel multipart transfers, verified by ETag.

Credentials come from boto3's default chain (env, profile, IRSA / Pod Identity, instance
role); a custom endpoint from AWS_ENDPOINT_URL_S3, which boto3 reads itself (the job exports
`output.s3_endpoint_url` there: see storage.export_s3_endpoint). botocore retries throttling,
5xx and dropped connections (`standard` mode with jittered backoff, SFT_JOB_STORAGE_MAX_ATTEMPTS
or AWS_MAX_ATTEMPTS attempts, default 8). Every request carries botocore's CRC32 (flexible
checksums) and whole-object GETs are checked against it. That is not enough on its own: ranged
GETs (s3transfer's parallel downloads) and composite multipart checksums go unchecked, and
S3-compatible stores (moto, some MinIO/R2 setups) accept a PUT whose CRC32 differs. So after
each transfer the file's MD5 (or multipart MD5-of-MD5s) is compared with the ETag by hand, and
a mismatch is transferred again. Under SSE-KMS or SSE-C the ETag is not an MD5 (a bucket
encrypted by default, as terraform/aws makes it, reports such ETags for every object); a HEAD
says so, a listing does not, so a listed ETag that does not match is checked against the HEAD
before it counts as a mismatch, and botocore's per-request CRC32s are the check left.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sft_job.errors import AccessError, SftJobError, SpecError, TransientError
from sft_job.storage.base import ObjectInfo
from sft_job.storage.bucket import BucketStore
from sft_job.storage.checksum import ChecksumError, s3_etag
from sft_job.storage.progress import Progress
from sft_job.storage.retry import VERIFY_ATTEMPTS, max_attempts, transfer_verified

MULTIPART_THRESHOLD = 8 << 20
MULTIPART_CHUNK = 16 << 20
MAX_CONCURRENCY = 10

_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
             "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE",
             "SFT_JOB_STORAGE_MAX_ATTEMPTS",
             "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN",
             "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "InvalidAccessKeyId",
           "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
           "Forbidden", "403", "401", "InvalidObjectState"}
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
              "ServiceUnavailable", "InternalError", "RequestTimeout", "RequestTimeTooSkewed",
              "500", "502", "503", "504", "BadDigest"}


class S3Store(BucketStore):
    """One S3 bucket. Keys are '/'-separated; a prefix names the 'folder' `prefix/`."""

    scheme = "s3"

    def __init__(self, bucket: str) -> None:
        super().__init__(bucket)
        self.session, self.client = _client(tuple(os.environ.get(k) for k in _ENV_KEYS))

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import FlexibleChecksumError

        with self._errors(key):
            for _ in range(VERIFY_ATTEMPTS):
                resp = self.client.get_object(Bucket=self.name, Key=key)
                try:
                    data = resp["Body"].read()  # botocore checks the CRC S3 stored, if any
                except FlexibleChecksumError:
                    continue
                if _bytes_match(data, resp):
                    return data
            raise ChecksumError(f"{self._uri(key)}: downloaded bytes do not match the ETag "
                                f"after {VERIFY_ATTEMPTS} tries")

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            for _ in range(VERIFY_ATTEMPTS):
                resp = self.client.put_object(Bucket=self.name, Key=key, Body=data)
                if _bytes_match(data, resp):
                    return
            raise ChecksumError(f"{self._uri(key)}: the stored ETag does not match the bytes "
                                f"sent after {VERIFY_ATTEMPTS} tries")

    def credential_source(self) -> str:
        """Which link of boto3's chain supplies credentials, e.g. 'aws:iam-role' (no secret)."""
        with self._errors(""):
            creds = self.session.get_credentials()
            if creds is None:
                from botocore.exceptions import NoCredentialsError

                raise NoCredentialsError()
            return f"aws:{creds.method}"

    def _map_error(self, err: BaseException, uri: str) -> SftJobError | None:
        return map_error(err, uri, self.name)

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.name, Key=key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                self.client.head_bucket(Bucket=self.name)  # 404 on a missing bucket too
                return None
            raise
        return {**head, "Key": key, "Size": head["ContentLength"]}

    def _objects(self, prefix: str, limit: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", []):
                yield o["Key"], o

    def _info(self, obj: dict[str, Any]) -> ObjectInfo:
        return ObjectInfo(obj["Size"], obj["ETag"].strip('"'))

    def _check_bucket(self, prefix: str = "") -> None:
        self.client.list_objects_v2(Bucket=self.name, Prefix=prefix, MaxKeys=1)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.name, Key=key)

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            resp = self.client.delete_objects(Bucket=self.name, Delete={
                "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
            if resp.get("Errors"):
                e = resp["Errors"][0]
                raise AccessError(f"{self._uri(e['Key'])}: delete failed ({e['Code']}); the "
                                  f"job's identity needs s3:DeleteObject")

    def _manager(self) -> Any:
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                             multipart_chunksize=MULTIPART_CHUNK, max_concurrency=MAX_CONCURRENCY,
                             preferred_transfer_client="classic")
        return create_transfer_manager(self.client, cfg)

    def _upload(self, pairs: list[tuple[Path, str]], uri: str) -> None:
        total = sum(p.stat().st_size for p, _ in pairs)
        # The local ETags are computed while the bytes travel, so verifying costs a HEAD.
        with Progress(total, f"upload {uri}") as progress, ThreadPoolExecutor(2) as hasher:
            expected = {p: hasher.submit(_expected_etag, p) for p, _ in pairs}

            def transfer(batch: list[tuple[Path, str]]) -> None:
                with self._manager() as tm:
                    futures = [tm.upload(str(p), self.name, k, subscribers=[_Sub(progress)])
                               for p, k in batch]
                    for f in futures:
                        f.result()

            transfer_verified(pairs, transfer,
                              lambda pk: self._verify(pk[0], pk[1], local=expected[pk[0]]),
                              lambda pk: self._uri(pk[1]))

    def _download(self, items: list[tuple[Path, dict[str, Any]]], uri: str) -> None:
        from botocore.exceptions import FlexibleChecksumError

        with Progress(sum(o["Size"] for _, o in items), f"download {uri}") as progress:
            def transfer(batch: list[tuple[Path, dict[str, Any]]]) -> None:
                for dest, _ in batch:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                with self._manager() as tm:
                    futures = [tm.download(self.name, o["Key"], str(dest),
                                           subscribers=[_Sub(progress)])
                               for dest, o in batch]
                    for f in futures:
                        # botocore's CRC check failed: the file is absent and verify retries it
                        with contextlib.suppress(FlexibleChecksumError):
                            f.result()

            transfer_verified(items, transfer, lambda i: self._verify(i[0], i[1]["Key"], i[1]),
                              lambda i: self._uri(i[1]["Key"]))

    def _verify(self, path: Path, key: str, head: dict[str, Any] | None = None,
                local: Future[str] | None = None) -> None:
        """Raise ChecksumError unless the local file matches the object's size and ETag.
        `local`: the ETag this file gets with our part size, computed ahead."""
        head = head or self._head(key)
        if head is None or not path.is_file():
            raise ChecksumError(f"{self._uri(key)}: missing after the transfer")
        size = path.stat().st_size
        if head["Size"] != size:
            raise ChecksumError(f"{self._uri(key)}: {head['Size']} bytes in S3, {size} locally")
        if _etag_not_md5(head):
            return  # SSE-KMS / SSE-C: the ETag is no MD5; per-request CRC32s still apply
        etag = head["ETag"].strip('"')
        if local is not None and local.result() == etag:
            return
        part = None
        if "-" in etag:  # multipart: the part size is whatever the uploader used
            part = self.client.head_object(Bucket=self.name, Key=key,
                                           PartNumber=1)["ContentLength"]
        mine = s3_etag(path, part)
        if mine != etag:
            if "ContentLength" not in head and _etag_not_md5(self._head(key) or {}):
                return  # a listing does not say how an object is encrypted; its HEAD does
            raise ChecksumError(f"{self._uri(key)}: ETag {etag} in S3, {mine} locally")


class _Sub:
    """s3transfer subscriber feeding a Progress."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self.progress.update(bytes_transferred)

    def on_queued(self, future: Any, **kwargs: Any) -> None: ...
    def on_done(self, future: Any, **kwargs: Any) -> None: ...


def _expected_etag(path: Path) -> str:
    """The ETag s3transfer's upload of `path` will get (same threshold and part size)."""
    from s3transfer.utils import ChunksizeAdjuster

    size = path.stat().st_size
    if size < MULTIPART_THRESHOLD:
        return s3_etag(path)
    return s3_etag(path, ChunksizeAdjuster().adjust_chunksize(MULTIPART_CHUNK, size))


def _etag_not_md5(head: dict[str, Any]) -> bool:
    return str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm"))


def _bytes_match(data: bytes, resp: dict[str, Any]) -> bool:
    etag = resp.get("ETag", "").strip('"')
    if _etag_not_md5(resp) or "-" in etag or not etag:
        return True
    return hashlib.md5(data, usedforsecurity=False).hexdigest() == etag


def map_error(err: BaseException, uri: str, bucket: str) -> SftJobError | None:
    """The user-facing error for a boto3/botocore/s3transfer failure, or None (a bug)."""
    from botocore import exceptions as bx
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError,
                        bx.CredentialRetrievalError, bx.TokenRetrievalError, bx.SSOError,
                        bx.ProfileNotFound, bx.NoAuthTokenError)):
        return AccessError(
            f"{uri}: no usable AWS credentials ({type(err).__name__}); give the job an IAM role "
            "(IRSA, EKS Pod Identity, instance profile) or set AWS_PROFILE or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "NoSuchBucket" or (status == 404 and err.operation_name == "HeadBucket"):
            return AccessError(f"{uri}: bucket '{bucket}' does not exist; create it or fix "
                               "the URI (and the endpoint/region)")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return AccessError(f"{uri}: no such object")
        if code in _DENIED or status in (401, 403):
            return AccessError(
                f"{uri}: access denied ({code or status}); grant the job's identity "
                f"s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject on '{bucket}'")
        if code in _TRANSIENT or status >= 500 or status == 429:
            return TransientError(f"{uri}: S3 still failing after {max_attempts()} attempts "
                                  f"({code or status}); rerun the job later")
        if status == 400 and code not in ("AuthorizationHeaderMalformed", "InvalidRequest"):
            return SpecError(f"{uri}: S3 rejects this name or request ({code or status}); fix "
                             "the bucket name or key")
        return AccessError(f"{uri}: S3 refused the request ({code or status})")
    if isinstance(err, bx.ParamValidationError):
        return SpecError(f"{uri}: rejected by the S3 client: {str(err).splitlines()[-1].strip()}")
    if isinstance(err, (bx.HTTPClientError, bx.ConnectionError, bx.IncompleteReadError,
                        RetriesExceededError, ConnectionError, TimeoutError)):
        return TransientError(f"{uri}: cannot reach S3 after {max_attempts()} attempts "
                              f"({type(err).__name__}); check the endpoint or rerun the job later")
    if isinstance(err, bx.FlexibleChecksumError):
        return ChecksumError(f"{uri}: downloaded bytes fail their CRC checksum")
    return None


@functools.lru_cache(maxsize=8)
def _client(_env: tuple[str | None, ...]) -> tuple[Any, Any]:
    """A (session, client) pair, cached per credential- and endpoint-related environment
    (`output.s3_endpoint_url` arrives as AWS_ENDPOINT_URL_S3: see storage.export_s3_endpoint)."""
    import boto3
    from botocore.config import Config

    where = next((k for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL") if os.environ.get(k)),
                 None)
    if where:
        from sft_job.uri import endpoint_problem

        problem = endpoint_problem(os.environ[where])
        if problem:
            raise SpecError(f"{where}: {problem}")
    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                 "max_attempts": max_attempts()},
        max_pool_connections=MAX_CONCURRENCY * 2,
        connect_timeout=10,
        read_timeout=120,
        # S3-compatible stores (MinIO, moto, R2) rarely do virtual-hosted buckets.
        s3={"addressing_style": "path"} if where else None,
    )
    session = boto3.session.Session()
    try:
        return session, session.client("s3", config=config)
    except ValueError as e:  # botocore's own checks of the endpoint and region
        raise SpecError(f"S3 client settings (endpoint, AWS_REGION): {e}") from None
