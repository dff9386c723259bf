"""End to end: the CLI as a subprocess trains, merges, writes the layout, and a separate process
loads the merged model. Real files, real training (tiny random models built locally)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, run_cli

SMOKE_FILES = {
    "_SUCCESS", "job.yaml", "progress.json",
    "adapter/COMMITTED", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
    "adapter/tokenizer.json", "adapter/tokenizer_config.json", "adapter/chat_template.jinja",
    "adapter/README.md",
    "model/COMMITTED", "model/config.json", "model/generation_config.json",
    "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json",
    "model/chat_template.jinja", "model/README.md",
    "metrics/COMMITTED", "metrics/metrics.jsonl", "metrics/summary.json", "metrics/loss.png",
    "metrics/samples.md",
}
PREPARED_FILES = {"COMMITTED", "train.arrow", "eval.arrow", "lengths.npy", "meta.json"}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def smoke_run(sft_cache: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("smoke") / "out"
    res = run_cli(["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri={out}"], sft_cache)
    return out, res


def test_smoke_layout_and_summary(smoke_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, res = smoke_run
    assert res.returncode == 0, res.stderr[-3000:]
    files = _files(out)
    prepared = {f for f in files if f.startswith("prepared/")}
    assert files - prepared == SMOKE_FILES
    # one content-addressed entry of prepared data (data.cache_uri defaults to output.uri)
    assert len({f.split("/")[1] for f in prepared}) == 1
    assert {f.split("/", 2)[2] for f in prepared} == PREPARED_FILES
    summary = json.loads((out / "metrics/summary.json").read_text())
    assert summary["steps"] > 0 and summary["eval_loss"] is not None
    assert summary["merge_max_logit_diff"] < 1e-4
    assert summary["packing_efficiency"] == 1.0  # varlen_sdpa: flattened batches, no padding
    assert summary["efficiency_by_mode"]["packed"] > summary["efficiency_by_mode"]["max"]
    metrics = [json.loads(x) for x in (out / "metrics/metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "loss" in m]
    assert logged and all({"loss", "grad_norm", "learning_rate", "epoch", "tokens_per_s"} <= set(m)
                          for m in logged[1:])
    assert logged[-1]["loss"] < logged[0]["loss"], "training loss did not fall"
    samples = (out / "metrics/samples.md").read_text()
    assert samples.count("**Before**") == samples.count("**After**") == 2
    job = (out / "job.yaml").read_text()
    assert f"uri: {out}" in job  # the resolved spec, overrides applied
    assert (out / "metrics/loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sft-job: done" in res.stdout


def test_merged_model_loads_in_a_fresh_process(smoke_run: tuple[Path, subprocess.CompletedProcess[str]],
                                                sft_cache: Path) -> None:
    out, res = smoke_run
    assert res.returncode == 0, res.stderr[-3000:]
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d = sys.argv[1]\n"
        "tok = AutoTokenizer.from_pretrained(d)\n"
        "m = AutoModelForCausalLM.from_pretrained(d)\n"
        "assert tok.chat_template, 'chat template missing'\n"
        "ids = tok('<|user|>\\nHello\\n<|assistant|>\\n', return_tensors='pt')\n"
        "g = m.generate(**ids, max_new_tokens=5, do_sample=False)\n"
        "assert g.shape[1] > ids['input_ids'].shape[1]\n"
        "print('OK', g.shape[1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out / "model")], capture_output=True,
                       text=True, env=cli_env(sft_cache), timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_rerun_is_idempotent(smoke_run: tuple[Path, subprocess.CompletedProcess[str]],
                             sft_cache: Path) -> None:
    out, res = smoke_run
    assert res.returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    again = run_cli(["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri={out}"], sft_cache)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stderr
    assert time.perf_counter() - t0 < 30
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_generate_command(smoke_run: tuple[Path, subprocess.CompletedProcess[str]], sft_cache: Path) -> None:
    out, res = smoke_run
    assert res.returncode == 0
    r = run_cli(["generate", str(out / "model"), "What is the capital of France?",
                 "--max-new-tokens", "4"], sft_cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "### What is the capital of France?" in r.stdout


def test_merge_command_matches_job_merge(smoke_run: tuple[Path, subprocess.CompletedProcess[str]],
                                         sft_cache: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out, res = smoke_run
    assert res.returncode == 0
    r = run_cli(["merge", "builtin:tiny-llama", str(out / "adapter"), str(tmp_path / "m")], sft_cache)
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(str(out / "model/model.safetensors"))
    b = load_file(str(tmp_path / "m/model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize(
    ("name", "overrides", "expect"),
    [
        ("full-gpt2-alpaca", ["model.base=builtin:tiny-gpt2", "method.kind=full",
                              "data.train=sft_job/sample_data/alpaca.jsonl", "data.format=auto",
                              "data.alpaca_template=stanford", "train.max_steps=3"],
         {"model/model.safetensors"}),
        ("chat-lora-gpt2", ["model.base=builtin:tiny-gpt2", "data.train=sft_job/sample_data/chat.jsonl",
                            "data.format=chat", "train.max_steps=3", "data.packing=false"],
         {"adapter/adapter_model.safetensors", "model/model.safetensors"}),
        ("qlora-llama", ["method.kind=qlora", "train.max_steps=2",
                         "data.train=sft_job/sample_data/text.jsonl", "data.format=text"],
         {"adapter/adapter_model.safetensors", "model/model.safetensors"}),
    ],
)
def test_methods_and_formats(name: str, overrides: list[str], expect: set[str], sft_cache: Path,
                             tmp_path: Path) -> None:
    """Full fine-tune (GPT-2), LoRA on GPT-2's Conv1D (fan_in_fan_out) with chat data, and
    QLoRA (bitsandbytes 4-bit on CPU) each run to the end and leave a loadable model."""
    out = tmp_path / name
    args = ["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri={out}", "--set", f"name={name}"]
    for o in overrides:
        args += ["--set", o]
    res = run_cli(args, sft_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    files = _files(out)
    assert expect <= files
    if "adapter/adapter_model.safetensors" not in expect:
        assert not any(f.startswith("adapter/") for f in files)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")
    summary = json.loads((out / "metrics/summary.json").read_text())
    kind = next((o.split("=")[1] for o in overrides if o.startswith("method.kind=")), "lora")
    assert summary["method"] == kind
    assert summary["lm_head"] == "trained-positions"  # sft_job.train.loss on CPU, every method
    assert summary["steps"] == int(next(o.split("=")[1] for o in overrides if "max_steps" in o))


def test_package_metadata_pins_cpu_torch() -> None:
    """pip must never resolve an unpinned torch here: the cpu extra and the constraints pin it."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "torch==2.13.0" in meta["project"]["optional-dependencies"]["cpu"]
    assert (REPO / "constraints/cpu.txt").read_text().strip() == "torch==2.13.0"
    dev = [ln for ln in (REPO / "constraints/dev.txt").read_text().splitlines()
           if ln and not ln.startswith("#")]
    assert dev and all("==" in ln for ln in dev)  # every dev/CI package pinned exactly
    assert not any(ln.lower().startswith(("torch==", "kernels==")) for ln in dev)
