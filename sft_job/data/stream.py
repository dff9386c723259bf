"""One data source as a stream: read -> render -> tokenize, in chunks, in worker processes.

    records (load.iter_records) -> chunks of CHUNK -> workers: formats.to_example + one
    tokenizer call per chunk (tokenize.encode_batch) -> in order -> an Arrow file of
    input_ids/labels (one row per example) + per-example lengths and text hashes (numpy)

Nothing holds every row as Python objects: memory is a few chunks in flight, the numpy arrays
(~20 bytes per example) and the first examples (kept for before/after samples).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

from sft_job.data import formats, load
from sft_job.data.formats import Example, RowError
from sft_job.data.load import Malformed, Record
from sft_job.errors import DataError, TransientError
from sft_job.models.chat import ensure_template
from sft_job.spec import DataSpec

log = logging.getLogger(__name__)

CHUNK = 1000  # records per worker task (and per tokenizer call)
HEAD = 4096  # examples kept in memory from the start of a source
KEEP_MALFORMED = 1000  # malformed rows kept for reports (all are counted)
POOL_MIN_BYTES = 4 << 20  # smaller sources are processed in this process (no pool to start)


@dataclass
class Source:
    """What reading one data source found: its format, counts, the first examples, and (when
    tokenized) per-example lengths and the Arrow file of its rows, in file order."""

    uri: str
    format: str
    template: str  # how alpaca/prompt-response rows were rendered: model | native
    files: list[Path]
    examples: int = 0
    malformed: list[Malformed] = field(default_factory=list)  # read errors first, then rows
    n_malformed: int = 0
    empty_responses: int = 0
    duplicates: int = 0
    head: list[Example] = field(default_factory=list)
    raw_lengths: Any = None  # np.int32 per example, before truncation
    trained: Any = None  # np.int32 trained tokens per example, after truncation
    arrow: Path | None = None  # input_ids/labels, one row per example
    items: Any = None  # np.int64 per example: its place among the rows read (malformed too)


@dataclass
class _Ctx:
    fmt: str
    spec: DataSpec
    tokenizer: Any
    encode: bool  # tokenize, or only render (the tokenizer-free check)


@dataclass
class _Part:
    """What a worker returns for one chunk."""

    enc: Any  # tokenize.Encoded | None
    hashes: Any  # np.uint64 per example
    read_bad: list[Malformed]
    row_bad: list[Malformed]
    examples: list[Example] | None
    n: int
    ok: Any  # np.int32: which items of the chunk became the examples


_CTX: _Ctx | None = None  # set before the pool forks: what every worker works with


def read_source(uri: str, spec: DataSpec, tokenizer: Any | None, workdir: Path, *,
                fmt: str | None = None, arrow: Path | None = None, procs: int = 1,
                head: int | None = HEAD, keep_malformed: int | None = KEEP_MALFORMED,
                check_stop: Callable[[], None] | None = None) -> Source:
    """Fetch and read `uri`, detect/check its format, render every row (and tokenize it into
    `arrow` when given). Malformed rows fail (data.on_malformed: fail, after the whole source
    was read, so the count is complete) or are counted (skip). Without a tokenizer chat rows
    are checked and rendered with plain ChatML. `head`: examples kept (None: all).
    `check_stop` is called between chunks (it raises to abandon the source)."""
    path = load.fetch(uri, workdir)
    items = load.iter_records(path, max_rows=spec.max_samples)
    (recs, bad), items = _peek_records(items, 20)
    if not recs and not bad:
        raise DataError(f"{uri}: no rows")
    fmt = fmt or _format([r.row for r in recs], spec, uri)
    if tokenizer is None:
        tokenizer = formats.PlainChatML()
    elif fmt == "chat":
        ensure_template(tokenizer)
    template = formats.resolve_template(spec, tokenizer) \
        if fmt in ("alpaca", "prompt-response") else "model" if fmt == "chat" else "native"
    src = Source(uri, fmt, template, load.source_files(path))
    if procs > 1 and sum(_size(f) for f in src.files) < POOL_MIN_BYTES:
        procs = 1
    if procs > 1:
        log.info("data: reading %s with %d worker processes", uri, procs)
    _read_all(src, _Ctx(fmt, spec, tokenizer, arrow is not None), items, procs, head,
              keep_malformed, arrow, check_stop)
    _check(src, spec)
    return src


def _read_all(src: Source, ctx: _Ctx, items: Iterator[Record | Malformed], procs: int,
              head: int | None, keep_malformed: int | None, arrow: Path | None,
              check_stop: Callable[[], None] | None) -> None:
    """Every chunk through the workers, in order, into `src` (and the Arrow file)."""
    import numpy as np

    hashes, raw, trained, read_bad, row_bad, places = [], [], [], [], [], []
    writer = _Writer(arrow) if arrow is not None else None
    try:
        with closing(_parts(ctx, _chunks(items, head), procs)) as parts:
            for k, part in enumerate(parts):
                if check_stop is not None:
                    check_stop()
                _add(src, part, head, keep_malformed, read_bad, row_bad)
                hashes.append(part.hashes)
                places.append(part.ok.astype(np.int64) + k * CHUNK)
                if part.enc is not None:  # None: tokenize-free, or no row of the chunk usable
                    raw.append(part.enc.raw_lengths)
                    trained.append(part.enc.trained())
                    writer.write(part.enc)
    finally:
        if writer is not None:
            writer.close()
    src.malformed = read_bad + row_bad
    all_hashes = np.concatenate(hashes) if hashes else np.zeros(0, dtype=np.uint64)
    src.duplicates = int(len(all_hashes) - len(np.unique(all_hashes)))
    src.items = np.concatenate(places) if places else np.zeros(0, dtype=np.int64)
    if arrow is not None:
        src.arrow = arrow
        src.raw_lengths = np.concatenate(raw) if raw else np.zeros(0, dtype=np.int32)
        src.trained = np.concatenate(trained) if trained else np.zeros(0, dtype=np.int32)


def examples_at(src: Source, spec: DataSpec, tokenizer: Any, workdir: Path,
                wanted: list[int]) -> list[Example]:
    """The examples of `src` at the given positions (sorted), from the kept head or, past it,
    by reading the source again and rendering only those rows."""
    if not wanted or wanted[-1] < len(src.head):
        return [src.head[i] for i in wanted]
    at = {int(src.items[i]) for i in wanted}
    last = max(at)
    out = []
    path = load.fetch(src.uri, workdir)
    for i, item in enumerate(load.iter_records(path, spec.max_samples)):
        if i in at:
            out.append(formats.to_example(item, src.format, spec, tokenizer))
        if i >= last:
            break
    return out


def _format(rows: list[dict[str, Any]], spec: DataSpec, uri: str) -> str:
    if spec.format == "auto":
        return formats.detect(rows, spec, source=uri) if rows else "text"
    formats.check_fields(spec.format, rows, spec, uri)
    return spec.format


def _check(src: Source, spec: DataSpec) -> None:
    """The same refusals, with the same messages, as reading the whole source at once."""
    bad = src.malformed
    if bad and spec.on_malformed == "fail":
        more = f" (and {src.n_malformed - 1} more)" if src.n_malformed > 1 else ""
        raise DataError(f"{bad[0].source}: {bad[0].reason}{more}; fix the data or set "
                        "data.on_malformed: skip")
    if not src.examples:
        first = f", first {bad[0].source}: {bad[0].reason}" if bad else ""
        raise DataError(f"{src.uri}: no usable rows ({src.n_malformed} malformed{first})")


def _add(src: Source, part: _Part, head: int | None, cap: int | None,
         read_bad: list[Malformed], row_bad: list[Malformed]) -> None:
    src.examples += part.n
    src.n_malformed += len(part.read_bad) + len(part.row_bad)
    src.empty_responses += sum(m.reason.startswith("empty")
                               for m in chain(part.read_bad, part.row_bad))
    _keep(read_bad, part.read_bad, cap)
    _keep(row_bad, part.row_bad, cap)
    if part.examples is not None and (head is None or len(src.head) < head):
        src.head.extend(part.examples[:None if head is None else head - len(src.head)])


def _keep(into: list[Malformed], new: list[Malformed], cap: int | None) -> None:
    into.extend(new if cap is None else new[:max(0, cap - len(into))])


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _peek_records(items: Iterator[Record | Malformed], n: int
                  ) -> tuple[tuple[list[Record], list[Malformed]], Iterator[Record | Malformed]]:
    """The first `n` records (and the malformed rows among them) without losing any item."""
    seen: list[Record | Malformed] = []
    recs: list[Record] = []
    for item in items:
        seen.append(item)
        if isinstance(item, Record):
            recs.append(item)
            if len(recs) >= n:
                break
    bad = [m for m in seen if isinstance(m, Malformed)]
    return (recs, bad), chain(seen, items)


def _chunks(items: Iterable[Record | Malformed], head: int | None
            ) -> Iterator[tuple[list[Record | Malformed], bool]]:
    """(chunk, keep its examples) pairs: the examples of the first chunks come back whole."""
    it = iter(items)
    keep_chunks = None if head is None else -(-head // CHUNK)
    k = 0
    while chunk := list(islice(it, CHUNK)):
        yield chunk, keep_chunks is None or k < keep_chunks
        k += 1


def _parts(ctx: _Ctx, jobs: Iterator[tuple[list[Record | Malformed], bool]], procs: int
           ) -> Iterator[_Part]:
    """Each chunk's result, in order (see ordered_map)."""
    global _CTX
    _CTX = ctx
    return ordered_map(_work, jobs, procs)


