"""Prepare the rows the trainer reads: sources tokenized (stream.py), split, packed, on disk.

    <dir>/train.arrow   input_ids, labels (+ seq_lengths when packed): Arrow IPC stream files,
    <dir>/eval.arrow    memory-mapped by `datasets` when training
    <dir>/lengths.npy   tokens of every train example (summary.json's batching estimates)
    <dir>/meta.json     version, format, stats, data hash, the first examples (for samples)

Every step streams: the split is a boolean mask, packing takes PACK_ROWS rows at a time (a
multiple of TRL's batch, so the packed rows are the ones packing all rows at once gives).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from array import array
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from sft_job.data.formats import Example
from sft_job.data.stream import Source, examples_at, ordered_map, read_source
from sft_job.data.tokenize import PACK_BATCH, TokenStats, pack_table, token_stats
from sft_job.errors import DataError
from sft_job.spec import DataSpec

log = logging.getLogger("sft_job.data")

VERSION = 1  # of the files below: bump when the same inputs would give other rows
PACK_ROWS = 10 * PACK_BATCH  # rows a worker packs at once
SAMPLE_EXAMPLES = 16  # first examples of each split kept in meta.json (before/after samples)
FILES = ("train.arrow", "eval.arrow", "lengths.npy", "meta.json")


def split_mask(n: int, fraction: float, seed: int) -> Any:
    """Which of `n` examples go to eval (a numpy bool mask): a seeded shuffle of the positions,
    the first round(n * fraction) of them (at least one) held out; None when fraction is 0."""
    import numpy as np

    if fraction <= 0:
        return None
    idx = array("q", range(n))  # 8 bytes per row, shuffled exactly as a list would be
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataError(f"data.eval_fraction={fraction} leaves no training rows "
                        f"({n} rows in all)")
    mask = np.zeros(n, dtype=bool)
    mask[np.frombuffer(idx, dtype=np.int64)[:n_eval]] = True
    return mask


def prepare_dir(spec: DataSpec, tokenizer: Any, workdir: Path, out: Path, procs: int = 1,
                check_stop: Callable[[], None] | None = None) -> dict[str, Any]:
    """Read, tokenize, split and pack `spec`'s data into the folder `out` (FILES); returns
    what meta.json holds. Refuses data the job cannot train on, with the same messages as
    ever (malformed rows by file:line, no rows left, every row truncated before its EOS)."""
    import numpy as np

    t0 = time.perf_counter()
    tmp = out / "_tokenized"
    train = read_source(spec.train, spec, tokenizer, workdir, arrow=tmp / "train.arrow",
                        procs=procs, check_stop=check_stop)
    ev = read_source(spec.eval, spec, tokenizer, workdir, fmt=train.format,
                     arrow=tmp / "eval.arrow", procs=procs, check_stop=check_stop) \
        if spec.eval else None
    held, in_eval = _eval_split(train, ev, spec)
    eval_src = ev or train
    t = token_stats(train.raw_lengths[~held], train.trained[~held], spec.max_length)
    e = token_stats(eval_src.raw_lengths[in_eval], eval_src.trained[in_eval], spec.max_length)
    _check_trainable(t, train.format, spec)
    stats = _stats(train, ev, t, e, spec)
    stats["train_rows_batched"] = write_rows(train.arrow, ~held & (train.trained > 0),
                                             out / "train.arrow", spec.packing, spec.max_length,
                                             procs)
    write_rows(eval_src.arrow, in_eval & (eval_src.trained > 0), out / "eval.arrow",
               spec.packing, spec.max_length, procs)
    np.save(out / "lengths.npy", np.asarray(t.lengths, dtype=np.int32))
    meta = _meta(spec, tokenizer, workdir, (train, ev), (held, in_eval), stats, t0)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("data: %s format, %d train / %d eval examples, %d truncated, %d malformed skipped",
             train.format, stats["train_examples"], stats["eval_examples"], stats["truncated"],
             stats["malformed"])
    return meta


def _eval_split(train: Source, ev: Source | None, spec: DataSpec) -> tuple[Any, Any]:
    """(train rows held out for eval, eval source rows used) as numpy bool masks: all of
    data.eval when given, else data.eval_fraction of train's rows."""
    import numpy as np

    if ev is None:
        held = split_mask(train.examples, spec.eval_fraction, spec.seed)
        held = np.zeros(train.examples, dtype=bool) if held is None else held
    else:
        held = np.zeros(train.examples, dtype=bool)
    return held, np.ones(ev.examples, dtype=bool) if ev is not None else held


