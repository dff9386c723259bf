"""Where `model.base` points, parsed once: builtin, Hub repo, local folder, bucket prefix, or a
GGUF file (local, bucket or Hub); and the three things the job asks of it:

    src = parse(spec.model.base)
    src.check(revision)             its files are there (no download): validate, run's first seconds
    src.meta_dir(revision)          config + tokenizer, no weights: validate, the memory estimate
    src.local_dir(revision, dtype)  the whole model in a local folder (downloaded/converted once)
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sft_job.errors import AccessError, ModelError, SpecError, TransientError

Kind = Literal["builtin", "hub", "local", "bucket"]
BUCKET_SCHEMES = ("s3://", "gs://")
# What `meta_dir` downloads of a bucket model: everything but the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "config.json", "generation_config.json")


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

    def local_dir(self, revision: str | None = None, dtype: str = "float32") -> Path:
        """A local folder holding the model (built, downloaded, converted or cached once). A
        GGUF file is dequantized to `dtype` (the training dtype)."""
        from sft_job.models.files import check_model_dir

        if self.kind == "builtin":
            from sft_job.models.builtin import build_builtin

            return build_builtin(self.uri)
        if self.gguf:
            return self._gguf_dir(revision, dtype, weights=True)
        if self.kind == "bucket":
            from sft_job.storage.cache import fetch_model

            path = fetch_model(self.uri)
        elif self.kind == "local":
            path = self.path
            if not path.is_dir():
                raise ModelError(f"model.base: {self.uri} is not a directory (or a .gguf file)")
        else:
            path = _hub_snapshot(self.location, revision)
        check_model_dir(path, self.uri)
        return path

    def meta_dir(self, revision: str | None = None) -> Path | str:
        """Where the config and tokenizer can be loaded from without the weights: a local
        folder, or the Hub id itself (transformers fetches only what it loads)."""
        from sft_job.models.files import check_model_dir

        if self.kind == "builtin":
            from sft_job.models.builtin import build_builtin

            return build_builtin(self.uri)
        if self.gguf:  # tokenizer and config only: no dequantization
            return self._gguf_dir(revision, "float32", weights=False)
        if self.kind == "bucket":
            return _bucket_meta(self.uri)
        if self.kind == "local":
            check_model_dir(self.path, self.uri)
            return self.path
        return self.location

    def check(self, revision: str | None = None) -> None:
        """The model's folder, file or prefix holds a config and weights (no download; a Hub
        model: one metadata call)."""
        from sft_job.models.files import check_model_dir

        if self.kind == "builtin":
            from sft_job.models.builtin import check_builtin

            check_builtin(self.uri)
        elif self.gguf:
            self._check_gguf()
        elif self.kind == "bucket":
            bucket_model_keys(self.uri)
        elif self.kind == "local":
            if not self.path.is_dir():
                raise SpecError(f"{self.uri}: no such model directory (or .gguf file)")
            check_model_dir(self.path, self.uri)
        else:
            check_hub_model(self.location, revision)

    def _check_gguf(self) -> None:
        """A readable file that starts with the GGUF magic (a bucket object exists; a Hub repo
        exists)."""
        from sft_job import storage

        if importlib.util.find_spec("gguf") is None:
            raise SpecError("reading a .gguf file needs the gguf package: pip install 'sft-job[gguf]'")
        if self.kind == "local":
            if not self.path.is_file():
                raise SpecError(f"{self.uri}: no such file")
            with self.path.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise SpecError(f"{self.uri}: not a GGUF file (no GGUF header)")
        elif self.kind == "bucket":
            if storage.stat(self.uri) is None:
                raise AccessError(f"{self.uri}: no such object")
        else:
            check_hub_model(self.location)

    def _gguf_dir(self, revision: str | None, dtype: str, weights: bool) -> Path:
        """The safetensors folder converted from this GGUF (cached; see models/gguf.py)."""
        from sft_job.models import gguf
        from sft_job.storage.cache import cache_root

        return gguf.cached_dir(self._gguf_file(revision), dtype, cache_root() / "gguf", weights)

    def _gguf_file(self, revision: str | None) -> Path:
        """The local path of the GGUF file (downloaded once from a bucket or the Hub)."""
        if self.kind == "local":
            if not self.path.is_file():
                raise ModelError(f"model.base: {self.uri}: no such file")
            return self.path
        if self.kind == "bucket":
            from sft_job.storage.cache import fetch_file

            return fetch_file(self.uri)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(self.location, self.filename or "", revision=revision))
        except LocalEntryNotFoundError:
            raise AccessError(f"model.base: {self.uri} is not in the local Hugging Face cache "
                              "and the Hub cannot be reached") from None
        except HfHubHTTPError as e:
            raise AccessError(f"model.base: cannot download {self.uri} from the Hub "
                              f"({_status(e)})") from None


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


def resolve_model_dir(base: str, revision: str | None = None, dtype: str = "float32") -> Path:
    """A local folder holding the model `base` names (see ModelSource.local_dir)."""
    return parse(base).local_dir(revision, dtype)


def bucket_model_keys(uri: str) -> list[str]:
    """The keys of a bucket model prefix, after checking it has a config and weights."""
    from sft_job import storage

    keys = storage.list_keys(uri)
    if not keys:
        raise AccessError(f"{uri}: empty or missing model prefix")
    if "config.json" not in keys:
        raise ModelError(f"{uri}: no config.json; is it a saved model folder?")
    if not any(k.endswith((".safetensors", ".bin")) for k in keys):
        raise ModelError(f"{uri}: no weights (*.safetensors or *.bin); was the upload incomplete?")
    return keys


def _bucket_meta(uri: str) -> Path:
    """Download only the tokenizer and config of a bucket model (not the weights), after
    checking the listing has weights."""
    from sft_job import storage

    keys = bucket_model_keys(uri)
    dest = Path(tempfile.mkdtemp(prefix="sft-job-tok-"))
    for k in keys:
        if k in TOKENIZER_FILES:
            storage.get(storage.join(uri, k), dest / k)
    return dest


def _status(e: BaseException) -> object:
    response = getattr(e, "response", None)
    return response.status_code if response is not None else "no response"


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(
            repo_id, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py",
                            "tokenizer*"],
        ))
    except LocalEntryNotFoundError:
        raise AccessError(f"model.base: {repo_id} is not in the local Hugging Face cache and the "
                          "Hub cannot be reached (HF_HUB_OFFLINE set or no network)") from None
    except HfHubHTTPError as e:
        raise AccessError(f"model.base: cannot download {repo_id} from the Hub ({_status(e)}); "
                          "check the id and HF_TOKEN for gated/private models") from None


def check_hub_model(repo_id: str, revision: str | None = None) -> None:
    """A Hub model exists and is readable (one metadata call; offline: it is in the local
    cache), without downloading it. AccessError (exit 3) if not, SpecError for a bad id."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        HTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        if constants.HF_HUB_OFFLINE:
            if not isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision),
                              str):
                raise AccessError(f"model.base: {repo_id} is not in the local Hugging Face cache "
                                  "and the Hub cannot be reached (HF_HUB_OFFLINE is set)")
            return
        HfApi().model_info(repo_id, revision=revision)
    except HFValidationError as e:
        raise SpecError(f"model.base: '{repo_id}' is not a Hub model id "
                        f"({str(e).splitlines()[0]})") from None
    except GatedRepoError:
        raise AccessError(f"model.base: {repo_id} is gated: accept its terms on the Hub and set "
                          "HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise AccessError(f"model.base: {repo_id}: no such model on the Hub (or it is private: "
                          "set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise SpecError(f"model.revision: {revision!r} does not exist in {repo_id}") from None
    except HfHubHTTPError as e:
        raise AccessError(f"model.base: cannot read {repo_id} on the Hub ({_status(e)})") from None
    except (HTTPError, OSError) as e:  # connection refused, DNS, timeouts
        raise TransientError(f"model.base: the Hub cannot be reached for {repo_id} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