def ordered_map(fn: Callable[..., Any], jobs: Iterable[tuple[Any, ...]], procs: int
                ) -> Iterator[Any]:
    """fn(*job) for each job, in order: here, or in `procs` forked worker processes with a
    bounded number of jobs in flight (memory stays a few jobs, whatever the number of jobs).
    Close the iterator to stop early. A worker that dies (killed, out of memory) is an error,
    never a hang."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    if procs <= 1:
        for job in jobs:
            yield fn(*job)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork"),
                               initializer=_child_init)
    try:
        pending: deque[Any] = deque()
        for job in jobs:
            pending.append(pool.submit(fn, *job))
            if len(pending) >= 2 * procs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise TransientError("a data worker process died (killed, or out of memory?); set "
                             "data.num_proc lower to use fewer, or rerun") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _child_init() -> None:
    """Workers stop when the pool is terminated; a Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _work(chunk: list[Record | Malformed], keep: bool) -> _Part:
    """Render and (optionally) tokenize one chunk."""
    import numpy as np

    from sft_job.data.tokenize import encode_batch

    ctx = _CTX
    assert ctx is not None
    examples, read_bad, row_bad, ok = [], [], [], []
    render = formats.Renderer(ctx.tokenizer)  # once per chunk, not per row
    for i, item in enumerate(chunk):
        if isinstance(item, Malformed):
            read_bad.append(item)
            continue
        try:
            examples.append(formats.to_example(item, ctx.fmt, ctx.spec, ctx.tokenizer, render))
            ok.append(i)
        except RowError as e:
            row_bad.append(Malformed(item.source, str(e)))
    hashes = np.fromiter((_text_hash(ex) for ex in examples), dtype=np.uint64,
                         count=len(examples))
    enc = encode_batch(examples, ctx.tokenizer, ctx.spec.max_length) \
        if ctx.encode and examples else None
    return _Part(enc, hashes, read_bad, row_bad, examples if keep else None, len(examples),
                 np.asarray(ok, dtype=np.int32))


def _text_hash(ex: Example) -> int:
    """64 bits of the example's text (duplicates are counted by these: a collision among a
    million rows has odds of about 1 in 30 million)."""
    text = "".join(t for t, _ in ex.segments).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class _Writer:
    """Tokenized rows appended to an Arrow IPC stream file (what datasets memory-maps)."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self.pa = pa
        self.schema = pa.schema([("input_ids", pa.list_(pa.int32())),
                                 ("labels", pa.list_(pa.int32()))])
        path.parent.mkdir(parents=True, exist_ok=True)
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def write(self, enc: Any) -> None:
        pa = self.pa
        offsets = pa.array(enc.offsets.astype("int32"))
        batch = pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(enc.ids)),
             pa.ListArray.from_arrays(offsets, pa.array(enc.labels))], schema=self.schema)
        self.writer.write_batch(batch)

    def close(self) -> None:
        self.writer.close()
        self.sink.close()