def _check_trainable(t: TokenStats, fmt: str, spec: DataSpec) -> None:
    """Refuse training rows that leave nothing to train on after truncation."""
    if not len(t.lengths):
        raise DataError(f"{spec.train}: every row's prompt fills data.max_length="
                        f"{spec.max_length} tokens, nothing left to train on; raise max_length")
    problem = all_truncated(t, fmt, spec.max_length)
    if problem:
        raise DataError(f"{spec.train}: {problem}")


def _meta(spec: DataSpec, tokenizer: Any, workdir: Path, sources: tuple[Source, Source | None],
          masks: tuple[Any, Any], stats: dict[str, Any], t0: float) -> dict[str, Any]:
    """What meta.json holds: version, format, stats, data files and hash, the first examples
    of each split (for the samples before and after training), the time taken."""
    import numpy as np

    train, ev = sources
    held, in_eval = masks
    first = np.flatnonzero(~held)[:SAMPLE_EXAMPLES].tolist()
    first_eval = np.flatnonzero(in_eval)[:SAMPLE_EXAMPLES].tolist()
    return {
        "version": VERSION,
        "format": train.format,
        "template": train.template,
        "stats": stats,
        "files": [str(f) for f in train.files + (ev.files if ev else [])],
        "data_hash": _data_hash(train.files + (ev.files if ev else [])),
        "examples": {"train": [_example_json(x) for x in
                               examples_at(train, spec, tokenizer, workdir, first)],
                     "eval": [_example_json(x) for x in
                              examples_at(ev or train, spec, tokenizer, workdir, first_eval)]},
        "prepare_s": round(time.perf_counter() - t0, 2),
    }


def write_rows(src: Path, keep: Any, dest: Path, packing: bool, max_length: int,
               procs: int = 1) -> int:
    """Copy the rows of the Arrow file `src` where `keep` is true into `dest`, packed when
    `packing` (blocks of PACK_ROWS rows, packed by `procs` worker processes); returns the rows
    written."""
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]
                       + ([("seq_lengths", pa.list_(pa.int32()))] if packing else []))
    if int(keep.sum()) <= PACK_ROWS:
        procs = 1  # one block: no pool to start
    written = 0
    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        blocks = _blocks(kept_batches(src, keep), PACK_ROWS if packing else PACK_BATCH)
        jobs = ((table, max_length) for table in blocks)
        with closing(ordered_map(pack_table, jobs, procs) if packing
                     else (t for t, _ in jobs)) as tables:
            for table in tables:
                for batch in table.cast(schema).to_batches(max_chunksize=PACK_BATCH):
                    writer.write_batch(batch)
                written += table.num_rows
    return written


def _blocks(batches: Any, rows: int) -> Any:
    """pyarrow Tables of exactly `rows` rows (the last one shorter) from record batches."""
    import pyarrow as pa

    buf, n = [], 0
    for batch in batches:
        buf.append(batch)
        n += batch.num_rows
        while n >= rows:
            table = pa.Table.from_batches(buf)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf)


def kept_batches(src: Path, keep: Any) -> Any:
    """The record batches of the Arrow file `src` with only the rows where `keep` is true
    (read with plain file reads, a batch at a time)."""
    import pyarrow as pa

    base = 0
    with pa.OSFile(str(src)) as f:
        for batch in pa.ipc.open_stream(f):
            mask = keep[base:base + batch.num_rows]
            base += batch.num_rows
            if mask.any():
                yield batch.filter(pa.array(mask))


