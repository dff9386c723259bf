"""The rules behind issue 15, one test per rule over its whole family: every float field refuses
NaN/inf, the trainer allow-list against TRL's SFTConfig, credential names and values, bounded
YAML (aliases, nesting, size), interpolation syntax, location rules, output overlap, and the
NaN guard."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from sft_job.credentials import is_credential_name
from sft_job.errors import SpecError, TrainingDiverged
from sft_job.spec import JobSpec
from sft_job.specload import parse_spec
from sft_job.spectrainer import TRAINER_OWNED, TrainerSpec
from sft_job.train import guard
from sft_job.uri import overlap, uri_problem

BASE = {"name": "t", "model": {"base": "builtin:tiny-llama"}, "data": {"train": "d.jsonl"},
        "output": {"uri": "/tmp/out"}}


def parse(doc: dict[str, Any], overrides: list[str] | None = None) -> JobSpec:
    return parse_spec(yaml.safe_dump(doc), "job.yaml", overrides)


def _float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _float_fields(ann, f"{prefix}{name}.")
        elif "float" in str(ann):  # a dict of floats: one of its values
            out.append(f"{prefix}{name}.k" if "dict" in str(ann) else f"{prefix}{name}")
    return out


FLOATS = _float_fields(JobSpec)


def test_the_family_of_float_fields_is_found() -> None:
    assert {"train.learning_rate", "train.epochs", "data.eval_fraction",
            "trainer.adam_epsilon"} <= set(FLOATS)


@pytest.mark.parametrize("field", FLOATS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_field_refuses_non_finite(field: str, value: str) -> None:
    with pytest.raises(SpecError) as ei:
        parse(BASE, [f"{field}={value}"])
    assert field in str(ei.value) and "finite" in str(ei.value)


# ------------------------------------------------------------------ trainer pass-through


def test_allowed_trainer_fields_are_sftconfig_fields() -> None:
    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    assert set(TrainerSpec.model_fields) <= names
    assert not set(TrainerSpec.model_fields) & set(TRAINER_OWNED)


def test_every_other_sftconfig_field_is_refused_with_a_reason() -> None:
    """Whatever TRL adds, only the allow-list passes; owned ones name the spec field."""
    from trl import SFTConfig

    for f in dataclasses.fields(SFTConfig):
        if f.name in TrainerSpec.model_fields:
            continue
        with pytest.raises(SpecError) as ei:
            parse({**BASE, "trainer": {f.name: 1}})
        msg = str(ei.value)
        assert f"trainer.{f.name}: " in msg
        assert (f"use {TRAINER_OWNED[f.name]}" in msg if f.name in TRAINER_OWNED
                else "not a pass-through field" in msg)


@pytest.mark.parametrize("field,use", [("push_to_hub", "output.push_to_hub"),
                                       ("hub_private_repo", "output.hub_private"),
                                       ("report_to", "train.report_to"),
                                       ("logging_dir", "train.report_to"),
                                       ("run_name", "train.report_to"),
                                       ("output_dir", "output.uri"),
                                       ("max_steps", "train.max_steps")])
def test_publishing_and_plan_fields_name_the_spec_field(field: str, use: str) -> None:
    with pytest.raises(SpecError, match=f"trainer.{field}: set by the spec.*use {use}"):
        parse({**BASE, "trainer": {field: "x"}})


def test_trainer_fields_reach_the_dump_only_when_set() -> None:
    spec = parse({**BASE, "trainer": {"adam_beta2": 0.95}})
    assert spec.model_dump(mode="json")["trainer"] == {"adam_beta2": 0.95}
    assert parse(BASE).model_dump(mode="json")["trainer"] == {}


# ------------------------------------------------------------------ credentials


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
                                  "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
                                  "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY",
                                  "WANDB_API_KEY", "DB_PASSWORD", "MY_SECRET", "GH_PAT",
                                  "STRIPE_KEY", "AZURE_STORAGE_CONNECTION_STRING", "api_token"])
def test_credential_names(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_credential_name(name)
    monkeypatch.setenv(name, "x")
    with pytest.raises(SpecError, match=f"{name}.*credential"):
        parse({**BASE, "eval": {"prompts": [f"${{{name}}}"]}})


@pytest.mark.parametrize("name", ["HOME", "PWD", "DATA_URI", "OUT_URI", "KEYBOARD_LAYOUT",
                                  "MONKEY", "DATA_PATH", "SFT_JOB_OUT", "USER"])
def test_ordinary_names_interpolate(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not is_credential_name(name)
    monkeypatch.setenv(name, "/data/x")
    assert parse({**BASE, "output": {"uri": f"${{{name}}}/o"}}).output.uri == "/data/x/o"


def test_a_secret_value_anywhere_is_refused_a_short_one_is_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz")
    with pytest.raises(SpecError, match=r"data\.train: holds the value of the credential"):
        parse(BASE, ["data.train=s3://bkt/hf_abcdefghijklmnopqrstuvwxyz/x.jsonl"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")  # tests' dummy keys: too short
    parse({**BASE, "name": "testing"})


# ------------------------------------------------------------------ YAML and interpolation


def test_alias_bomb_is_refused_fast() -> None:
    text = "name: x\na: &a [l, l, l, l, l, l, l, l, l]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi",
                                                                      strict=True))
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="expands to more than"):
        parse_spec(text, "job.yaml")
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("text,needle", [
    ("a: " + "[" * 30_000, "job.yaml"),
    ("name: x\n" + "# pad\n" * 200_000, "at most 1,048,576"),
    ("a: &a [*a]\n", "expands to more than"),
])
def test_yaml_bounds(text: str, needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        parse_spec(text, "job.yaml")


def test_merge_keys_override_and_duplicates_are_still_refused() -> None:
    text = yaml.safe_dump(BASE) + "x-t: &t {max_steps: 3, batch_size: 2}\ntrain:\n  <<: *t\n" \
        "  batch_size: 5\n"
    spec = parse_spec(text, "job.yaml")
    assert (spec.train.max_steps, spec.train.batch_size) == (3, 5)
    with pytest.raises(SpecError, match="appears twice"):
        parse_spec(yaml.safe_dump(BASE) + "train:\n  epochs: 1\n  epochs: 2\n", "job.yaml")


def test_nested_defaults_and_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFT_T_A", raising=False)
    monkeypatch.setenv("SFT_T_B", "/b")
    spec = parse({**BASE, "output": {"uri": "${SFT_T_A:-${SFT_T_B}/x}"},
                  "eval": {"prompts": ["cost $${HOME} and {braces}"]}})
    assert spec.output.uri == "/b/x" and spec.eval.prompts == ["cost ${HOME} and {braces}"]


@pytest.mark.parametrize("value,needle", [
    ("${PWD", "must end with"), ("${5}", "must be followed by a variable name"),
    ("${A-b}", "must end with"), ("${SFT_T_A:-x", "never closed"),
])
def test_malformed_references_name_the_field(value: str, needle: str) -> None:
    with pytest.raises(SpecError) as ei:
        parse({**BASE, "output": {"uri": value}})
    assert "output.uri" in str(ei.value) and needle in str(ei.value)


# ------------------------------------------------------------------ locations and overlap


@pytest.mark.parametrize("uri,needle", [
    ("s3://Bad_Bucket/x", "not a valid s3:// bucket"), ("s3://ab/x", "not a valid s3://"),
    ("s3://a..b/x", "not a valid s3://"), ("s3://192.168.1.1/x", "not a valid s3://"),
    ("gs://-x-/y", "not a valid gs://"), ("s3://bkt/" + "k" * 901, "longer than 900"),
    ("/tmp/a\nb", "control character"), ("/tmp/" + "x" * 256, "path too long"),
    ("ftp://h/x", "unsupported URI scheme"), ("s3:///x", "no bucket name"),
])
def test_uri_problems(uri: str, needle: str) -> None:
    assert needle in (uri_problem(uri) or "")


@pytest.mark.parametrize("uri", ["s3://my-bucket.v2/a/b", "gs://my_bucket/x", "/tmp/x",
                                 "hf://datasets/org/name", "builtin:tiny-llama", "org/name",
                                 "file:///tmp/x"])
def test_good_locations_pass(uri: str) -> None:
    assert uri_problem(uri) is None


def test_overlap(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert overlap(str(tmp_path), str(tmp_path / "a/b"))
    assert overlap(str(tmp_path / "a/b/.."), f"file://{tmp_path}/a")
    assert overlap(str(tmp_path / "link/out"), str(tmp_path / "real"))
    assert not overlap(str(tmp_path / "run"), str(tmp_path / "run2"))
    assert overlap("s3://bk1/runs/x", "s3://bk1/runs/x/data.jsonl")
    assert not overlap("s3://bk1/runs/x", "s3://bk1/runs/x2")
    assert not overlap("s3://bk1/x", "gs://bk1/x") and not overlap("s3://bk1/x", "s3://bk2/x")


# ------------------------------------------------------------------ the NaN guard


def test_require_finite_names_every_bad_number() -> None:
    assert guard.nonfinite({"a": 1.0, "b": [0.5, math.nan], "c": {"d": math.inf}}) == \
        ["b[1] nan", "c.d inf"]
    with pytest.raises(TrainingDiverged) as ei:
        guard.require_finite({"loss": math.nan}, "train: training diverged at step 3")
    assert ei.value.exit_code == 2 and "loss nan" in str(ei.value)


def test_guard_callback_weights_logs_and_fp16_skips() -> None:
    import torch

    cb = guard.callback()
    model = torch.nn.Linear(2, 2)
    args = type("A", (), {"device": torch.device("cpu")})()
    state = type("S", (), {"global_step": 4})()
    cb.on_train_begin(args, state, None, model=model)
    cb.on_step_end(args, state, None, optimizer=None)
    cb.on_log(args, state, None, logs={"loss": 1.0, "grad_norm": 0.5, "epoch": 1})
    skipped = type("O", (), {"step_was_skipped": True})()
    cb.on_step_end(args, state, None, optimizer=skipped)
    cb.on_log(args, state, None, logs={"loss": 1.0, "grad_norm": math.inf})  # scaler's business
    cb.on_step_end(args, state, None, optimizer=None)
    with pytest.raises(TrainingDiverged, match="grad_norm inf"):
        cb.on_log(args, state, None, logs={"loss": 1.0, "grad_norm": math.inf})
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match="weights are NaN or infinite"):
        cb.on_step_end(args, state, None, optimizer=None)
