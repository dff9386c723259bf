"""Checksums the object stores report, computed locally so transfers can be verified.

S3 ETags are the MD5 of the object (single part) or the MD5 of the parts' MD5s plus `-N`
(multipart); the Hub reports git blob SHA-1s (and SHA-256 for LFS files). GCS needs none of
these: its client checks CRC32C itself (gcs.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sft_job.errors import TransientError

_BLOCK = 1 << 20


class ChecksumError(TransientError):
    """Bytes on one side differ from the other after the transfer was retried (exit 75)."""


def md5_hex(path: Path) -> str:
    """Hex MD5 of a file."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def s3_etag(path: Path, part_size: int | None = None) -> str:
    """The ETag S3 gives `path`: plain MD5, or with `part_size` the multipart form
    md5(md5(part1) + md5(part2) + ...)-N."""
    if part_size is None:
        return md5_hex(path)
    digests = []
    with open(path, "rb") as f:
        while True:
            h = hashlib.md5(usedforsecurity=False)
            left = part_size
            while left:
                chunk = f.read(min(_BLOCK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            if left == part_size and digests:
                break  # nothing read: past the end
            digests.append(h.digest())
            if left:
                break
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: sha1(b'blob <size>\\0' + content), the Hub's `oid`."""
    h = hashlib.sha1(usedforsecurity=False)
    h.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def sha256_hex(path: Path) -> str:
    """Hex SHA-256 of a file (the Hub's LFS oid)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()
