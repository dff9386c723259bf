"""Storage access, checked before anything is downloaded: every input exists and is readable,
output.uri (and data.cache_uri) takes a write, and the base model's files are there."""

from __future__ import annotations

import uuid
from pathlib import Path

from sft_job import storage
from sft_job.errors import AccessError, SftJobError, SpecError
from sft_job.preflight.report import Report
from sft_job.spec import JobSpec


def probe_output(uri: str) -> str:
    """Write then delete a small probe object under `uri`: a missing bucket, denied access or
    a path that is a file fails here (exit 3) instead of after training. Returns the
    credential source used (never the secret)."""
    from sft_job.uri import split_uri

    scheme, _, key = split_uri(uri)
    if scheme == "file" and Path(key).exists() and not Path(key).is_dir():
        raise AccessError(f"output.uri: {uri} is a file, not a directory")
    if scheme == "hf":
        raise SpecError(f"output.uri: {uri}: the Hub is not an output location; use "
                        "output.push_to_hub: org/name and a bucket or path for output.uri")
    if scheme == "file":  # no folders created for a check: a temporary one, removed
        return storage.probe(uri, write=True)
    probe = storage.join(uri, f".sft-job-probe-{uuid.uuid4().hex[:8]}")
    storage.write_text(probe, "probe")
    storage.delete_prefix(probe)
    return credential_source(uri)


def credential_source(uri: str) -> str:
    """Which credential chain serves `uri` (a description, never a secret)."""
    return storage.credential_source(uri)


def _probe_input(uri: str, label: str, rep: Report) -> None:
    from sft_job.uri import is_remote

    try:
        if not is_remote(uri):
            if not Path(uri.removeprefix("file://")).expanduser().exists():
                rep.problem(label, f"{uri}: no such file or directory", "data")
            return
        if uri.startswith("hf://"):
            return  # fetched with the Hub client during the data check
        if not storage.list_keys(uri) and not storage.exists(uri):
            rep.problem(label, f"{uri}: no object or prefix found (empty or missing)", "data")
            return
        rep.facts.setdefault("credentials", {})[label] = storage.probe(uri, write=False) \
            if storage.exists(uri) else credential_source(uri)
    except SftJobError as e:
        rep.error(label, e)


def check_storage(spec: JobSpec, rep: Report, probe_out: bool = True) -> None:
    """Every input readable; output.uri and data.cache_uri writable (when `probe_out`)."""
    _probe_input(spec.data.train, "data.train", rep)
    if spec.data.eval:
        _probe_input(spec.data.eval, "data.eval", rep)
    for label, uri in (("model.base", spec.model.base), ("model.tokenizer", spec.model.tokenizer)):
        if uri and uri.startswith(("s3://", "gs://")):
            _probe_input(uri, label, rep)
    if not probe_out:
        return
    try:
        rep.facts.setdefault("credentials", {})["output.uri"] = probe_output(spec.output.uri)
    except SftJobError as e:
        rep.error("output.uri", e)
    if spec.data.cache_uri:  # a shared prefix elsewhere: written to when the data is prepared
        if spec.data.cache_uri.startswith("hf://"):
            rep.problem("data.cache_uri", "the Hub cannot hold prepared data; use a path or a "
                        "s3:// or gs:// prefix")
            return
        try:
            rep.facts.setdefault("credentials", {})["data.cache_uri"] = \
                probe_output(spec.data.cache_uri)
        except SftJobError as e:
            rep.error("data.cache_uri", e)


def check_model_files(spec: JobSpec, rep: Report) -> None:
    """The base model's folder, file or prefix holds a config and weights (no download)."""
    from sft_job.models import source

    if rep.has("model.base"):
        return
    try:
        source.parse(spec.model.base).check(spec.model.revision)
    except SftJobError as e:
        rep.error("model.base", e)
