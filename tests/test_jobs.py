"""Every spec in jobs/ passes `sft-job validate`.

The Hub and public datasets cannot be reached from the test machine, so each spec is validated
with its base model swapped for the builtin tiny model of the same family and hf:// data for the
bundled sample of the same format (via --set, as a user would); everything else (format,
templates, method, packing, combinations, memory estimate) is the spec's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sft_job.cli import app
from tests.conftest import REPO

JOBS = sorted(p for p in (REPO / "jobs").rglob("*.yaml") if "synth" not in p.parts)
SAMPLE = {"alpaca": "alpaca.jsonl", "chat": "chat.jsonl", "prompt-response": "polite.jsonl",
          "text": "text.jsonl"}


def test_there_are_jobs() -> None:
    assert len(JOBS) >= 5


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.stem)
def test_job_validates(path: Path, tmp_path: Path, sft_cache: Path) -> None:
    import yaml

    from sft_job.specload import load_spec

    spec = load_spec(str(path))  # the spec as written parses and passes every combination rule
    sets = [f"output.uri={tmp_path / 'out'}"]
    if not spec.model.base.startswith("builtin:"):
        family = "tiny-gpt2" if "gpt" in spec.model.base.lower() else "tiny-llama"
        sets.append(f"model.base=builtin:{family}")
        if isinstance(spec.method.target_modules, list) and family == "tiny-llama":
            sets.append("method.target_modules=all-linear")
    if "://" in spec.data.train:
        sets.append(f"data.train={REPO / 'sft_job/sample_data' / SAMPLE[spec.data.format]}")
    args = ["validate", str(path), "--samples", "1", "--json", str(tmp_path / "r.json")]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = yaml.safe_load((tmp_path / "r.json").read_text())
    assert report["ok"] and report["facts"]["data"]["usable"] > 0
    assert all(s["ends_with_trained_stop"] for s in report["facts"]["data"]["samples"])