def all_truncated(stats: TokenStats, fmt: str, max_length: int) -> str | None:
    """A message when every row is cut at max_length before its EOS, so the model would never
    learn to stop (plain text is exempt: cutting long documents is expected there)."""
    if fmt == "text" or not stats.rows or stats.truncated < stats.rows:
        return None
    return (f"every row is longer than data.max_length={max_length} tokens (the shortest has "
            f"{min(stats.raw_lengths)}): each would be cut before its EOS and the model would "
            "never learn to stop; raise data.max_length")


def length_facts(lengths: Any) -> dict[str, Any]:
    """min / median / p95 / max of token lengths, as `statistics` computes them (median and
    the 'exclusive' quantile method), from a sorted numpy array."""
    import numpy as np

    s = np.sort(lengths)
    n = len(s)
    median = int(s[n // 2]) if n % 2 else (int(s[n // 2 - 1]) + int(s[n // 2])) / 2
    if n > 1:
        j = min(max(19 * (n + 1) // 20, 1), n - 1)
        delta = 19 * (n + 1) - j * 20
        p95 = (int(s[j - 1]) * (20 - delta) + int(s[j]) * delta) / 20
    else:
        p95 = int(s[0])
    return {"min": int(s[0]), "median": median, "p95": round(p95, 1), "max": int(s[-1])}


def stop_counts(batch: Any, stops: set[int], max_length: int) -> tuple[int, int]:
    """(rows training a stop token before the end of a trained span, rows whose last trained
    token is no stop and that were not cut at max_length) in a batch of rows that train."""
    import numpy as np

    col = batch.column("labels")
    labels = col.flatten().to_numpy()
    offsets = col.offsets.to_numpy() - col.offsets[0].as_py()
    starts, lens = offsets[:-1], np.diff(offsets)
    trained = labels != -100
    nxt = np.zeros_like(trained)
    nxt[:-1] = trained[1:]
    nxt[offsets[1:] - 1] = False  # a row's last token ends its run
    is_stop = np.isin(labels, list(stops))
    early = np.add.reduceat((is_stop & trained & nxt).astype(np.int64), starts) > 0
    pos = np.where(trained, np.arange(len(labels)), -1)
    last = np.maximum.reduceat(pos, starts)
    unstopped = ~early & ~np.isin(labels[last], list(stops)) & (lens < max_length)
    return int(early.sum()), int(unstopped.sum())


def _stats(train: Source, ev: Source | None, t: TokenStats, e: TokenStats, spec: DataSpec
           ) -> dict[str, Any]:
    return {
        "format": train.format,
        "template": train.template,
        "train_examples": t.rows - t.dropped_no_target,
        "eval_examples": e.rows - e.dropped_no_target,
        "malformed": train.n_malformed + (ev.n_malformed if ev else 0),
        "truncated": t.truncated + e.truncated,
        "dropped_prompt_too_long": t.dropped_no_target + e.dropped_no_target,
        "duplicates": train.duplicates,
        "train_tokens": int(t.lengths.sum()),
        "trained_tokens": t.trained_tokens,
        "max_length": spec.max_length,
    }


def _data_hash(files: list[Path]) -> str:
    """sha256 over the data files' names and contents (a changed dataset is a different run)."""
    h = hashlib.sha256()
    for f in sorted(files):
        paths = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
        for p in paths:
            h.update(p.name.encode())
            with p.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _example_json(ex: Example) -> dict[str, Any]:
    return {"segments": [[t, trained] for t, trained in ex.segments], "prompt": ex.prompt,
            "source": ex.source, "ends_with_stop": ex.ends_with_stop}


def example_from_json(d: dict[str, Any]) -> Example:
    return Example([(t, bool(tr)) for t, tr in d["segments"]], d["prompt"], d["source"],
                   bool(d["ends_with_stop"]))
