"""spec.py: env interpolation, --set overrides, field errors with their dotted paths, impossible
combinations, the run hash, the dump round trip, YAML syntax errors with file:line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sft_job.errors import SpecError
from sft_job.spec import JobSpec, dump_spec
from sft_job.specload import apply_override, interpolate_env, load_spec, parse_spec

BASE = {
    "name": "t",
    "model": {"base": "builtin:tiny-llama"},
    "data": {"train": "data.jsonl"},
    "output": {"uri": "/tmp/out"},
}


def doc(**sections: dict) -> dict:
    """BASE with some sections merged in (one level deep); top-level scalars as-is."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, val in sections.items():
        if isinstance(val, dict) and isinstance(out.get(key), dict):
            out[key].update(val)
        else:
            out[key] = val
    return out


def parse(d: dict, overrides: list[str] | None = None) -> JobSpec:
    return parse_spec(yaml.safe_dump(d), "job.yaml", overrides)


def spec_error(d: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as ei:
        parse(d, overrides)
    assert ei.value.exit_code == 2
    return str(ei.value)


# ------------------------------------------------------------------ ${VAR} interpolation


def test_env_var_is_interpolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFT_T_OUT", "s3://bucket/run-1")
    monkeypatch.setenv("SFT_T_LR", "0.001")
    text = yaml.safe_dump(doc(output={"uri": "${SFT_T_OUT}"})) + "train: {learning_rate: ${SFT_T_LR}}\n"
    spec = parse_spec(text, "job.yaml")
    assert spec.output.uri == "s3://bucket/run-1"
    assert spec.train.learning_rate == pytest.approx(0.001)


def test_env_default_used_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFT_T_UNSET", raising=False)
    assert interpolate_env("a: ${SFT_T_UNSET:-out/x}", "f") == "a: out/x"
    assert interpolate_env("a: ${SFT_T_UNSET:-}", "f") == "a: "
    monkeypatch.setenv("SFT_T_UNSET", "given")
    assert interpolate_env("a: ${SFT_T_UNSET:-out/x}", "f") == "a: given"
    # an empty value is a value: the default is only for unset variables
    monkeypatch.setenv("SFT_T_UNSET", "")
    assert interpolate_env("a: ${SFT_T_UNSET:-out/x}", "f") == "a: "


def test_missing_env_var_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFT_T_MISSING_A", raising=False)
    monkeypatch.delenv("SFT_T_MISSING_B", raising=False)
    with pytest.raises(SpecError) as ei:
        interpolate_env("x: ${SFT_T_MISSING_B}\ny: ${SFT_T_MISSING_A}\nz: ${SFT_T_MISSING_A}", "job.yaml")
    msg = str(ei.value)
    assert msg.startswith("job.yaml: ")
    assert "SFT_T_MISSING_A, SFT_T_MISSING_B" in msg  # both, sorted, once each


def test_env_value_is_taken_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFT_T_OUT", "/data/run #3")
    text = yaml.safe_dump(doc()).replace("uri: /tmp/out", "uri: ${SFT_T_OUT}")
    assert parse_spec(text, "job.yaml").output.uri == "/data/run #3"


def test_env_var_in_a_comment_is_not_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFT_T_UNSET", raising=False)
    parse_spec("# set ${SFT_T_UNSET} to your bucket\n" + yaml.safe_dump(doc()), "job.yaml")


def test_dollar_without_braces_is_left_alone() -> None:
    assert interpolate_env("a: $HOME costs $5", "f") == "a: $HOME costs $5"


# ------------------------------------------------------------------ --set overrides


def test_set_parses_values_as_yaml() -> None:
    spec = parse(doc(), [
        "train.batch_size=3",
        "data.packing=false",
        "train.learning_rate=1.0e-3",
        "method.target_modules=[q_proj, v_proj]",
        "eval.prompts=[Say hi]",
        "name=other",
    ])
    assert spec.train.batch_size == 3 and isinstance(spec.train.batch_size, int)
    assert spec.data.packing is False
    assert spec.train.learning_rate == pytest.approx(1e-3)
    assert spec.method.target_modules == ["q_proj", "v_proj"]
    assert spec.eval.prompts == ["Say hi"]
    assert spec.name == "other"


def test_set_creates_missing_sections_and_nested_keys() -> None:
    d = doc()
    apply_override(d, "trainer.lr_scheduler_kwargs.num_cycles=0.5")
    apply_override(d, "method.kind=full")
    assert d["trainer"] == {"lr_scheduler_kwargs": {"num_cycles": 0.5}}
    assert d["method"] == {"kind": "full"}
    spec = JobSpec.model_validate(d)
    assert spec.method.kind == "full"
    assert spec.trainer.lr_scheduler_kwargs == {"num_cycles": 0.5}


def test_set_later_override_wins_and_value_may_hold_equals() -> None:
    spec = parse(doc(), ["train.epochs=1", "train.epochs=2", "output.uri=s3://bkt/k=v"])
    assert spec.train.epochs == 2
    assert spec.output.uri == "s3://bkt/k=v"


@pytest.mark.parametrize(("assignment", "needle"), [
    ("train.epochs", "expected key.path=value"),
    ("train..epochs=1", "empty key"),
    ("model.base.x=1", "'base' is not a section"),
])
def test_bad_set_is_a_spec_error(assignment: str, needle: str) -> None:
    msg = spec_error(doc(), [assignment])
    assert needle in msg and assignment in msg


def test_set_unknown_key_reports_its_path() -> None:
    msg = spec_error(doc(), ["train.learnig_rate=0.1"])
    assert "train.learnig_rate: unknown key" in msg


# ------------------------------------------------------------------ field errors


@pytest.mark.parametrize(("section", "key"), [
    ("model", "bse"), ("data", "max_len"), ("method", "rank"), ("train", "lr"),
    ("eval", "prompt"), ("output", "url"),
])
def test_unknown_key_names_dotted_path(section: str, key: str) -> None:
    d = doc()
    d.setdefault(section, {})[key] = 1
    msg = spec_error(d)
    assert f"{section}.{key}: unknown key" in msg


def test_unknown_top_level_key() -> None:
    msg = spec_error(doc(lora={"r": 8}))
    assert "lora: unknown key" in msg


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "batch_size", "eight"),
    ("train", "epochs", [1]),
    ("data", "packing", "maybe"),
    ("data", "format", "sharegpt"),
    ("method", "kind", "prefix"),
    ("method", "target_modules", "q_proj"),
    ("eval", "prompts", "one prompt"),
    ("backend", None, "gpu"),
])
def test_wrong_type_names_field(section: str, key: str | None, value: object) -> None:
    d = doc(**{section: {key: value} if key else value})
    msg = spec_error(d)
    # union-typed fields get the branch appended ("method.target_modules.list[str]: ...")
    assert (f"{section}.{key}" in msg) if key else msg.startswith(f"job.yaml: {section}:")


