"""Load a job spec: a local path or a bucket URI -> YAML (bounded, specyaml.py) -> `${ENV}`
interpolation -> `--set a.b=v` overrides -> no credential values -> validation (spec.py).

    spec = load_spec("s3://b/jobs/x.yaml", ["train.epochs=1"])

Every problem is reported at once, each with its dotted field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sft_job import credentials
from sft_job.errors import SpecError
from sft_job.spec import JobSpec
from sft_job.spectrainer import trainer_refusal
from sft_job.specyaml import MAX_SPEC_BYTES, interpolate_env, load_yaml

__all__ = ["apply_override", "format_validation_error", "interpolate_env", "load_spec",
           "parse_spec", "validate_doc"]


def apply_override(doc: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 1, true, [a] work)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise SpecError(f"--set {assignment!r}: empty key in '{path}'")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node = doc
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise SpecError(f"--set {assignment!r}: '{k}' is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_spec(text: str, source: str, overrides: list[str] | None = None) -> JobSpec:
    """Parse YAML text into a validated JobSpec, or raise SpecError listing every problem."""
    doc = load_yaml(text, source)
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise SpecError(f"{source}: a job spec is a YAML mapping, got {type(doc).__name__}")
    # top-level x-* keys hold YAML anchors for `<<: *name` merges (as in Compose files)
    doc = interpolate_env({k: v for k, v in doc.items()
                           if not (isinstance(k, str) and k.startswith("x-"))}, source)
    for o in overrides or []:
        apply_override(doc, o)
    leaked = credentials.find_in(doc)
    if leaked:
        raise SpecError(f"{source}: " + "; ".join(
            f"{where}: holds the value of the credential variable {name}; credentials never go "
            "in a spec (it is written to job.yaml and the model card): the job reads them from "
            "the environment itself" for where, name in leaked))
    return validate_doc(doc, source)


def validate_doc(doc: Any, source: str) -> JobSpec:
    """A JobSpec from a parsed document, or SpecError naming every problem (the DeepSpeed on
    CPU testing switch comes from the environment: environment.py)."""
    from sft_job.environment import deepspeed_on_cpu

    try:
        return JobSpec.model_validate(doc, context={"deepspeed_on_cpu": deepspeed_on_cpu()})
    except ValidationError as e:
        raise SpecError(f"{source}: " + format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    """One line per problem joined by '; ', each 'field.path: message'."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and err["loc"][:1] == ("trainer",):
            msg = trainer_refusal(str(err["loc"][-1]))
        elif err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `sft-job schema` lists the fields)"
        elif err["type"] == "missing":
            msg = "required field missing"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_spec(source: str, overrides: list[str] | None = None) -> JobSpec:
    """Load a spec from a local path or a storage URI (s3://, gs://, file://)."""
    if "://" in source and not source.startswith("file://"):
        from sft_job import storage

        info = storage.stat(source)
        if info is not None and info.size > MAX_SPEC_BYTES:
            raise SpecError(f"{source}: the spec is {info.size:,} bytes; a job spec is at most "
                            f"{MAX_SPEC_BYTES:,}")
        try:
            text = storage.read_text(source)
        except UnicodeDecodeError as e:
            raise SpecError(f"{source}: not UTF-8 text (byte {e.start})") from None
    else:
        path = Path(source.removeprefix("file://"))
        if not path.is_file():
            raise SpecError(f"{source}: spec file not found")
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{source}: the spec is {path.stat().st_size:,} bytes; a job spec is "
                            f"at most {MAX_SPEC_BYTES:,}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{source}: not UTF-8 text (byte {e.start})") from None
    return parse_spec(text, source, overrides)
