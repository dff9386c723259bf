"""The whole job, top to bottom: `run_job(spec)`.

    sft-job run jobs/smoke-cpu.yaml

The checks and the output lease (here), then three steps, each a module with a typed result:
`prepare` (spec -> backend, model, data; the base model's samples), `fit` (resume point,
trainer, training, stop handling), `finalize` (evaluate, save/merge, reports, upload, push).
Everything is written to a local staging folder first and uploaded to `output.uri` section by
section (each committed with a marker); `_SUCCESS` is written last, so its presence means the
run is complete and a rerun exits at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.checkpoint import lease, preempt
from sft_job.context import JobContext, Timings
from sft_job.errors import SftJobError
from sft_job.finalize import SUCCESS, finalize
from sft_job.fit import fit
from sft_job.prepare import prepare, sample_base
from sft_job.progress import Reporter
from sft_job.spec import JobSpec, changed_fields
from sft_job.specload import validate_doc
from sft_job.topology import here

log = logging.getLogger("sft_job")


def setup_logging() -> None:
    """Plain timestamped lines on stderr (rank-tagged when there are several ranks, and only
    rank 0 at INFO); quiet the libraries' own chatter."""
    topo = here()
    tag = f"[rank {topo.rank}] " if topo.distributed else ""
    level = logging.INFO if topo.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {tag}%(message)s",
                        datefmt="%H:%M:%S", force=True)
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "urllib3", "botocore",
                 "httpx", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes warns on every import that an optional Hub kernel is absent (never needed)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # progress bars are noise in a log file (set before imports)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows it
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not Path("/dev/nvidiactl").exists():  # DeepSpeed would log its guess on import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gemm_4bit.*")


def workdir_for(spec: JobSpec) -> Path:
    """Local scratch for this job on this output, locked for this rank (see lease.workdir)."""
    return lease.workdir(spec, here().rank)


def run_job(spec: JobSpec, allow_changed: bool = False) -> dict[str, Any]:
    """Run one job end to end and return its summary. SIGTERM/SIGINT are caught for the whole
    run: before training they end it with 75 at the next phase boundary (nothing to save yet),
    during training they become a committed checkpoint, during finish they are noted and the
    finish goes on (a second signal exits at once)."""
    setup_logging()
    # the lease on the output ends with the run; the reporter records how the run ended
    # (progress.json) and closes the trackers
    with preempt.watch() as stop, lease.scope(), Reporter(spec) as reporter:
        return _run(spec, allow_changed, stop, reporter)


def _already_done(spec: JobSpec, allow_changed: bool) -> bool:
    """_SUCCESS is in output.uri: done, if it is this job's result. A finished run of another
    spec there (its job.yaml differs in a field that changes the model) is refused (exit 2)
    rather than reported as done; --allow-changed accepts it."""
    import yaml

    from sft_job.errors import SpecError

    out_uri = spec.output.uri
    if not storage.exists(storage.join(out_uri, SUCCESS)):
        return False
    try:
        theirs = validate_doc(yaml.safe_load(storage.read_text(storage.join(out_uri, "job.yaml"))),
                              "job.yaml")
    except (SftJobError, yaml.YAMLError, ValueError, TypeError):
        theirs = None  # no readable job.yaml (an older version's run): trust _SUCCESS
    if theirs is not None and theirs.run_hash() != spec.run_hash() and not allow_changed:
        changed = changed_fields(theirs.result_fields(), spec.result_fields())
        raise SpecError(f"output.uri: {out_uri} holds the finished run of another spec "
                        f"({', '.join(changed) or 'spec'} differ); use a new output.uri "
                        "(--allow-changed accepts it as done)")
    log.info("%s/%s exists: this job is already done, nothing to do", out_uri, SUCCESS)
    return True


def _run(spec: JobSpec, allow_changed: bool, stop: Any, reporter: Reporter) -> dict[str, Any]:
    timings = Timings()
    storage.export_s3_endpoint(spec.output.s3_endpoint_url)
    if _already_done(spec, allow_changed):
        return {"already_done": True}
    ctx = JobContext(spec, workdir_for(spec), here().rank, stop, allow_changed, timings)
    if not _claim(ctx):  # rank 0: the checks, the lease; done meanwhile?
        return {"already_done": True}
    ctx.check_stop("the checks")
    job = prepare(ctx)  # backend, model (checked), tokenizer, prepared data
    samples = sample_base(ctx, job)  # the base model's answers, for before -> after
    fitted = fit(ctx, job, reporter)  # resume, trainer, output opened, training
    return finalize(ctx, job, samples, fitted)  # evaluate, save/merge, upload, _SUCCESS


def _claim(ctx: JobContext) -> bool:
    """This rank's scratch, fresh; rank 0: the cheap checks, then the output lease and a clean
    stage. False when the run finished while we waited for the lease."""
    from sft_job.preflight import fast_checks

    spec = ctx.spec
    shutil.rmtree(ctx.mine, ignore_errors=True)
    ctx.mine.mkdir(parents=True)
    if not here().is_main:
        return True
    # spec, storage access (a write probe of output.uri), model files and every data row,
    # without torch: a bad job fails in seconds, before any model is downloaded
    fast_checks(spec, workdir=ctx.mine, data_cache=spec.data_cache_uri())
    lease.acquire(spec)  # the output is this run's from here on (exit 2 if another's)
    if _already_done(spec, ctx.allow_changed):  # finished while we waited for the lease
        return False
    for stale in (ctx.stage, ctx.work / "trainer", ctx.work / "ckpt-staging"):
        shutil.rmtree(stale, ignore_errors=True)  # a reused machine's leftovers are not ours
    ctx.stage.mkdir(parents=True, exist_ok=True)
    return True
