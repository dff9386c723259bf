"""Base model and tokenizer: resolve model.base to a local folder, load, apply full/LoRA/QLoRA."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft_job.errors import (
    AccessError,
    ModelError,
    SftJobError,
    SpecError,
    TransientError,
    UnsupportedError,
)
from sft_job.models import source
from sft_job.spec import MethodSpec, ModelSpec

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolve_model_dir(base: str, revision: str | None = None, dtype: str = "float32") -> Path:
    """A local folder holding the model `base` names (built, downloaded, converted or cached
    once). A GGUF file is dequantized to `dtype` (the training dtype)."""
    src = source.parse(base)
    if src.kind == "builtin":
        from sft_job.models.builtin import build_builtin

        return build_builtin(base)
    if src.gguf:
        return gguf_model_dir(src, revision, dtype)
    if src.kind == "bucket":
        from sft_job.storage.cache import fetch_model

        path = fetch_model(base)
    elif src.kind == "local":
        path = src.path
        if not path.is_dir():
            raise ModelError(f"model.base: {base} is not a directory (or a .gguf file)")
    else:
        path = _hub_snapshot(src.location, revision)
    check_model_dir(path, base)
    return path


def gguf_file(src: source.ModelSource, revision: str | None = None) -> Path:
    """The local path of a GGUF source (downloaded once from a bucket or the Hub)."""
    if src.kind == "local":
        path = src.path
        if not path.is_file():
            raise ModelError(f"model.base: {src.uri}: no such file")
        return path
    if src.kind == "bucket":
        from sft_job.storage.cache import fetch_file

        return fetch_file(src.uri)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(src.location, src.filename or "", revision=revision))
    except LocalEntryNotFoundError:
        raise AccessError(f"model.base: {src.uri} is not in the local Hugging Face cache and "
                          "the Hub cannot be reached") from None
    except HfHubHTTPError as e:
        raise AccessError(f"model.base: cannot download {src.uri} from the Hub "
                          f"({e.response.status_code if e.response is not None else 'no response'})"
                          ) from None


def gguf_model_dir(src: source.ModelSource, revision: str | None, dtype: str,
                   weights: bool = True) -> Path:
    """The safetensors folder converted from a GGUF source (cached; see models/gguf.py)."""
    from sft_job.models import gguf
    from sft_job.storage.cache import cache_root

    return gguf.cached_dir(gguf_file(src, revision), dtype, cache_root() / "gguf", weights)


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
        raise AccessError(f"model.base: cannot download {repo_id} from the Hub "
                          f"({e.response.status_code if e.response is not None else 'no response'}); "
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
        status = e.response.status_code if e.response is not None else "no response"
        raise AccessError(f"model.base: cannot read {repo_id} on the Hub ({status})") from None
    except (HTTPError, OSError) as e:  # connection refused, DNS, timeouts
        raise TransientError(f"model.base: the Hub cannot be reached for {repo_id} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def check_model_dir(path: Path, base: str) -> None:
    """A model folder needs a config and weights: fail here, not deep inside transformers."""
    if not (path / "config.json").is_file():
        raise ModelError(f"model.base: {base} has no config.json; is it a saved model folder?")
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        raise ModelError(f"model.base: {base} has no weights (*.safetensors or pytorch_model.bin); "
                         "was the upload incomplete?")
    from sft_job.models.files import check_config, check_weights

    check_config(path, base)
    check_weights(path, base)


@contextlib.contextmanager
def loading(what: str, src: Any) -> Iterator[None]:
    """Loading a model, tokenizer or adapter from a user's files: whatever the libraries raise
    about the files (corrupt, wrong kind, mismatched shapes, a refused pickle, a package the
    model's code needs) becomes one ModelError line (exit 2) naming them."""
    try:
        yield
    except (SftJobError, MemoryError, KeyboardInterrupt):
        raise
    except ImportError as e:
        raise UnsupportedError(f"{what}: loading {src} needs a package that is not installed "
                               f"({_first_line(e)})") from None
    except Exception as e:  # tokenizers raises a plain Exception for a bad file
        if "ignore_mismatched_sizes" in str(e):
            raise ModelError(f"{what}: cannot load {src}: the shapes of its weights do not match "
                             "config.json (the mismatches are listed above)") from None
        raise ModelError(f"{what}: cannot load {src}: {type(e).__name__}: {_first_line(e)}") \
            from None


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:240].strip() if lines else "no details"


