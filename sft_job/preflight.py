"""Preflight: everything `sft-job validate` checks before a GPU is rented."""

from __future__ import annotations

import uuid

from sft_job import storage


def probe_output(uri: str) -> None:
    """Write then delete a small probe object under `uri`: a missing bucket, denied access or
    a path that is a file fails here (exit 3) instead of after training."""
    from sft_job.errors import AccessError
    from sft_job.storage.base import split_uri

    scheme, _, key = split_uri(uri)
    if scheme == "file":
        from pathlib import Path

        p = Path(key)
        if p.exists() and not p.is_dir():
            raise AccessError(f"output.uri: {uri} is a file, not a directory")
    probe = storage.join(uri, f".sft-job-probe-{uuid.uuid4().hex[:8]}")
    storage.write_text(probe, "probe")
    storage.delete_prefix(probe)
