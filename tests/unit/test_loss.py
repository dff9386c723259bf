"""train/loss.py: the LM head over trained positions gives TRL's loss and gradients, computes
entropy/accuracy only on logged steps, and the precision the CPU backend picks."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest


def test_head_nll_equals_cross_entropy_in_chunks(monkeypatch: pytest.MonkeyPatch,
                                                torch_one_thread: None) -> None:
    import torch
    import torch.nn.functional as F

    from sft_job.train import loss

    V, H = 1000, 32
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * V * 64)  # 64-token chunks: several per batch
    torch.manual_seed(0)
    head = torch.nn.Linear(H, V, bias=True)
    hid = torch.randn(2, 150, H, requires_grad=True)
    labels = torch.randint(0, V, (2, 150))
    labels[:, :20] = -100
    labels[1, 90:100] = -100
    out = loss.head_nll(hid, head, labels, stats=True)
    out.nll_sum.backward()
    ours = [hid.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hid.grad = None
    head.zero_grad()

    logits = head(hid)[:, :-1]
    target = labels[:, 1:]
    ref = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), reduction="sum")
    ref.backward()
    mask = target != -100
    assert int(out.n_tokens) == int(mask.sum()) == 2 * 130 - 10
    torch.testing.assert_close(out.nll_sum.detach(), ref.detach())
    for a, b in zip(ours, [hid.grad, head.weight.grad, head.bias.grad], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    logp = logits[mask].log_softmax(-1)
    torch.testing.assert_close(out.entropy_sum, -(logp.exp() * logp).sum())
    assert int(out.n_correct) == int((logits[mask].argmax(-1) == target[mask]).sum())
    with torch.no_grad():  # evaluation: no gradient work, the same sum
        torch.testing.assert_close(loss.head_nll(hid, head, labels).nll_sum, ref.detach())


def test_token_nll_is_the_models_own_loss(tiny_llama_dir: Path) -> None:
    """On a model that was never patched: (sum, count) whose ratio is transformers' loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from sft_job.train.loss import token_nll

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    labels = ids.clone()
    labels[:, :15] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        ref = model(**batch).loss
        total, count = token_nll(model, batch)
        logits = model(input_ids=ids).logits  # the plain forward is unchanged
    assert int(count) == 2 * 25
    torch.testing.assert_close(total / count, ref)
    assert logits.shape == (2, 40, model.config.vocab_size)


def _trainer(tiny_llama_dir: Path, tmp_path: Path, kind: str, precision: str = "fp32") -> Any:
    from sft_job.prepare import assemble, trainer_for
    from sft_job.spec import JobSpec

    data = resources.files("sft_job") / "sample_data" / "polite.jsonl"
    spec = JobSpec.model_validate({
        "name": "t", "model": {"base": str(tiny_llama_dir)}, "backend": "cpu",
        "data": {"train": str(data), "format": "prompt-response", "max_length": 128,
                 "eval_fraction": 0.0},
        "method": {"kind": kind, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": 3, "batch_size": 2, "logging_steps": 2, "precision": precision},
        "output": {"uri": str(tmp_path / "out")}})
    return trainer_for(assemble(spec, tmp_path / "data"), tmp_path / "trainer")


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_trainer_loss_and_gradients_equal_trls(tiny_llama_dir: Path, tmp_path: Path,
                                               kind: str) -> None:
    """A flattened packed batch: our compute_loss == SFTTrainer's own, value and gradients."""
    import torch

    built = _trainer(tiny_llama_dir, tmp_path, kind)
    assert built.lm_head == "trained-positions" and built.own_head
    trainer = built.trainer
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["input_ids"].shape[0] == 1  # flattened: varlen_sdpa
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for fn in (trainer.compute_loss, lambda m, b: type(trainer).compute_loss(trainer, m, b)):
        model.zero_grad()
        value = fn(model, dict(batch))
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in params]))
    (ours, g_ours), (trl, g_trl) = results
    torch.testing.assert_close(ours, trl)
    for a, b in zip(g_ours, g_trl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_metrics_only_on_logged_steps(tiny_llama_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """logging_steps 2 (+ the first step): entropy and accuracy are computed on steps 1 and 2,
    not on step 3, and each logged step carries them."""
    from sft_job.train import loss

    trainer = _trainer(tiny_llama_dir, tmp_path, "lora", precision="bf16").trainer
    calls: list[bool] = []
    real = loss.head_nll
    monkeypatch.setattr(loss, "head_nll", lambda *a, stats=False, **k:
                        calls.append(stats) or real(*a, stats=stats, **k))
    trainer.train()
    assert calls == [True, True, False]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2]
    assert all(0 <= h["mean_token_accuracy"] <= 1 and h["entropy"] > 0 for h in logged)


@pytest.mark.parametrize(("caps", "want", "expected"), [
    ({"avx512_bf16": True}, "auto",
     ("fp32", "CPU has avx512_bf16; bf16 is opt-in (train.precision: bf16)")),
    ({"amx_bf16": True, "avx512_bf16": True}, "auto",
     ("fp32", "CPU has avx512_bf16, amx_bf16; bf16 is opt-in (train.precision: bf16)")),
    ({}, "auto", ("fp32", "no native bf16 on this CPU")),
    ({"avx512_bf16": True}, "fp32", ("fp32", "train.precision")),
    ({}, "bf16", ("bf16", "train.precision")),
])
def test_cpu_precision(monkeypatch: pytest.MonkeyPatch, caps: dict, want: str,
                       expected: tuple[str, str]) -> None:
    """bf16 autocast is opt-in on CPU until CPU_BF16_DEFAULT is on (see backends.py)."""
    import torch

    from sft_job.spec import JobSpec
    from sft_job.train import backends

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    spec = JobSpec.model_validate({"name": "t", "backend": "cpu", "train": {"precision": want},
                                   "model": {"base": "builtin:tiny-llama"},
                                   "data": {"train": "x.jsonl"}, "output": {"uri": "out"}})
    b = backends.resolve(spec)
    assert (b.precision, b.why) == expected
    monkeypatch.setattr(backends, "CPU_BF16_DEFAULT", True)
    if want == "auto" and caps:
        assert backends.resolve(spec).precision == "bf16"
    assert b.dtype == "float32" and b.sft_args["bf16"] is (expected[0] == "bf16")


def test_fp16_on_cpu_is_refused() -> None:
    from sft_job.errors import UnsupportedError
    from sft_job.spec import JobSpec
    from sft_job.train import backends

    spec = JobSpec.model_validate({"name": "t", "backend": "cpu", "train": {"precision": "fp16"},
                                   "model": {"base": "builtin:tiny-llama"},
                                   "data": {"train": "x.jsonl"}, "output": {"uri": "out"}})
    with pytest.raises(UnsupportedError, match=r"train\.precision: fp16 does not train on CPU"):
        backends.resolve(spec)
