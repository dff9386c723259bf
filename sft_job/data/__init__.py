"""Data: fetch -> read -> detect format -> render examples -> tokenize -> split -> pack.

`build` is the job's data step: it prepares the rows once (stream.py, prepared.py: streamed,
tokenized in batches by worker processes, written as Arrow files) into the content-addressed
cache under data.cache_uri (cache.py), or loads them from there, and hands the trainer
memory-mapped datasets. `prepare` and `split` are the same steps on small data held in memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_job.data.formats import Example
from sft_job.data.load import Malformed
from sft_job.data.prepared import all_truncated, example_from_json, split_mask
from sft_job.data.stream import read_source
from sft_job.spec import DataSpec

__all__ = ["DataBundle", "Prepared", "all_truncated", "build", "prepare", "split"]

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Records of one data source, rendered to examples, with what was wrong with the rest."""

    format: str
    examples: list[Example]
    malformed: list[Malformed]
    files: list[Path]
    empty_responses: int = 0
    duplicates: int = 0
    template: str = "native"  # how alpaca/prompt-response rows were rendered (model | native)


@dataclass
class DataBundle:
    """Everything the trainer and the report need from the data."""

    format: str
    train: Any  # datasets.Dataset, memory-mapped: input_ids, labels (+ seq_lengths when packed)
    eval: Any
    train_examples: list[Example]  # the first ones (before/after samples), not every row
    eval_examples: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    data_hash: str = ""  # of the data files' contents when prepared (checkpoints record it)


def prepare(uri: str, spec: DataSpec, tokenizer: Any | None, workdir: Path,
            fmt: str | None = None) -> Prepared:
    """Fetch and read `uri`, detect/check its format and render every row to an Example, in
    memory (small data). Malformed rows fail (data.on_malformed: fail) or are collected (skip).
    Without a tokenizer chat rows are checked and rendered with plain ChatML."""
    src = read_source(uri, spec, tokenizer, workdir, fmt=fmt, head=None, keep_malformed=None)
    return Prepared(src.format, src.head, src.malformed, src.files, src.empty_responses,
                    src.duplicates, src.template)


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/eval split by fraction (at least one eval row when fraction > 0)."""
    held = split_mask(len(examples), fraction, seed)
    if held is None:
        return examples, []
    return ([e for e, h in zip(examples, held, strict=True) if not h],
            [e for e, h in zip(examples, held, strict=True) if h])


def build(spec: DataSpec, tokenizer: Any, workdir: Path, *, cache_uri: str | None = None,
          local_root: Path | None = None, check_stop: Any = None) -> DataBundle:
    """The data step for training: the prepared rows of `spec` for this tokenizer, from the
    cache at `cache_uri` (data.cache_uri wins; default `workdir/prepared`) or prepared now by
    this process, or by the rank that prepares for this one (see cache.py). Bucket entries are
    copied to `local_root` (this machine's scratch shared by its ranks) and used from there."""
    from datasets import Dataset

    from sft_job.data import cache
    from sft_job.models.chat import ensure_template

    uri = spec.cache_uri or cache_uri or str(workdir / "prepared")
    entry = cache.obtain(spec, tokenizer, workdir, uri, local_root or workdir / "prepared",
                         procs=spec.num_proc or _cpus(), check_stop=check_stop)
    meta = entry.meta
    if meta["format"] == "chat":
        ensure_template(tokenizer)  # as preparing did: the model ships it
    stats = dict(meta["stats"])
    stats["train_lengths"] = _lengths(entry.dir / "lengths.npy")
    stats["prepared"] = {"uri": entry.uri, "here": entry.prepared_here,
                         "waited_s": entry.waited_s, "prepare_s": meta.get("prepare_s")}
    return DataBundle(
        format=meta["format"],
        train=Dataset.from_file(str(entry.dir / "train.arrow")),
        eval=Dataset.from_file(str(entry.dir / "eval.arrow")),
        train_examples=[example_from_json(x) for x in meta["examples"]["train"]],
        eval_examples=[example_from_json(x) for x in meta["examples"]["eval"]],
        stats=stats,
        files=[Path(f) for f in meta["files"]],
        data_hash=meta["data_hash"],
    )


def _lengths(path: Path) -> Any:
    import numpy as np

    return np.load(path, mmap_mode="r")


def _cpus() -> int:
    """CPUs this process may use (the data step's worker processes)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
