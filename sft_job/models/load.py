"""Base model and tokenizer, loaded from a local folder (models/source.py finds it); full/LoRA/QLoRA."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sft_job.errors import (
    ModelError,
    SftJobError,
    SpecError,
    UnsupportedError,
)
from sft_job.spec import MethodSpec, ModelSpec

log = logging.getLogger(__name__)

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
