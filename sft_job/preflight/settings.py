"""The job's settings as a whole, for the cheap pass (so `validate` and the first seconds of
`run`): output.uri overlapping an input or a cache, packing with custom model code, the
`trainer:` values tried out, the trackers' packages, the DeepSpeed config file. No torch
unless `trainer:` is set. (Optional packages: environment.py.)
"""

from __future__ import annotations

import contextlib
import tempfile

from sft_job.errors import SftJobError, SpecError
from sft_job.preflight.report import Report
from sft_job.spec import JobSpec


def check_spec(spec: JobSpec, rep: Report) -> None:
    """What the spec's fields decide together with the libraries and the machine's folders."""
    for problem in overlap_problems(spec):
        rep.problem("output.uri", problem)
    if spec.data.packing and spec.model.trust_remote_code:
        rep.problem("data.packing", "custom model code (trust_remote_code) may not honour "
                    "per-sample position ids, so packed samples could attend to each other; "
                    "set data.packing: false")
    if spec.trainer.fields_set():
        try:
            probe_trainer(spec)
        except SftJobError as e:  # its message starts with the trainer field
            where, _, what = str(e).partition(": ")
            rep.problem(where, what)
    from sft_job.train.trackers import missing

    for msg in missing(spec.train.report_to):
        rep.problem("train.report_to", msg)
    if spec.deepspeed.config_file:
        from sft_job.train.deepspeed import config

        try:
            config(spec)  # exists, parses, agrees with the spec
        except SftJobError as e:
            rep.error("deepspeed", e)


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
