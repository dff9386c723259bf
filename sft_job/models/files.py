"""Cheap checks of a model folder's files, without torch: what `validate` and the first seconds
of `run` can tell about a base model before loading it.

config.json is a JSON object naming a model_type; every safetensors file has a readable header
whose tensors fit in the file (an empty, truncated or random file fails here, not as a
traceback deep inside transformers); a sharded index names shards that exist; pytorch_model.bin
files are not empty.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from sft_job.errors import ModelError

MAX_HEADER = 100 << 20  # safetensors' own limit
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_config(path: Path, base: str) -> dict:
    """The parsed config.json of the model folder `path` (ModelError if unusable)."""
    f = path / "config.json"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"model.base: {base}/config.json is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"model.base: {base}/config.json is not valid JSON (line {e.lineno}: "
                         f"{e.msg})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"model.base: {base}/config.json holds a {type(cfg).__name__}, not a "
                         "JSON object")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise ModelError(f"model.base: {base}/config.json has no model_type; is it a "
                         "transformers model?")
    return cfg


def check_safetensors(f: Path, base: str) -> None:
    """The safetensors file `f` has a valid header and holds every tensor it lists."""
    size = f.stat().st_size
    name = f"{base}/{f.name}"
    if size < 8:
        raise ModelError(f"model.base: {name} is empty or truncated ({size} bytes)")
    with f.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(MAX_HEADER, size - 8):
            raise ModelError(f"model.base: {name} is not a safetensors file (header length "
                             f"{n} in a {size}-byte file); re-save or re-upload it")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"model.base: {name} has a corrupt safetensors header") from None
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)] if isinstance(header, dict) else None
    if ends is None or not all(isinstance(e, int) for e in ends):
        raise ModelError(f"model.base: {name} has a corrupt safetensors header")
    if 8 + n + max(ends, default=0) > size:
        raise ModelError(f"model.base: {name} is truncated ({size} bytes, its header lists "
                         f"{8 + n + max(ends)}); re-upload it")


def check_index(f: Path, base: str) -> None:
    """A sharded checkpoint's index parses and every shard it names exists."""
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        shards = set(doc["weight_map"].values())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ModelError(f"model.base: {base}/{f.name} is not a valid weight index") from None
    missing = sorted(s for s in shards if not isinstance(s, str) or not (f.parent / s).is_file())
    if missing:
        raise ModelError(f"model.base: {base}/{f.name} names {len(missing)} missing shard(s), "
                         f"e.g. {missing[0]}; was the upload incomplete?")


def check_weights(path: Path, base: str) -> None:
    """Every weight file of the folder passes its check (see the module docstring)."""
    for f in sorted(path.glob("*.safetensors")):
        check_safetensors(f, base)
    for f in sorted(path.glob("*.index.json")):
        check_index(f, base)
    for f in sorted(path.glob("pytorch_model*.bin")):
        if f.stat().st_size == 0:
            raise ModelError(f"model.base: {base}/{f.name} is empty; re-upload it")


def check_model_dir(path: Path, base: str) -> None:
    """A model folder needs a config and weights: fail here, not deep inside transformers."""
    if not (path / "config.json").is_file():
        raise ModelError(f"model.base: {base} has no config.json; is it a saved model folder?")
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        raise ModelError(f"model.base: {base} has no weights (*.safetensors or pytorch_model.bin); "
                         "was the upload incomplete?")
    check_config(path, base)
    check_weights(path, base)
