"""Preflight: everything `sft-job validate` checks before a GPU is rented.

    sft-job validate jobs/gpt2-alpaca-lora.yaml --samples 3 --json report.json

Two passes. The cheap one (`fast_checks`, also the first thing `sft-job run` does) needs no
torch, tokenizer or weights: spec combinations, storage access, the base model's files, every
data row read and checked against its format. The full one, only when the cheap one passed:
tokenizer -> token lengths, truncation, packing efficiency -> N samples rendered as training
sees them -> memory estimate. Problems are collected, not raised one by one, so a user sees
everything a pass finds at once; the exit code is 2 (3 when every problem is a storage/Hub
access problem, 75 when the rest are transient storage failures).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from sft_job import storage
from sft_job.environment import missing_packages
from sft_job.errors import SftJobError, SpecError
from sft_job.preflight.access import check_model_files, check_storage
from sft_job.preflight.report import PreflightFailed, Report, print_report
from sft_job.preflight.rows import prepared, scan_data
from sft_job.preflight.settings import check_spec
from sft_job.preflight.tokens import check_tokens, tokenizer_of
from sft_job.spec import JobSpec

__all__ = ["PreflightFailed", "Report", "fast_checks", "preflight"]

FULL_PASS = ("tokenizer", "token lengths", "samples", "memory estimate")


def fast_checks(spec: JobSpec, workdir: Path | None = None, probe_out: bool = True,
                data_cache: str | None = None) -> Report:
    """The cheap checks, in seconds and without torch, a tokenizer or model weights: spec
    combinations, storage access (a write probe of output.uri when `probe_out`), the base
    model's files, and every data row read and checked against its format (not when
    `data_cache` holds data prepared from these files and data.* fields: they were read and
    accepted then). `sft-job run` calls this first; raises PreflightFailed (exit 2/3/75)
    naming every problem on one line. Downloads go under `workdir` (a temporary folder,
    removed, when None)."""
    rep = Report()
    storage.export_s3_endpoint(spec.output.s3_endpoint_url)
    for where, module, install in missing_packages(spec):  # this machine runs the job
        rep.problem(where, f"needs the Python package '{module}', which is not installed "
                    f"({install})")
    work = workdir or Path(tempfile.mkdtemp(prefix="sft-job-check-"))
    try:
        _cheap_pass(spec, rep, work, probe_out, data_cache)
    finally:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if rep.problems:
        raise rep.failure("")
    return rep


def preflight(spec: JobSpec, samples: int = 2, json_out: Path | None = None) -> Report:
    """Run every check; print a report; raise PreflightFailed when the job would fail. The
    full pass (tokenizer, tokens, samples, memory) runs only when the cheap pass found nothing."""
    _quiet_libraries()
    rep = Report()
    storage.export_s3_endpoint(spec.output.s3_endpoint_url)
    rep.facts["spec_hash"] = spec.run_hash()
    for where, module, install in missing_packages(spec):  # the job may run elsewhere
        rep.warnings.append(f"{where}: needs the Python package '{module}', not installed here: "
                            f"the machine that runs the job must have it ({install})")
    work = Path(tempfile.mkdtemp(prefix="sft-job-validate-"))
    try:
        _cheap_pass(spec, rep, work, probe_out=True)
        if rep.problems:
            rep.skipped = list(FULL_PASS)
        else:
            _full_pass(spec, rep, work, samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_report(rep)
    if json_out:
        _write_json(rep, json_out)
    if rep.problems:
        raise rep.failure("validate: the job would fail: ")
    return rep


def _quiet_libraries() -> None:
    """The libraries' notes are not the report."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # (set again on its import)
    for lib in ("transformers", "bitsandbytes", "trl", "peft", "accelerate"):
        logging.getLogger(lib).setLevel(logging.ERROR)


def _cheap_pass(spec: JobSpec, rep: Report, work: Path, probe_out: bool,
                data_cache: str | None = None) -> None:
    check_spec(spec, rep)
    check_storage(spec, rep, probe_out)
    check_model_files(spec, rep)
    if not (data_cache and not rep.problems and prepared(spec, data_cache)):
        scan_data(spec, rep, work)


def _full_pass(spec: JobSpec, rep: Report, work: Path, samples: int) -> None:
    """Tokenizer -> token lengths, truncation, packing, samples -> memory estimate."""
    tok, meta = tokenizer_of(spec, rep)
    if tok is not None:
        check_tokens(spec, tok, samples, rep, work)
    _estimate_memory(spec, rep, meta)


def _estimate_memory(spec: JobSpec, rep: Report, meta: Path | str | None) -> None:
    from sft_job.errors import ModelError
    from sft_job.memory import estimate
    from sft_job.models.load import loading

    try:
        with loading("model.base", f"the config of {spec.model.base}"):
            est = estimate(spec, meta)
    except ModelError as e:  # the config itself is unusable: so would the run be
        rep.error("model.base", e)
        return
    except SftJobError as e:
        rep.warnings.append(f"memory estimate skipped: {e}")
        return
    if est is None:
        return
    rep.facts["memory"] = est
    acc = spec.resources.accelerator
    if acc and est.get("device_gb") and est["total_gb"] > est["device_gb"] * 0.92:
        rep.problem(  # the job would fail: validate must not say OK
            "resources.accelerator",
            f"about {est['total_gb']:.1f} GB per device needed, {acc} has "
            f"{est['device_gb']} GB: it will not fit; try method.kind: lora/qlora, "
            "method.gradient_checkpointing: true, a smaller train.batch_size or ZeRO-3")


def _write_json(rep: Report, path: Path) -> None:
    try:
        path.write_text(json.dumps({"ok": not rep.problems, **rep.__dict__}, indent=2,
                                   default=str))
    except OSError as e:
        raise SpecError(f"--json {path}: cannot write the report ({e.strerror})") from None
