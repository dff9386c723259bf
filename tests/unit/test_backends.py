"""train/backends.py: the TPU detection rules `backend: auto` relies on."""

from __future__ import annotations

import importlib.util

import pytest

from sft_job.train import backends


@pytest.mark.parametrize(("pjrt", "libs", "expected"), [
    ("TPU", False, True),
    ("tpu", False, True),
    ("CPU", True, False),  # an explicit PJRT_DEVICE wins over what is installed (XLA on CPU)
    ("CUDA", True, False),
    ("", True, True),  # unset: libtpu + torch_xla installed means a TPU VM or GKE TPU node
    ("", False, False),
])
def test_tpu_present(monkeypatch: pytest.MonkeyPatch, pjrt: str, libs: bool, expected: bool) -> None:
    if pjrt:
        monkeypatch.setenv("PJRT_DEVICE", pjrt)
    else:
        monkeypatch.delenv("PJRT_DEVICE", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if libs else None)
                        if name in ("libtpu", "torch_xla") else real(name, *a))
    assert backends.tpu_present() is expected



@pytest.mark.parametrize("attn", ["varlen_sdpa", "flash_attention_2"])
def test_tpu_refuses_attention_it_cannot_run(attn: str) -> None:
    from sft_job.errors import UnsupportedError
    from sft_job.spec import JobSpec

    spec = JobSpec.model_validate({"name": "t", "backend": "tpu",
                                   "model": {"base": "builtin:tiny-llama", "attn_implementation": attn},
                                   "data": {"train": "x.jsonl"}, "output": {"uri": "out"}})
    with pytest.raises(UnsupportedError, match=rf"model.attn_implementation: {attn} .*use auto or eager"):
        backends.resolve(spec)