def test_missing_required_fields_named() -> None:
    d = doc()
    del d["output"]
    d["data"] = {"format": "chat"}
    msg = spec_error(d)
    assert "output: required field missing" in msg
    assert "data.train: required field missing" in msg


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "learning_rate", 0),
    ("train", "learning_rate", -1e-4),
    ("train", "epochs", 0),
    ("train", "batch_size", 0),
    ("train", "grad_accum", -2),
    ("train", "max_steps", 0),
    ("train", "max_grad_norm", 0),
    ("train", "logging_steps", 0),
    ("train", "warmup_ratio", 1.0),
    ("train", "weight_decay", -0.1),
    ("data", "max_length", 0),
    ("data", "eval_fraction", -0.1),
    ("data", "eval_fraction", 0.5),
    ("data", "max_samples", 0),
    ("method", "r", 0),
    ("method", "alpha", -8),
    ("method", "dropout", 1.0),
    ("eval", "max_new_tokens", 0),
    ("output", "stop_budget_seconds", 0),
    ("output", "keep_checkpoints", 0),
])
def test_out_of_range_hyperparameter(section: str, key: str, value: float) -> None:
    msg = spec_error(doc(**{section: {key: value}}))
    assert f"{section}.{key}:" in msg


def test_bad_job_name() -> None:
    assert "name:" in spec_error(doc(name="My Job!"))


def test_several_field_problems_reported_at_once() -> None:
    d = doc(train={"learning_rate": 0, "batch_size": "x"}, data={"bogus": 1}, method={"r": 0})
    msg = spec_error(d)
    for field in ("train.learning_rate", "train.batch_size", "data.bogus", "method.r"):
        assert field in msg
    assert msg.count("; ") >= 3


# ------------------------------------------------------------------ combinations

COMBINATIONS = [
    pytest.param(dict(deepspeed="zero4"), "deepspeed: 'zero4'", id="unknown-deepspeed-preset"),
    pytest.param(dict(method={"kind": "qlora"}, backend="tpu"), "method.kind: qlora", id="qlora-tpu"),
    pytest.param(dict(deepspeed="zero2", backend="tpu"), "deepspeed: DeepSpeed does not run on TPU",
                 id="deepspeed-tpu"),
    pytest.param(dict(deepspeed="zero3", backend="cpu"), "deepspeed: DeepSpeed is for GPUs",
                 id="deepspeed-cpu"),
    pytest.param(dict(method={"kind": "qlora"}, deepspeed="zero3-offload", backend="cuda"),
                 "deepspeed: ZeRO-3 cannot shard", id="qlora-zero3"),
    pytest.param(dict(output={"push_to_hub": "org/m", "merge": False}), "output.hub_push",
                 id="hub-merged-without-merge"),
    pytest.param(dict(data={"eval": "e.jsonl", "eval_fraction": 0.1}), "data.eval_fraction",
                 id="eval-file-and-fraction"),
    pytest.param(dict(output={"push_to_hub": "just-a-name"}), "output.push_to_hub: 'just-a-name'",
                 id="hub-repo-not-org-name"),
]


