"""Every data row, read and checked against its format without a tokenizer (chat rows with
plain ChatML), streamed; skipped when the data was prepared from these very files before."""

from __future__ import annotations

from pathlib import Path

from sft_job.errors import SftJobError
from sft_job.preflight.report import Report
from sft_job.spec import JobSpec


def prepared(spec: JobSpec, cache_uri: str) -> bool:
    """The data cache at `cache_uri` holds data prepared from these files and data.* fields
    (they were read and accepted then)."""
    from sft_job.data.cache import committed_for_data

    try:
        found = committed_for_data(spec.data, cache_uri)
    except SftJobError:
        return False  # the row scan reports what is wrong with the data
    if found:
        import logging

        logging.getLogger("sft_job").info("data: prepared from these files before (%s): "
                                          "skipping the row scan", found)
    return bool(found)


def scan_data(spec: JobSpec, rep: Report, work: Path) -> None:
    """Read every row of data.train (and data.eval, in train's format) and check it against
    its format; tokenizer-free (chat rows are checked with plain ChatML), streamed."""
    from sft_job.data import _cpus
    from sft_job.data.stream import read_source

    relaxed = spec.data.model_copy(update={"on_malformed": "skip"})
    fmt = None
    for label, uri in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        if uri is None or rep.has(label):
            continue
        try:  # the run's data step reuses `work` (downloads)
            src = read_source(uri, relaxed, None, work, fmt=fmt,
                              procs=spec.data.num_proc or _cpus())
        except SftJobError as e:
            rep.error(label, e)
            continue
        fmt = fmt or src.format
        rep.facts["data" if label == "data.train" else "eval_data"] = {
            "format": src.format,
            "files": [str(f) for f in src.files],
            "rows": src.examples + src.n_malformed,
            "usable": src.examples,
            "malformed": src.n_malformed,
            "malformed_examples": [f"{m.source}: {m.reason}" for m in src.malformed[:5]],
            "empty_responses": src.empty_responses,
            "duplicates": src.duplicates,
        }
        if src.n_malformed and spec.data.on_malformed == "fail":
            m = src.malformed[0]
            rep.problem(label, f"{src.n_malformed} malformed row(s), first {m.source}: "
                        f"{m.reason} (fix them or set data.on_malformed: skip)", "data")
