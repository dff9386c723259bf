"""Checks of the job as a whole for the cheap pass (preflight.fast_checks, so `validate` and
the first seconds of `run`): output.uri overlapping an input or a cache, and the `trainer:`
values tried out. No torch unless `trainer:` is set. (Optional packages: environment.py.)
"""

from __future__ import annotations

import contextlib
import tempfile

from sft_job.errors import SftJobError, SpecError
from sft_job.spec import JobSpec


def probe_trainer(spec: JobSpec) -> None:
    """The `trainer:` values build an SFTConfig, an optimizer and a schedule (tf32 is left to
    `run`: it depends on the GPU the job gets, not on this machine)."""
    import warnings

    fields = {k: v for k, v in spec.trainer.fields_set().items() if k != "tf32"}
    with tempfile.TemporaryDirectory(prefix="sft-job-probe-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the libraries' import chatter is not the report
        from trl import SFTConfig

        from sft_job.train.passthrough import check_settings

        try:
            config = SFTConfig(output_dir=tmp, report_to="none", use_cpu=True,
                               lr_scheduler_type=spec.train.lr_scheduler, **fields)
        except (ValueError, TypeError) as e:
            raise SpecError(f"trainer: SFTConfig rejected the settings: "
                            f"{str(e).splitlines()[0]}") from None
        check_settings(config)


def inputs_of(spec: JobSpec) -> list[tuple[str, str]]:
    """(what, location) of everything the job reads, and the local folders it keeps for itself
    (model cache, Hub cache, work folder): output.uri may overlap none of them."""
    from sft_job.models import source
    from sft_job.storage.cache import cache_root, hub_cache_root, job_workdir

    out = [("data.train", spec.data.train)]
    out += [("data.eval", spec.data.eval)] if spec.data.eval else []
    for label, loc in (("model.base", spec.model.base), ("model.tokenizer", spec.model.tokenizer)):
        with contextlib.suppress(SftJobError):  # a bad one is reported by the model checks
            if loc and source.parse(loc).kind in ("local", "bucket"):
                out.append((label, loc))
    out += [("deepspeed", spec.deepspeed.config_file)] if spec.deepspeed.config_file else []
    return [*out, ("the model cache (SFT_JOB_CACHE)", str(cache_root())),
            ("the Hugging Face cache", str(hub_cache_root())),
            ("its work folder", str(job_workdir(spec.name, spec.run_hash(), spec.output.uri)))]


def overlap_problems(spec: JobSpec) -> list[str]:
    """output.uri must not be, contain or sit inside an input: the run writes model/, adapter/,
    checkpoints/ and job.yaml there (over a base model in `out/model`), deletes unfinished
    uploads, and a rerun would read its own checkpoints as data."""
    from sft_job.uri import overlap

    out = spec.output.uri
    try:
        inputs = inputs_of(spec)
    except SftJobError:
        return []  # an unusable output.uri is reported by the storage checks
    problems = []
    for what, loc in inputs:
        try:
            clash = overlap(out, loc)
        except SftJobError:
            continue  # an unusable location is reported by its own check
        if clash:
            problems.append(f"{out} and {what} ({loc}) overlap (one is inside the other); the "
                            "job writes and deletes under output.uri: give it a folder or prefix "
                            "of its own")
    return problems
