"""Fixtures of the unit tests: the builtin tiny models built once per session, tokenizers in
the variants the data code must handle (pad == EOS, no chat template), file writers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sft_job.spec import DataSpec


@pytest.fixture(scope="session")
def torch_one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far faster than on two when the machine is
    busy (intra-op threads spin against other processes): ~13x on a loaded 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(sft_cache: Path, torch_one_thread: None) -> Path:
    """Folder of builtin:tiny-llama (tokenizer + random weights), built under the session cache."""
    from sft_job.models.builtin import build_builtin

    return build_builtin("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(sft_cache: Path, torch_one_thread: None) -> Path:
    from sft_job.models.builtin import build_builtin

    return build_builtin("builtin:tiny-gpt2")


def _load_tok(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def tok(tiny_llama_dir: Path) -> Any:
    """The builtin tokenizer (EOS '<|endoftext|>', pad '<|pad|>', ChatML template). Don't mutate."""
    return _load_tok(tiny_llama_dir)


@pytest.fixture(scope="session")
def tok_pad_eos(tiny_llama_dir: Path) -> Any:
    """The builtin tokenizer with pad_token == eos_token, as many real tokenizers end up."""
    t = _load_tok(tiny_llama_dir)
    t.pad_token = t.eos_token
    assert t.pad_token_id == t.eos_token_id
    return t


@pytest.fixture(scope="session")
def tok_no_template(tiny_llama_dir: Path) -> Any:
    """The builtin tokenizer without any chat template (like GPT-2's or GPT-Neo's)."""
    t = _load_tok(tiny_llama_dir)
    t.chat_template = None
    return t


def data_spec(**kw: Any) -> DataSpec:
    """A DataSpec with a dummy train path (the functions under test get paths directly)."""
    kw.setdefault("train", "unused.jsonl")
    return DataSpec(**kw)


@pytest.fixture
def spec_of() -> Callable[..., DataSpec]:
    return data_spec


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """write_jsonl(rows, name='data.jsonl') -> path; a str row is written verbatim as a line."""

    def write(rows: list[Any], name: str = "data.jsonl") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write
