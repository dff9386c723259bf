"""Where `model.base` points, parsed once: builtin, Hub repo, local folder, bucket prefix, or a
GGUF file (local, bucket or Hub). Loading, preflight and the memory estimate all ask this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sft_job.errors import SpecError

Kind = Literal["builtin", "hub", "local", "bucket"]
BUCKET_SCHEMES = ("s3://", "gs://")


@dataclass(frozen=True)
class ModelSource:
    """A parsed `model.base` (or a `merge`/`generate` argument).

    kind: builtin (`location` is the builtin name), hub (a repo id), local (a path), bucket (an
    s3:// or gs:// URI). `gguf` is set when it names one .gguf file (for a Hub GGUF, `location`
    is the repo id and `filename` the file in it)."""

    uri: str
    kind: Kind
    location: str
    gguf: bool = False
    filename: str | None = None

    @property
    def path(self) -> Path:
        """The local path of a `local` source."""
        return Path(self.location).expanduser()


def parse(base: str) -> ModelSource:
    """Parse a model location; SpecError (exit 2) for a scheme sft-job cannot read."""
    gguf = base.lower().endswith(".gguf")
    if base.startswith("builtin:"):
        return ModelSource(base, "builtin", base)
    if base.startswith(BUCKET_SCHEMES):
        return ModelSource(base, "bucket", base, gguf)
    if "://" in base and not base.startswith(("file://", "hf://")):
        raise SpecError(f"model.base: {base}: unsupported URI scheme '{base.split('://')[0]}://' "
                        "(use a Hub id, a path, file://, s3://, gs:// or builtin:NAME)")
    if base.startswith("file://") or base.startswith(("/", ".", "~")) or Path(base).expanduser().exists():
        return ModelSource(base, "local", base.removeprefix("file://"), gguf)
    repo = base.removeprefix("hf://")
    if gguf:  # org/name/path/to/file.gguf
        parts = repo.split("/")
        if len(parts) < 3:
            raise SpecError(f"model.base: {base}: a Hub GGUF is org/name/file.gguf")
        return ModelSource(base, "hub", "/".join(parts[:2]), True, "/".join(parts[2:]))
    return ModelSource(base, "hub", repo)