def load_tokenizer(spec: ModelSpec, model_dir: Path, need_chat_template: bool) -> Any:
    """Tokenizer with a pad token and (for chat data) a chat template, ChatML when none."""
    from transformers import AutoTokenizer

    from sft_job.models.chat import CHATML_TEMPLATE, ensure_template

    src = spec.tokenizer or str(model_dir)
    if spec.tokenizer and spec.tokenizer.startswith(("s3://", "gs://")):
        from sft_job.storage.cache import fetch_model

        src = str(fetch_model(spec.tokenizer))
    with loading("model.tokenizer", f"a tokenizer from {src}"):
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=spec.trust_remote_code)
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"model.tokenizer: {src} has no fast tokenizer (tokenizer.json); "
                         "sft-job needs character offsets to mask prompts")
    if tok.eos_token is None:
        raise ModelError(f"model.tokenizer: {src} has no EOS token; the model could never learn "
                         "to stop. Use a tokenizer with one")
    if tok.pad_token is None:
        # Labels are built from positions, so pad == EOS never hides the trained EOS.
        tok.pad_token = tok.eos_token
    if spec.chat_template == "chatml":
        tok.chat_template = CHATML_TEMPLATE
    elif spec.chat_template:
        tok.chat_template = spec.chat_template
    elif need_chat_template:
        ensure_template(tok)
    return tok


def load_model(spec: ModelSpec, method: MethodSpec, model_dir: Path, dtype: Any,
               attn: str, device_map: Any = None) -> Any:
    """The base model, 4-bit quantized for QLoRA, with input grads for checkpointing + PEFT."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn,
                              "trust_remote_code": spec.trust_remote_code}
    if method.kind == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if device_map is not None:
        kwargs["device_map"] = device_map
    with loading("model.base", spec.base):
        model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True,
                                                           **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would train them from random values, silently
        raise ModelError(f"model.base: {spec.base}: {len(missing)} weight(s) of "
                         f"{type(model).__name__} are not in its files (e.g. {missing[0]}); the "
                         "weights do not match config.json (another architecture?)")
    model.config.use_cache = False
    if method.kind == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=method.gradient_checkpointing)
    return model


def lora_config(method: MethodSpec, model: Any) -> Any:
    """PEFT LoraConfig for lora/qlora, None for full fine-tuning."""
    if method.kind == "full":
        return None
    from peft import LoraConfig

    check_targets(method, model)
    fan_in_fan_out = getattr(model.config, "model_type", "") in ("gpt2",)  # Conv1D weights
    return LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=method.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=fan_in_fan_out,
    )


def check_targets(method: MethodSpec, model: Any) -> None:
    """Each name in method.target_modules matches a layer LoRA can adapt (PEFT's suffix rule),
    else SpecError naming the layers there are: found before anything is written, not as a
    traceback from PEFT."""
    if method.target_modules == "all-linear":
        return
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
             torch.nn.Conv3d, torch.nn.MultiheadAttention, Conv1D)
    modules = dict(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                     if isinstance(m, (torch.nn.Linear, Conv1D)) and n})
    hint = f"its adaptable layers are named {', '.join(linear[:12])} (or use all-linear)"
    for t in method.target_modules:
        hits = [m for n, m in modules.items() if n == t or n.endswith("." + t)]
        if not hits:
            raise SpecError(f"method.target_modules: '{t}' matches no layer of "
                            f"{type(model).__name__}; {hint}")
        bad = next((m for m in hits if not isinstance(m, kinds)), None)
        if bad is not None:
            raise SpecError(f"method.target_modules: '{t}' is a {type(bad).__name__}, which LoRA "
                            f"cannot adapt; {hint}")


def check_vocab(spec: ModelSpec, tokenizer: Any, model: Any) -> None:
    """Every token id the tokenizer can produce has an embedding row (a bigger tokenizer, e.g.
    model.tokenizer from another model, fails here instead of as an index error in training)."""
    emb = model.get_input_embeddings()
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelError(f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but "
                         f"{spec.base}'s embedding has {rows} rows; use the model's own "
                         "tokenizer (or one of the same vocabulary)")
