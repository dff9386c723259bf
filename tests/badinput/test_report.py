"""`sft-job validate --json`: the same facts as the text report; exit 0/2/3; and
`preflight.fast_checks`, the cheap pass `sft-job run` does first (no torch, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sft_job.errors import EXIT_ACCESS, EXIT_SPEC
from sft_job.preflight import PreflightFailed, fast_checks
from sft_job.spec import JobSpec
from tests.badinput.cases import BASE, GOOD
from tests.conftest import REPO, cli_env, run_cli

SAMPLE = REPO / "sft_job/sample_data/polite.jsonl"


def spec_file(tmp_path: Path, **over: object) -> Path:
    doc = json.loads(json.dumps(BASE).replace("{d}", str(tmp_path)))
    for dotted, value in over.items():
        node = doc
        *parents, leaf = dotted.split("__")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def load(path: Path) -> JobSpec:
    from sft_job.specload import load_spec

    return load_spec(str(path))


def test_json_report_has_every_fact_of_the_text_report(tmp_path: Path, sft_cache: Path,
                                                       tiny: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(SAMPLE.read_text() + '{"prompt": "no response"}\n')
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    spec = spec_file(tmp_path, data__on_malformed="skip", data__eval=str(tmp_path / "eval.jsonl"),
                     data__max_length=128, resources__accelerator="nvidia-l4")
    report = tmp_path / "report.json"
    res = run_cli(["validate", str(spec), "--samples", "2", "--json", str(report)], sft_cache)
    assert res.returncode == 0, res.stderr + res.stdout
    assert res.stderr == ""
    out, rep = res.stdout, json.loads(report.read_text())
    assert rep["ok"] is True and rep["problems"] == [] and rep["skipped"] == []
    facts = rep["facts"]
    assert f"output.uri: ok ({facts['credentials']['output.uri']})" in out
    for label, key in (("data", "data"), ("eval", "eval_data")):
        d = facts[key]
        assert (f"{label:<8} {d['format']} format, {d['rows']} rows, {d['usable']} usable, "
                f"{d['malformed']} malformed, {d['empty_responses']} empty responses, "
                f"{d['duplicates']} duplicates") in out
        for m in d["malformed_examples"]:
            assert f"malformed {m}" in out
    d = facts["data"]
    assert d["malformed"] == 1 and d["malformed_examples"][0].startswith(f"{train}:61: ")
    assert facts["eval_data"]["usable"] == len(GOOD)
    t = d["tokens"]
    assert (f"min {t['min']} / median {t['median']} / p95 {t['p95']} / max {t['max']}; "
            f"{d['truncated']} truncated, {d['dropped_prompt_too_long']} dropped") in out
    e = d["efficiency"]
    assert (f"packed {e['packed']:.1%}, pad-to-longest {e['longest']:.1%}, "
            f"pad-to-max {e['max']:.1%}") in out
    assert len(d["samples"]) == 2
    for s in d["samples"]:
        # prompt-response rows go through the model's ChatML template (data.template: auto)
        assert s["ends_with_trained_stop"] and s["text"].endswith("<|im_end|>")
        assert s["last_trained_token"] == "<|im_end|>"
        assert s["text"].startswith("[[<|im_start|>user")  # the prompt is shown masked
        assert len(s["input_ids"]) == len(s["trained"]) == s["tokens"]
        assert sum(s["trained"]) == s["trained_tokens"] and s["trained"][-1]
        assert f"({s['tokens']} tokens, {s['trained_tokens']} trained;" in out
        assert s["text"].replace("\n", "\n    ") in out
    tok = facts["tokenizer"]
    assert (f"tokenizer eos {tok['eos']!r}, pad {tok['pad']!r}, bos {tok['bos']!r}; "
            f"chat template: {tok['chat_template']}") in out
    mem = facts["memory"]
    assert f"~{mem['total_gb']:.2f} GB per device ({mem['breakdown_gb']})" in out
    assert mem["device_gb"] == 24 and mem["trainable_params"] > 0
    for w in rep["warnings"]:
        assert f"warning  {w}" in out
    assert "OK: the job would run" in out


def test_json_report_of_a_failing_job(tmp_path: Path, sft_cache: Path, tiny: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    spec = spec_file(tmp_path, data__eval=str(tmp_path / "missing.jsonl"),
                     model__base=str(tmp_path / "no-model"))
    report = tmp_path / "report.json"
    res = run_cli(["validate", str(spec), "--json", str(report)], sft_cache)
    assert res.returncode == EXIT_SPEC, res.stderr
    rep = json.loads(report.read_text())
    assert rep["ok"] is False
    assert {p["where"] for p in rep["problems"]} == {"data.train", "data.eval", "model.base"}
    assert rep["skipped"] == ["tokenizer", "token lengths", "samples", "memory estimate"]
    for p in rep["problems"]:
        assert f"PROBLEM  {p['where']}: {p['message']}" in res.stdout
    assert "skipped  tokenizer, token lengths, samples, memory estimate" in res.stdout
    assert f"{len(rep['problems'])} problem(s)" in res.stdout
    assert res.stderr.startswith("error: validate: the job would fail: 3 problems: ")
    assert len(res.stderr.strip().splitlines()) == 1
    assert f"{tmp_path / 'train.jsonl'}:2: invalid JSON" in res.stderr


def test_exit_3_when_every_problem_is_access(tmp_path: Path, sft_cache: Path, tiny: Path) -> None:
    from tests.servers import s3_server

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    spec = spec_file(tmp_path, output__uri="s3://no-such-bucket-report/out")
    report = tmp_path / "report.json"
    with s3_server() as s3:
        res = subprocess.run([sys.executable, "-m", "sft_job", "validate", str(spec), "--json",
                              str(report)], env=cli_env(sft_cache, **s3.env), cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert res.returncode == EXIT_ACCESS, res.stderr
    rep = json.loads(report.read_text())
    assert [p["kind"] for p in rep["problems"]] == ["access"]
    assert rep["facts"]["data"]["usable"] == len(GOOD)  # the data was still checked


# ------------------------------------------------------------------ the cheap pass


def test_cheap_pass_imports_no_torch(tmp_path: Path, sft_cache: Path) -> None:
    """validate on bad data and fast_checks on good data stay light: no torch, no
    transformers (so `run` can afford them before anything is downloaded)."""
    (tmp_path / "train.jsonl").write_text(SAMPLE.read_text())
    spec = spec_file(tmp_path)
    code = ("import sys\nfrom sft_job.specload import load_spec\nfrom sft_job.preflight import "
            f"fast_checks\nrep = fast_checks(load_spec({str(spec)!r}))\n"
            "print(rep.facts['data']['usable'], sorted(m for m in ('torch', 'transformers', "
            "'trl') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=cli_env(sft_cache), timeout=120)
    assert res.stdout.strip() == "60 []", res.stderr
    (tmp_path / "train.jsonl").write_text("{oops\n")
    res = run_cli(["validate", str(spec)], sft_cache, cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
    assert res.returncode == EXIT_SPEC
    imported = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if "|" in ln}
    assert "sft_job.preflight" in imported and not imported & {"torch", "transformers"}


def test_spec_error_in_run_fails_before_importing_torch(tmp_path: Path, sft_cache: Path) -> None:
    spec = spec_file(tmp_path, train__learning_rate=-1)
    res = run_cli(["run", str(spec)], sft_cache, cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")
    assert res.returncode == EXIT_SPEC
    imported = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if "|" in ln}
    assert "sft_job.spec" in imported and "torch" not in imported
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")


def test_fast_checks_raise_one_line_with_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n[1]\n')
    spec = load(spec_file(tmp_path, data__eval=str(tmp_path / "nope.jsonl")))
    with pytest.raises(PreflightFailed) as ei:
        fast_checks(spec)
    msg = str(ei.value)
    assert ei.value.exit_code == EXIT_SPEC and "\n" not in msg
    assert msg.startswith("2 problems: ")
    assert (f"data.train: 1 malformed row(s), first {tmp_path / 'train.jsonl'}:2: expected a "
            "JSON object, got list") in msg
    assert f"data.eval: {tmp_path / 'nope.jsonl'}: no such file" in msg


def test_fast_checks_probe_output_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(SAMPLE.read_text())
    (tmp_path / "out.txt").write_text("keep")
    spec = load(spec_file(tmp_path, output__uri=str(tmp_path / "out.txt")))
    with pytest.raises(PreflightFailed) as ei:
        fast_checks(spec)
    assert ei.value.exit_code == EXIT_ACCESS and "is a file" in str(ei.value)
    rep = fast_checks(spec, probe_out=False)  # a non-main rank: data and model only
    assert rep.facts["data"]["usable"] == 60 and "output.uri" not in rep.facts.get("credentials", {})


def test_fast_checks_download_into_the_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    from tests.servers import s3_server, use_env

    with s3_server(["data"]) as s3:
        use_env(monkeypatch, s3.env)
        s3.client().put_object(Bucket="data", Key="sets/a/train.jsonl", Body=SAMPLE.read_bytes())
        spec = load(spec_file(tmp_path, data__train="s3://data/sets/a/"))
        work = tmp_path / "work"
        rep = fast_checks(spec, work)
    assert rep.facts["data"]["usable"] == 60
    assert [p.name for p in work.rglob("*.jsonl")] == ["train.jsonl"]
    assert rep.facts["credentials"]["data.train"].startswith("aws:")
