"""Merge a LoRA adapter into its base model shard by shard: W += scale * B @ A.

PEFT's `merge_and_unload()` needs the whole base model in memory; here each safetensors shard of
the base is read, merged and written on its own, so peak memory is about one shard. QLoRA
adapters are merged into the original (unquantized) base weights. Adapters this cannot handle
(DoRA, rank/alpha patterns, embedding LoRA, modules_to_save) fall back to PEFT's merge.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sft_job.errors import ModelError

log = logging.getLogger(__name__)

_COPY_SKIP = ("model.safetensors", "model.safetensors.index.json", "pytorch_model",
              "adapter_", ".gitattributes")


def _base_shards(base_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text())
        return sorted(set(doc["weight_map"].values())), doc
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"], None
    raise ModelError(f"{base_dir}: no safetensors weights to merge into "
                     "(convert the base model to safetensors first)")


def _adapter_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float, bool] | None:
    """{module path: (A, B)}, scale, fan_in_fan_out; None when the adapter needs PEFT's merge."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if (cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern")
            or cfg.get("modules_to_save") or cfg.get("peft_type", "LORA") != "LORA"):
        return None
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, list[Any]] = {}
    for k, v in weights.items():
        if ".lora_A." in k or ".lora_B." in k:
            mod = k.split(".lora_")[0].removeprefix("base_model.model.")
            pairs.setdefault(mod, [None, None])[0 if ".lora_A." in k else 1] = v
        else:
            return None  # embeddings, biases or other trained extras
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return ({m: (a, b) for m, (a, b) in pairs.items()}, scale, bool(cfg.get("fan_in_fan_out")))


def _match(module: str, keys: set[str]) -> str | None:
    """The base weight key of an adapter module path, tolerating prefix differences
    (e.g. GPT-2 checkpoints saved without 'transformer.')."""
    parts = module.split(".")
    for i in range(len(parts)):
        k = ".".join(parts[i:]) + ".weight"
        if k in keys:
            return k
    return None


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer: Any = None) -> Path:
    """Write base + adapter as a plain safetensors model to `out_dir` (shard by shard)."""
    parsed = _adapter_deltas(adapter_dir)
    if parsed is None:
        log.info("merge: adapter needs PEFT's in-memory merge")
        return _peft_merge(base_dir, adapter_dir, out_dir, tokenizer)
    deltas, scale, fifo = parsed
    shards, index = _base_shards(base_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".merge-", dir=out_dir))
    done: set[str] = set()
    try:
        for shard in shards:
            done |= _merge_shard(base_dir / shard, tmp / shard, deltas, scale, fifo)
        missing = set(deltas) - done
        if missing:
            raise ModelError(f"merge: {len(missing)} adapter module(s) not found in the base "
                             f"weights (e.g. {sorted(missing)[0]}); is the adapter for this base "
                             "model?")
    except ModelError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in base_dir.iterdir():
        if f.is_file() and f.name not in shards and not f.name.startswith(_COPY_SKIP):
            shutil.copyfile(f, tmp / f.name)
    if index is not None:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _clean_config(tmp / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        f.replace(out_dir / f.name)
    tmp.rmdir()
    return out_dir


def _merge_shard(src: Path, dest: Path, deltas: dict[str, tuple[Any, Any]], scale: float,
                 fifo: bool) -> set[str]:
    """Write the base shard `src` to `dest` with the adapter's deltas added to the weights it
    holds; returns the adapter modules merged."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    done: set[str] = set()
    tensors: dict[str, Any] = {}
    with safe_open(str(src), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        targets = {_match(m, keys): m for m in deltas}
        for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(k)
            mod = targets.get(k)
            if mod is not None:
                a, b = deltas[mod]
                delta = (b.float() @ a.float()) * scale
                delta = delta.T if fifo else delta
                if delta.shape != t.shape:
                    raise ModelError(f"merge: adapter module {mod} has shape "
                                     f"{tuple(delta.shape)} but the base weight {k} is "
                                     f"{tuple(t.shape)}; is the adapter for this base model?")
                t = (t.float() + delta).to(t.dtype)
                done.add(mod)
            tensors[k] = t.contiguous()
    save_file(tensors, str(dest), metadata=meta or {"format": "pt"})
    del torch  # imported for its side effect on safetensors' pt backend
    return done


def _clean_config(path: Path) -> None:
    """The merged model is a plain one: drop any quantization settings of the QLoRA base."""
    if path.is_file():
        cfg = json.loads(path.read_text())
        if cfg.pop("quantization_config", None) is not None:
            path.write_text(json.dumps(cfg, indent=2))


def _peft_merge(base_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer: Any) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


CHECK_MAX_BYTES = 4 * 1024**3  # the check loads the base twice in fp32 on CPU


def max_logit_diff(base_dir: Path, adapter_dir: Path, merged_dir: Path,
                   input_ids: list[int]) -> float | None:
    """Largest |logit| difference between base+adapter (PEFT, unmerged) and the merged model,
    both loaded from disk in fp32 on CPU, on one sequence; None when the base is too big.
    For QLoRA this compares against the full-precision base the adapter was merged into."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    size = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
    if size > CHECK_MAX_BYTES:
        return None
    x = torch.tensor([input_ids])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        ref = PeftModel.from_pretrained(ref, str(adapter_dir)).eval()
        want = ref(input_ids=x).logits
        del ref
        got = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
        return float((want - got(input_ids=x).logits).abs().max())


def merge_to(base: str, adapter: str, out: str) -> None:
    """`sft-job merge BASE ADAPTER OUT`: fetch, merge shard by shard, write/upload."""
    from transformers import AutoTokenizer

    from sft_job import storage
    from sft_job.data.load import fetch
    from sft_job.errors import SpecError
    from sft_job.models.load import loading
    from sft_job.models.source import resolve_model_dir
    from sft_job.uri import is_remote, overlap

    for a, b in ((out, base), (out, adapter)):
        if overlap(a, b):
            raise SpecError(f"OUT {out} and {b} overlap: the merged model would be written over "
                            "its inputs; choose another OUT")
    storage.probe(out, write=True)  # a folder that cannot be written fails before the work
    work = Path(tempfile.mkdtemp(prefix="sft-job-merge-"))
    base_dir = resolve_model_dir(base)
    adapter_dir = fetch(adapter, work)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: no adapter_config.json; is it a PEFT adapter folder?")
    local_out = work / "merged" if is_remote(out) else Path(out)
    with loading("merge", f"{adapter} into {base} (is the adapter for this base model?)"):
        tok = AutoTokenizer.from_pretrained(str(base_dir))
        merge_adapter(base_dir, adapter_dir, local_out, tok)
    if is_remote(out):
        storage.put_dir(local_out, out, commit=True)
