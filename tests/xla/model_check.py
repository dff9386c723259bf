"""Load a saved model (and optionally a trainer checkpoint) and measure it, in whichever venv
runs this script: the main .venv (plain torch, no torch_xla) or .venv-xla (`--xla`: on the XLA
device). tests/xla/test_xla_job.py runs it in both and compares.

    python tests/xla/model_check.py MODEL_DIR SPEC.yaml --eval-batch N --out PREFIX
        [--xla] [--checkpoint CKPT_DIR]

Writes PREFIX.json (versions, saved keys and dtypes, loading report, the eval loss recomputed
the way the trainer computes it, the checkpoint's strict-load result) and PREFIX.npy (float32
logits of the first eval row). Everything runs in float32: bf16 weights upcast exactly, so the
two venvs' logits must agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any


def saved_keys(folder: Path) -> tuple[list[str], list[str]]:
    """Tensor names and dtypes of every safetensors file in `folder`."""
    from safetensors import safe_open

    keys: list[str] = []
    dtypes: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names = list(st.keys())
            keys += names
            dtypes |= {st.get_slice(k).get_dtype() for k in names}
    return keys, sorted(dtypes)


def checkpoint_report(model_dir: Path, ckpt: Path) -> dict[str, Any]:
    """Load a trainer checkpoint's weights strictly into a model made from the saved config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(ckpt / "model.safetensors"))
        fmt = "safetensors"
    else:
        state = torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
        fmt = "pytorch_model.bin"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    result = model.load_state_dict(state, strict=False)
    return {"format": fmt, "keys": sorted(state), "devices": sorted({str(v.device) for v in state.values()}),
            "missing": sorted(result.missing_keys), "unexpected": sorted(result.unexpected_keys)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("spec")
    ap.add_argument("--eval-batch", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--xla", action="store_true")
    ap.add_argument("--checkpoint", type=Path)
    a = ap.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from sft_job.data import build
    from sft_job.data.tokenize import make_collator
    from sft_job.models.load import load_tokenizer
    from sft_job.specload import load_spec

    spec = load_spec(a.spec)
    device: Any = "cpu"
    if a.xla:
        import torch_xla

        device = torch_xla.device()
    keys, dtypes = saved_keys(a.model_dir)
    model, info = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    model.to(device).eval()
    tok = load_tokenizer(spec.model, a.model_dir, need_chat_template=False)
    bundle = build(spec.data, tok, Path(tempfile.mkdtemp(prefix="model-check-")))
    collate = make_collator(tok.pad_token_id, packing=spec.data.packing, flatten=False,
                            pad_to_multiple_of=spec.data.max_length)
    rows, b = bundle.eval.to_list(), a.eval_batch
    losses = []
    with torch.no_grad():
        for i in range(0, len(rows) - b + 1, b):  # full batches only, as with drop_last
            batch = {k: v.to(device) for k, v in collate(rows[i:i + b]).items()}
            losses.append(float(model(**batch).loss.cpu()))
        first = {k: v.to(device) for k, v in collate(rows[:1]).items() if k != "labels"}
        logits = model(**first).logits.float().cpu().numpy()
    np.save(f"{a.out}.npy", logits)
    report = {
        "torch": torch.__version__,
        "torch_xla_importable": importlib.util.find_spec("torch_xla") is not None,
        "device": str(device),
        "keys": keys,
        "saved_dtypes": dtypes,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
        "eval_batches": len(losses),
        "eval_loss": sum(losses) / len(losses) if losses else None,
        "checkpoint": checkpoint_report(a.model_dir, a.checkpoint) if a.checkpoint else None,
    }
    Path(f"{a.out}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