@pytest.mark.parametrize(("sections", "needle"), COMBINATIONS)
def test_each_impossible_combination(sections: dict, needle: str) -> None:
    msg = spec_error(doc(**sections))
    assert needle in msg


@pytest.mark.parametrize("sections", [
    dict(deepspeed="zero2", backend="cuda"),
    dict(deepspeed="configs/ds.json", backend="auto"),
    dict(method={"kind": "qlora"}, deepspeed="zero2", backend="cuda"),
    dict(method={"kind": "full"}, output={"push_to_hub": "org/m", "merge": False}),
    dict(output={"push_to_hub": "org/m", "merge": False, "hub_push": "adapter"}),
    dict(data={"eval": "e.jsonl"}),
    dict(method={"kind": "lora"}, backend="tpu"),
])
def test_near_misses_are_accepted(sections: dict) -> None:
    parse(doc(**sections))


def test_several_combination_problems_reported_at_once() -> None:
    msg = spec_error(doc(method={"kind": "qlora"}, backend="tpu", deepspeed="zero3",
                         data={"eval": "e.jsonl", "eval_fraction": 0.2}))
    assert "method.kind: qlora" in msg
    assert "DeepSpeed does not run on TPU" in msg
    assert "ZeRO-3 cannot shard" in msg
    assert "data.eval_fraction" in msg


# ------------------------------------------------------------------ hash and dump


def test_run_hash_ignores_where_outputs_go_but_not_training() -> None:
    a = parse(doc())
    assert a.run_hash() == parse(doc(), ["output.uri=s3://elsewhere/x"]).run_hash()
    assert a.run_hash() == parse(doc(), ["output.stop_budget_seconds=60"]).run_hash()
    assert a.run_hash() == parse(doc(), ["eval.max_new_tokens=7"]).run_hash()
    assert a.run_hash() == parse(doc()).run_hash()  # deterministic
    for o in ("train.learning_rate=1.0e-5", "data.max_length=128", "method.r=4",
              "model.base=builtin:tiny-gpt2", "output.merge=false"):
        assert parse(doc(), [o]).run_hash() != a.run_hash(), o


def test_output_merge_changes_the_published_result_not_the_training() -> None:
    """One definition for both checks: a resume (training fields) accepts a changed
    output.merge; the done check and run_hash (result fields) do not."""
    from sft_job.spec import changed_fields

    a, b = parse(doc()), parse(doc(), ["output.merge=false"])
    assert a.training_fields() == b.training_fields()
    assert a.run_hash() != b.run_hash()
    assert changed_fields(a.result_fields(), b.result_fields()) == ["output.merge"]
    c = parse(doc(), ["train.report_to=[tensorboard]"])  # run-neutral: neither
    assert c.training_fields() == a.training_fields() and c.run_hash() == a.run_hash()


def test_dump_spec_round_trip() -> None:
    spec = parse(doc(), ["method.target_modules=[q_proj]", "eval.prompts=['yes', 'a: b', '#x']",
                         "trainer.optim=adamw_torch", "data.eval_fraction=0.1"])
    text = dump_spec(spec)
    again = parse_spec(text, "job.yaml")
    assert again == spec
    assert again.run_hash() == spec.run_hash()
    assert yaml.safe_load(text)["train"]["learning_rate"] == spec.train.learning_rate


# ------------------------------------------------------------------ files


def test_bad_yaml_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: t\nmodel:\n  base: builtin:tiny-llama\n  revision: [oops\ndata: {}\n")
    with pytest.raises(SpecError) as ei:
        load_spec(str(path))
    msg = str(ei.value)
    assert f"{path}:" in msg and "invalid YAML" in msg
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert 4 <= line <= 5  # the unclosed list on line 4 (the parser notices on line 5)


def test_tab_indented_yaml_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: t\nmodel:\n\tbase: x\n")
    with pytest.raises(SpecError, match=re.escape(f"{path}:3:")):
        load_spec(str(path))


def test_load_spec_from_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc()))
    spec = load_spec(f"file://{path}", ["train.epochs=1"])
    assert spec.train.epochs == 1 and spec.data.train == "data.jsonl"


@pytest.mark.parametrize(("content", "needle"), [
    (None, "spec file not found"),
    (b"name: t\xff\n", "not UTF-8"),
    (b"- a\n- b\n", "YAML mapping"),
])
def test_unusable_spec_files(tmp_path: Path, content: bytes | None, needle: str) -> None:
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError, match=needle):
        load_spec(str(path))

