"""Data: fetch -> read -> detect format -> render examples -> tokenize -> split -> pack."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_job.data import formats, load
from sft_job.data.formats import Example, RowError
from sft_job.data.load import Malformed, Record
from sft_job.data.tokenize import TokenStats, pack, tokenize_all
from sft_job.errors import DataError
from sft_job.spec import DataSpec

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
    train: list[dict[str, list[int]]]  # tokenized (packed when data.packing) rows
    eval: list[dict[str, list[int]]]
    train_examples: list[Example]
    eval_examples: list[Example]
    stats: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def prepare(uri: str, spec: DataSpec, tokenizer: Any | None, workdir: Path,
            fmt: str | None = None) -> Prepared:
    """Fetch and read `uri`, detect/check its format and render every row to an Example.
    Malformed rows fail (data.on_malformed: fail) or are collected (skip). Without a tokenizer
    (the cheap preflight pass) chat rows are checked and rendered with plain ChatML."""
    path = load.fetch(uri, workdir)
    result = load.read(path, max_rows=spec.max_samples)
    if not result.records and not result.malformed:
        raise DataError(f"{uri}: no rows")
    rows = [r.row for r in result.records[:20]]
    if fmt is None:
        if spec.format == "auto":
            fmt = formats.detect(rows, spec, source=uri) if rows else "text"
        else:
            fmt = spec.format
            formats.check_fields(fmt, rows, spec, uri)
    if tokenizer is None:
        tokenizer = formats.PlainChatML()
    elif fmt == "chat" and not _has_chat_template(tokenizer):
        log.warning("the tokenizer has no chat template: chat rows are rendered with ChatML")
        tokenizer.chat_template = formats.CHATML_TEMPLATE
    examples, malformed = _render(result.records, fmt, spec, tokenizer)
    malformed = result.malformed + malformed
    if malformed and spec.on_malformed == "fail":
        first = malformed[0]
        more = f" (and {len(malformed) - 1} more)" if len(malformed) > 1 else ""
        raise DataError(f"{first.source}: {first.reason}{more}; fix the data or set "
                        "data.on_malformed: skip")
    if not examples:
        first = f", first {malformed[0].source}: {malformed[0].reason}" if malformed else ""
        raise DataError(f"{uri}: no usable rows ({len(malformed)} malformed{first})")
    empty = sum(1 for m in malformed if m.reason.startswith("empty"))
    seen: set[str] = set()
    dups = 0
    for ex in examples:
        key = "".join(t for t, _ in ex.segments)
        dups += key in seen
        seen.add(key)
    template = formats.resolve_template(spec, tokenizer) if fmt in ("alpaca", "prompt-response") \
        else "model" if fmt == "chat" else "native"
    return Prepared(fmt, examples, malformed, result.files, empty, dups, template)


def _has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render chat rows itself."""
    return bool(getattr(tokenizer, "chat_template", None))


def _render(records: list[Record], fmt: str, spec: DataSpec, tokenizer: Any
            ) -> tuple[list[Example], list[Malformed]]:
    examples, bad = [], []
    for rec in records:
        try:
            examples.append(formats.to_example(rec, fmt, spec, tokenizer))
        except RowError as e:
            bad.append(Malformed(rec.source, str(e)))
    return examples, bad


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic train/eval split by fraction (at least one eval row when fraction > 0)."""
    if fraction <= 0:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataError(f"data.eval_fraction={fraction} leaves no training rows "
                        f"({len(examples)} rows in all)")
    eval_idx = set(idx[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in eval_idx],
            [e for i, e in enumerate(examples) if i in eval_idx])


def build(spec: DataSpec, tokenizer: Any, workdir: Path) -> DataBundle:
    """The whole data step for training: prepared, split, tokenized and (optionally) packed."""
    train_p = prepare(spec.train, spec, tokenizer, workdir)
    if spec.eval:
        eval_p = prepare(spec.eval, spec, tokenizer, workdir, fmt=train_p.format)
        train_ex, eval_ex = train_p.examples, eval_p.examples
    else:
        eval_p = None
        train_ex, eval_ex = split(train_p.examples, spec.eval_fraction, spec.seed)
    train_rows, tstats = tokenize_all(train_ex, tokenizer, spec.max_length)
    eval_rows, estats = tokenize_all(eval_ex, tokenizer, spec.max_length)
    if not train_rows:
        raise DataError(f"{spec.train}: every row's prompt fills data.max_length="
                        f"{spec.max_length} tokens, nothing left to train on; raise max_length")
    problem = all_truncated(tstats, train_p.format, spec.max_length)
    if problem:
        raise DataError(f"{spec.train}: {problem}")
    stats = _stats(train_p, eval_p, tstats, estats, spec)
    if spec.packing:
        train_rows = pack(train_rows, spec.max_length)
        eval_rows = pack(eval_rows, spec.max_length)
    stats["train_rows_batched"] = len(train_rows)
    log.info("data: %s format, %d train / %d eval examples, %d truncated, %d malformed skipped",
             train_p.format, tstats.rows, estats.rows, tstats.truncated, stats["malformed"])
    return DataBundle(train_p.format, train_rows, eval_rows, train_ex, eval_ex, stats,
                      train_p.files + (eval_p.files if eval_p else []))


def all_truncated(stats: TokenStats, fmt: str, max_length: int) -> str | None:
    """A message when every row is cut at max_length before its EOS, so the model would never
    learn to stop (plain text is exempt: cutting long documents is expected there)."""
    if fmt == "text" or not stats.rows or stats.truncated < stats.rows:
        return None
    return (f"every row is longer than data.max_length={max_length} tokens (the shortest has "
            f"{min(stats.raw_lengths)}): each would be cut before its EOS and the model would "
            "never learn to stop; raise data.max_length")


def _stats(train_p: Prepared, eval_p: Prepared | None, t: TokenStats, e: TokenStats,
           spec: DataSpec) -> dict[str, Any]:
    return {
        "format": train_p.format,
        "template": train_p.template,
        "train_examples": t.rows - t.dropped_no_target,
        "eval_examples": e.rows - e.dropped_no_target,
        "malformed": len(train_p.malformed) + (len(eval_p.malformed) if eval_p else 0),
        "truncated": t.truncated + e.truncated,
        "dropped_prompt_too_long": t.dropped_no_target + e.dropped_no_target,
        "duplicates": train_p.duplicates,
        "train_tokens": sum(t.lengths),
        "trained_tokens": t.trained_tokens,
        "train_lengths": t.lengths,
        "max_length": spec.max_length,
    }
