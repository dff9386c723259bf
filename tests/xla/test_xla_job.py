"""The job's TPU code path (backend: tpu) on XLA:CPU, end to end through the CLI.

    make test-xla        # creates .venv-xla (torch 2.9.0 + torch-xla 2.9.0) and runs this

Every job runs in its own process (SPMD is chosen once per process) with `PJRT_DEVICE=CPU`:
one device (plain XLA) or `CPU_NUM_DEVICES=4` (FSDPv2 over a 4-device SPMD mesh). The checks:
the loss falls (or follows the CPU backend's step for step), graphs compile a bounded number of
times, the saved model and checkpoints hold plain CPU tensors under the model's own names (no
`_orig_module.`), and the main .venv's torch 2.13 (no torch_xla) reloads the model with XLA's
logits and the eval loss the job reported for the model it had just trained.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, cli_env

pytestmark = [
    pytest.mark.xla,
    pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None,
                       reason="torch_xla is not installed here: `make test-xla` runs these in .venv-xla"),
]

MAIN_PYTHON = Path(os.environ.get("SFT_JOB_MAIN_PYTHON") or REPO / ".venv/bin/python")
CHECK = REPO / "tests/xla/model_check.py"
STEPS = 8
WARMUP_STEPS = 3  # steps 1-3 compile (no optimizer state yet, then with it); later ones reuse


def _spec(root: Path, name: str, kind: str, batch_size: int, backend: str = "tpu",
          **method_extra: Any) -> Path:
    method = {"kind": "full"} if kind == "full" else \
        {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0}  # no dropout: XLA vs CPU RNG
    method.update(method_extra)
    spec = {
        "name": name,
        "model": {"base": "builtin:tiny-llama"},
        "data": {"train": str(REPO / "sft_job/sample_data/polite.jsonl"),
                 "format": "prompt-response", "eval_fraction": 0.2, "max_length": 128,
                 "packing": True},
        "method": method,
        "train": {"max_steps": STEPS, "batch_size": batch_size, "logging_steps": 1,
                  "learning_rate": 3e-3 if kind == "full" else 3e-2, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "seed": 7},
        "eval": {"num_samples": 0},  # generation recompiles per token: not what this tests
        "backend": backend,
        "output": {"uri": str(root / "out"), "save_every_steps": STEPS // 2, "merge": True},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "spec.json"  # JSON is YAML
    path.write_text(json.dumps(spec))
    return path


def _job(python: Path, spec: Path, cache: Path, **env: str) -> dict[str, Any]:
    """`sft-job run SPEC` with `python`'s venv; the outputs and the log."""
    root = spec.parent
    res = subprocess.run([str(python), "-m", "sft_job", "run", str(spec)], cwd=REPO,
                         env=cli_env(cache, SFT_JOB_WORKDIR=str(root / "work"), **env),
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    out = root / "out"
    metrics = [json.loads(x) for x in (out / "metrics/metrics.jsonl").read_text().splitlines()]
    return {"spec": spec, "out": out, "log": res.stderr,
            "summary": json.loads((out / "metrics/summary.json").read_text()),
            "losses": [m["loss"] for m in metrics if "loss" in m]}


def _xla_job(root: Path, cache: Path, kind: str, devices: int, batch_size: int,
             **method_extra: Any) -> dict[str, Any]:
    run = _job(Path(sys.executable), _spec(root, root.name, kind, batch_size, **method_extra),
               cache, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(devices))
    assert len(run["losses"]) == STEPS, run["losses"]
    # Static shapes: once warm, no step compiles a new graph (a new batch shape would).
    compiles = re.search(r"XLA: \d+ graph compilations .* the last at step (\d+)", run["log"])
    assert compiles, run["log"][-3000:]
    assert int(compiles.group(1)) <= WARMUP_STEPS, compiles.group(0)
    return run


def _check(run: dict[str, Any], model_dir: Path, eval_batch: int, python: Path, tag: str,
           xla: bool = False, checkpoint: Path | None = None) -> dict[str, Any]:
    """tests/xla/model_check.py on a saved model, in the venv of `python`."""
    import numpy as np

    prefix = run["spec"].parent / tag
    cmd = [str(python), str(CHECK), str(model_dir), str(run["spec"]), "--eval-batch",
           str(eval_batch), "--out", str(prefix)]
    cmd += ["--xla"] if xla else []
    cmd += ["--checkpoint", str(checkpoint)] if checkpoint else []
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(Path(f"{prefix}.json").read_text())
    report["logits"] = np.load(f"{prefix}.npy")
    return report


def _plain_torch() -> Path:
    if not MAIN_PYTHON.is_file():
        pytest.fail(f"{MAIN_PYTHON} is missing: `make venv` (reloads run on plain torch there)")
    return MAIN_PYTHON


def _assert_clean_load(report: dict[str, Any], dtype: str = "BF16") -> None:
    """No missing/unexpected names, none from the wrapper; trained in bf16, saved as is (a
    merged LoRA model keeps the base's dtype)."""
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == [], report
    assert report["keys"] and not [k for k in report["keys"] if "_orig_module" in k]
    assert report["saved_dtypes"] == [dtype]


def _assert_reloads(run: dict[str, Any], eval_batch: int, checkpoint: Path) -> None:
    """Plain torch and XLA load the saved model alike; it is the model the job evaluated."""
    plain = _check(run, run["out"] / "model", eval_batch, _plain_torch(), "plain",
                   checkpoint=checkpoint)
    xla = _check(run, run["out"] / "model", eval_batch, Path(sys.executable), "xla", xla=True)
    assert not plain["torch_xla_importable"] and not plain["torch"].startswith("2.9"), plain["torch"]
    assert xla["device"].startswith("xla"), xla["device"]
    _assert_clean_load(plain)
    _assert_clean_load(xla)
    diff = float(abs(plain["logits"] - xla["logits"]).max())
    assert diff < 1e-4, f"plain torch and XLA logits differ by {diff}"
    # The job evaluated its in-memory model (bf16 on XLA); the reloaded one (float32 on plain
    # torch) must score the same. The base model scores about the first step's loss, far off.
    job_eval = run["summary"]["eval_loss"]
    assert plain["eval_batches"] >= 1 and job_eval is not None
    assert abs(plain["eval_loss"] - job_eval) < 5e-3, (plain["eval_loss"], job_eval)
    assert job_eval < run["losses"][0] - 0.2, (job_eval, run["losses"])
    ckpt = plain["checkpoint"]  # a trainer checkpoint, loaded strictly without torch_xla
    assert ckpt["missing"] == [] and ckpt["unexpected"] == [] and ckpt["devices"] == ["cpu"], ckpt
    assert not [k for k in ckpt["keys"] if "_orig_module" in k]


def _assert_loss_falls(losses: list[float]) -> None:
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.2, f"loss did not fall: {losses}"


def test_single_device_full(sft_cache: Path, tmp_path: Path) -> None:
    """One XLA device, no sharding: full fine-tune, bf16, XLA AdamW, static shapes."""
    run = _xla_job(tmp_path / "xla-one-full", sft_cache, "full", devices=1, batch_size=2)
    assert "XLA: 1 device" in run["log"], run["log"][-3000:]
    _assert_loss_falls(run["losses"])
    _assert_reloads(run, 2, run["out"] / "checkpoints/step-000004")


def test_fsdp_v2_four_devices_full(sft_cache: Path, tmp_path: Path) -> None:
    """FSDPv2 over a 4-device SPMD mesh (1 row per device): the optimizer exists and updates
    the sharded model; checkpoints and the final model carry plain names and CPU tensors."""
    run = _xla_job(tmp_path / "xla-fsdp-full", sft_cache, "full", devices=4, batch_size=1)
    assert "FSDPv2 over SPMD on 4 CPU devices" in run["log"], run["log"][-3000:]
    _assert_loss_falls(run["losses"])
    _assert_reloads(run, 4, run["out"] / "checkpoints/step-000004")


def test_fsdp_v2_four_devices_lora_matches_cpu(sft_cache: Path, tmp_path: Path) -> None:
    """LoRA under FSDPv2 on 4 devices trains like the CPU backend (fp32, torch 2.13) on the same
    4-row batches, saves an adapter under PEFT's own names, and merges into a loadable model."""
    run = _xla_job(tmp_path / "xla-fsdp-lora", sft_cache, "lora", devices=4, batch_size=1)
    cpu = _job(_plain_torch(), _spec(tmp_path / "cpu-lora", "cpu-lora", "lora", 4, "cpu"),
               sft_cache)
    steps = list(zip(run["losses"], cpu["losses"], strict=True))
    assert max(abs(a - b) for a, b in steps) < 0.02, steps
    assert abs(run["summary"]["eval_loss"] - cpu["summary"]["eval_loss"]) < 0.02
    assert run["summary"]["merge_max_logit_diff"] < 1e-4
    plain = _check(run, run["out"] / "model", 4, _plain_torch(), "plain")
    _assert_clean_load(plain, "F32")  # merged on CPU into the builtin model's float32
    assert abs(plain["eval_loss"] - run["summary"]["eval_loss"]) < 5e-3
    from safetensors import safe_open

    with safe_open(str(run["out"] / "adapter/adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_" in k and "_orig_module" not in k for k in names), names


def test_single_device_gradient_checkpointing(sft_cache: Path, tmp_path: Path) -> None:
    """method.gradient_checkpointing on one chip: torch.utils.checkpoint fails under XLA, so it
    becomes FSDPv2's own (xla_fsdp_grad_ckpt) on a 1-device mesh; names stay the model's."""
    from safetensors import safe_open

    from sft_job.models.builtin import build_builtin

    run = _xla_job(tmp_path / "xla-one-ckpt", sft_cache, "full", devices=1, batch_size=2,
                   gradient_checkpointing=True)
    assert "FSDPv2 over SPMD on 1 CPU devices" in run["log"], run["log"][-3000:]
    _assert_loss_falls(run["losses"])
    names = []
    for folder in (run["out"] / "model", build_builtin("builtin:tiny-llama")):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names.append(sorted(f.keys()))
    assert names[0] == names[1]
