"""The CLI surface: every command's --help, --version, `python -m sft_job`, schema, and the
error boundary (one line, documented exit code, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sft_job.cli import app
from tests.conftest import REPO, run_cli

runner = CliRunner()
COMMANDS = ["run", "validate", "merge", "generate", "schema"]


@pytest.mark.parametrize("cmd", [*COMMANDS, "data"])
def test_help(cmd: str) -> None:
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_version_and_module_entrypoint() -> None:
    from sft_job import __version__

    res = subprocess.run([sys.executable, "-m", "sft_job", "--version"], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"sft-job {__version__}"


def test_help_is_fast_and_imports_nothing_heavy() -> None:
    code = ("import sys, sft_job.cli\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets', 'boto3') "
            "if m in sys.modules]\n"
            "print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[]", res.stdout


def test_usage_error_is_one_line_exit_2(tmp_path: Path) -> None:
    res = run_cli(["run", "jobs/smoke-cpu.yaml", "--bogus"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: No such option: --bogus (see sft-job --help)"], res.stderr


MAIN_RAISING = ("import sys, sft_job.spec, sft_job.errors as e\n"
                "def boom(*a, **k):\n"
                "    raise {exc}\n"
                "sft_job.spec.json_schema = boom\n"
                "sys.argv = ['sft-job', 'schema']\n"
                "from sft_job.cli import main\n"
                "main()\n")


@pytest.mark.parametrize(("exc", "code", "first"), [
    ("e.AccessError('denied on s3://b/x')", 3, "error: denied on s3://b/x"),
    ("e.TransientError('storage\\nunavailable')", 75, "error: storage unavailable"),
    ("RuntimeError('boom')", 1, "Traceback (most recent call last):"),
    ("e.Preempted('checkpoint 3 committed')", 75, "error: checkpoint 3 committed"),
])
def test_main_maps_errors_by_class(exc: str, code: int, first: str) -> None:
    """cli.main is the one error boundary: the class of the error decides the exit code and
    the message (schema's work is replaced by a function raising it, in a real subprocess)."""
    res = subprocess.run([sys.executable, "-c", MAIN_RAISING.format(exc=exc)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0] == first, res.stderr
    if code == 1:
        assert "RuntimeError: boom" in res.stderr and "(a bug)" in lines[-1]
    else:
        assert len(lines) == 1 and "Traceback" not in res.stderr


def test_an_import_error_in_the_data_commands_surfaces() -> None:
    """The `data` commands are registered like the others: a broken import fails loudly
    instead of silently dropping the command."""
    code = "import sys\nsys.modules['sft_job.cli.data'] = None\nimport sft_job.cli\n"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1 and "import of sft_job.cli.data halted" in res.stderr, res.stderr


def test_schema_is_json_schema_of_the_spec() -> None:
    res = runner.invoke(app, ["schema"])
    schema = json.loads(res.output)
    assert set(schema["required"]) == {"name", "model", "data", "output"}
    assert "trainer" in schema["properties"] and "$defs" in schema


BAD_SPECS = [
    ("name: x\nmodel: {base: builtin:tiny-llama}\ndata: {train: a.jsonl, bogus: 1}\n"
     "output: {uri: /tmp/x}\n", "data.bogus: unknown key"),
    ("name: x\nmodel: {base: builtin:tiny-llama}\ndata: {train: a.jsonl}\n"
     "train: {learning_rate: -1}\noutput: {uri: /tmp/x}\n", "train.learning_rate"),
    ("name: x\nmodel: {base: builtin:tiny-llama}\ndata: {train: a.jsonl}\n"
     "method: {kind: qlora}\nbackend: tpu\noutput: {uri: /tmp/x}\n", "qlora"),
    ("name: x\nmodel: {base: builtin:tiny-llama}\ndata: {train: a.jsonl}\n"
     "output: {uri: '${SFT_TEST_UNSET_VAR}'}\n", "SFT_TEST_UNSET_VAR"),
    ("name: x\nmodel: [unclosed\n", "invalid YAML"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_SPECS)
def test_bad_spec_is_one_line_exit_2(text: str, needle: str, tmp_path: Path, sft_cache: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    res = run_cli(["run", str(spec)], sft_cache)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert str(spec) in res.stderr


def test_output_uri_that_is_a_file_is_exit_3(tmp_path: Path, sft_cache: Path) -> None:
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    res = run_cli(["run", "jobs/smoke-cpu.yaml", "--set", f"output.uri={f}"], sft_cache)
    assert res.returncode == 3, res.stderr
    assert "is a file" in res.stderr and "Traceback" not in res.stderr
    assert f.read_text() == "keep me"


def test_set_override_reaches_the_spec(tmp_path: Path) -> None:
    from sft_job.specload import load_spec

    spec = load_spec(str(REPO / "jobs/smoke-cpu.yaml"), ["train.epochs=1", "data.packing=false",
                                                          f"output.uri={tmp_path}"])
    assert spec.train.epochs == 1 and spec.data.packing is False
    assert spec.output.uri == str(tmp_path)


def test_docs_spec_md_is_current() -> None:
    """docs/spec.md is generated from the pydantic spec; regenerate with `make schema`."""
    from sft_job.spec import markdown_reference

    assert (REPO / "docs/spec.md").read_text() == markdown_reference() + "\n", \
        "docs/spec.md is stale: run `make schema`"
