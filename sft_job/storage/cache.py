"""A local cache of models kept in buckets or on the Hub, so each is downloaded once.

`fetch_model("s3://b/models/x")` lists the prefix, hashes the URI with every object's key,
size and ETag (GCS generation+CRC32C, Hub blob id), and downloads into
`$SFT_JOB_CACHE/models/<hash>/` through a temp folder renamed into place, so a reader never
sees a half-downloaded model and a changed model gets a new entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

from sft_job import storage
from sft_job.errors import AccessError
from sft_job.storage.base import COMMIT_MARKER
from sft_job.uri import is_remote

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """`$SFT_JOB_CACHE`, default ~/.cache/sft-job."""
    return Path(os.environ.get("SFT_JOB_CACHE", Path.home() / ".cache" / "sft-job"))


def work_root() -> Path:
    """Local scratch of the jobs: `$SFT_JOB_WORKDIR`, else <temp dir>/sft-job."""
    import tempfile

    return Path(os.environ.get("SFT_JOB_WORKDIR") or Path(tempfile.gettempdir()) / "sft-job")


def job_workdir(name: str, run_hash: str, output_uri: str) -> Path:
    """The work folder of one job on one output: <work_root>/<name>-<spec hash>-<output hash>
    (two outputs never share one)."""
    from sft_job.uri import location_key

    out = hashlib.sha256(repr(location_key(output_uri)).encode()).hexdigest()[:8]
    return work_root() / f"{name}-{run_hash[:8]}-{out}"


def hub_cache_root() -> Path:
    """The Hugging Face Hub cache (HF_HUB_CACHE, else HF_HOME/hub), without importing the Hub."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or home / "hub").expanduser()


def fetch_model(uri: str) -> Path:
    """A local folder holding the model stored under `uri` (s3://, gs://, hf://, or a local
    folder, returned as is), downloaded only if this exact content is not cached yet."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise AccessError(f"{uri}: no such model folder")
        return path
    info = {k: v for k, v in storage.list_info(uri).items() if k != COMMIT_MARKER}
    if not info:
        raise AccessError(f"{uri}: no model files under this prefix")
    h = hashlib.sha256(uri.rstrip("/").encode())
    for rel, o in sorted(info.items()):
        h.update(f"\n{rel}\t{o.size}\t{o.etag}".encode())
    root = cache_root() / "models"
    final = root / h.hexdigest()[:32]
    if final.is_dir():
        log.info("model %s: using the cached copy in %s", uri, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        storage.get_dir(uri, tmp)
        (tmp / COMMIT_MARKER).unlink(missing_ok=True)
        missing = sorted(set(info) - {p.relative_to(tmp).as_posix()
                                      for p in tmp.rglob("*") if p.is_file()})
        if missing:
            raise AccessError(f"{uri}: changed while downloading ({missing[0]} is gone); rerun")
        try:
            os.rename(tmp, final)  # atomic; fails if a concurrent fetch won the race
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (root / f"{final.name}.uri").write_text(uri + "\n")
    log.info("model %s: downloaded into %s", uri, final)
    return final


def fetch_file(uri: str) -> Path:
    """A local copy of the single object `uri` (a .gguf model file), downloaded once per
    (URI, size, ETag) into `$SFT_JOB_CACHE/files/<hash>/<name>`."""
    info = storage.stat(uri)
    if info is None:
        raise AccessError(f"{uri}: no such object")
    h = hashlib.sha256(f"{uri}\t{info.size}\t{info.etag}".encode()).hexdigest()[:32]
    final = cache_root() / "files" / h / uri.rstrip("/").rsplit("/", 1)[-1]
    if final.is_file():
        log.info("%s: using the cached copy in %s", uri, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        storage.get(uri, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s: downloaded into %s", uri, final)
    return final
