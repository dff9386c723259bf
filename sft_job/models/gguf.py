"""GGUF files as base models: dequantized once into a safetensors model folder, then cached.

transformers reads GGUF (with the `gguf` package) but refuses to `save_pretrained` a model it
loaded that way, so the weights are moved into a model built from the same config without its
`quantization_config` and saved from there. A quantized GGUF (Q4, Q8) is dequantized: the
result holds the quantized values exactly, in the training dtype, not the original weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sft_job.errors import ModelError, SpecError
from sft_job.models.chat import END_OF_TURN

log = logging.getLogger(__name__)

VERSION = 1


def _require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise SpecError("model.base: reading a .gguf file needs the gguf package: "
                        "pip install 'sft-job[gguf]'")


def cached_dir(gguf_file: Path, dtype: str, root: Path, weights: bool = True) -> Path:
    """The model folder converted from `gguf_file` (built once under `root`, renamed into
    place when complete). `weights=False` gives the tokenizer and config only (for validate
    and the memory estimate: no dequantization)."""
    st = gguf_file.stat()
    key = f"{gguf_file.resolve()}\t{st.st_size}\t{st.st_mtime_ns}\t{VERSION}"
    name = hashlib.sha256(key.encode()).hexdigest()[:24]
    final = root / (f"{name}-{dtype}" if weights else f"{name}-meta")
    if (final / "config.json").is_file():
        return final
    return build(gguf_file, final, dtype, weights)


def build(gguf_file: Path, final: Path, dtype: str, weights: bool = True) -> Path:
    """Convert `gguf_file` into `final` (a temp folder renamed into place: a reader never
    sees half a model; a concurrent builder's identical result wins the race harmlessly)."""
    _require_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        log.info("converting %s to a %s safetensors model (once; cached in %s)", gguf_file.name,
                 dtype if weights else "tokenizer+config", final)
        tok = _tokenizer(gguf_file)
        config = _convert_weights(gguf_file, tmp, dtype, tok) if weights else _config(gguf_file)
        config.save_pretrained(tmp)
        tok.model_max_length = getattr(config, "max_position_embeddings", None) or 2048
        tok.save_pretrained(tmp)
        for f in tmp.iterdir():  # a shared cache must be readable by every uid
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tokenizer(gguf_file: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"model.base: cannot read the tokenizer of {gguf_file}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _config(gguf_file: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"model.base: cannot read {gguf_file} as a model: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return _plain_config(config)


def _plain_config(config: Any) -> Any:
    """The config without its GGUF quantization entry (a plain dense model)."""
    d = config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"):
        d.pop(k, None)
    d["use_cache"] = True
    return type(config).from_dict(d)


def _convert_weights(gguf_file: Path, out: Path, dtype: str, tok: Any) -> Any:
    """Dequantize into `out` (safetensors + generation config); returns the plain config."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                      dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"model.base: cannot dequantize {gguf_file}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    config = _plain_config(loaded.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelError(f"model.base: {gguf_file}: the GGUF lacks weights for {missing[0]} "
                         f"(and {len(missing) - 1} more)")
    gen = model.generation_config
    gen.eos_token_id = stop_ids(tok)
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen.bos_token_id = tok.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    return model.config


def stop_ids(tok: Any) -> list[int]:
    """EOS plus the end-of-turn tokens the vocabulary has (so generation stops at a turn's end
    whichever of them the chat template uses)."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    for t in END_OF_TURN:
        if t in vocab and vocab[t] not in ids and t in tok.all_special_tokens:
            ids.append(vocab[t])
    return ids
