"""Locations: the grammar of every input and output (paths, file://, s3://, gs://, hf://,
S3 endpoint URLs), without touching storage. The spec validates with it; storage/ transfers
with it."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sft_job.errors import SpecError

SCHEMES = ("file", "s3", "gs", "hf")
_BUCKET_RULES = {
    "s3": (re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
           "3-63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"),
    "gs": (re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"),
           "3-63 lowercase letters, digits, '-', '_' and '.' (222 with dots), starting and ending "
           "with a letter or digit"),
}
MAX_KEY_BYTES = 900  # S3 and GCS allow 1024; the job appends names such as checkpoints/step-N/


def uri_problem(uri: str) -> str | None:
    """Why `uri` cannot name a location (a control character, an unknown scheme, a bucket name
    S3/GCS would reject, a key or path too long), or None. Hub ids and builtin names pass."""
    bad = next((c for c in uri if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"{uri!r}: contains the control character {bad!r}"
    if "://" not in uri:
        return _path_problem(uri)
    scheme, rest = uri.split("://", 1)
    if scheme not in SCHEMES:
        return (f"{uri}: unsupported URI scheme '{scheme}://' "
                "(use a path, file://, s3://, gs:// or hf://)")
    if scheme == "file":
        return _path_problem(rest)
    if scheme == "hf":
        return None
    bucket, _, key = rest.partition("/")
    if not bucket:
        return f"{uri}: no bucket name"
    rx, rule = _BUCKET_RULES[scheme]
    if (not rx.fullmatch(bucket) or ".." in bucket or ".-" in bucket or "-." in bucket
            or any(len(p) > 63 for p in bucket.split("."))
            or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket)):
        return f"{uri}: '{bucket}' is not a valid {scheme}:// bucket name ({rule})"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return (f"{uri}: the object key is longer than {MAX_KEY_BYTES} bytes (S3 and GCS keys "
                "are at most 1024, and the job adds its own names under it)")
    return None


def _path_problem(path: str) -> str | None:
    raw = path.encode("utf-8", "surrogatepass")
    if len(raw) > 3000 or any(len(p) > 255 for p in raw.split(b"/")):
        return f"{path[:80]}...: path too long (a name is at most 255 bytes)"
    return None


def split_uri(uri: str) -> tuple[str, str, str]:
    """'s3://b/k/x' -> ('s3', 'b', 'k/x'); a plain path or file:// -> ('file', '', abs path).
    SpecError (exit 2) for what `uri_problem` refuses."""
    problem = uri_problem(uri)
    if problem:
        raise SpecError(problem)
    if "://" not in uri:
        return "file", "", str(Path(uri).expanduser().absolute())
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return "file", "", str(Path(rest).expanduser().absolute())
    if scheme == "hf":
        return "hf", "", rest.strip("/")
    bucket, _, key = rest.partition("/")
    return scheme, bucket, key.strip("/")


def location_key(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """(scheme, bucket, path parts) of `uri`, the same for every spelling of one place (local
    paths resolved: '~', '..', symlinks, file://)."""
    scheme, bucket, key = split_uri(uri)
    if scheme == "file":
        return "file", "", Path(os.path.realpath(key)).parts
    return scheme, bucket, tuple(p for p in key.split("/") if p)


def overlap(a: str, b: str) -> bool:
    """Whether the locations `a` and `b` are the same or one is inside the other (a path and
    a bucket prefix never overlap; 's3://b/run' and 's3://b/run2' do not)."""
    ka, kb = location_key(a), location_key(b)
    if ka[:2] != kb[:2]:
        return False
    n = min(len(ka[2]), len(kb[2]))
    return ka[2][:n] == kb[2][:n]


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI or path with '/'."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def is_remote(uri: str) -> bool:
    """Whether `uri` names object storage or the Hub rather than the local filesystem."""
    return "://" in uri and not uri.startswith("file://")


def endpoint_problem(url: str) -> str | None:
    """Why `url` cannot be an S3 endpoint (http(s)://host[:port][/path]), or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"'{url}' is not a URL ({e})"
    if parts.scheme not in ("http", "https") or not parts.hostname or any(
            ord(c) < 33 for c in url) or parts.query or parts.fragment or port == 0:
        return f"'{url}' is not an endpoint URL like https://host[:port]"
    return None
