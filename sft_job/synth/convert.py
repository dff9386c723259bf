"""`data convert`: rewrite a data set from one format the job reads into another.

    sft-job data convert gs://b/alpaca.json s3://b/alpaca-chat.jsonl --to chat

Input is read like training data (`sft_job.data.load`: JSONL, JSON, CSV, Parquet, datasets
folders, bucket prefixes) and its format detected with `sft_job.data.formats.detect` unless
--from is given. Every source row is first checked with the job's own renderer, and so is
every row written. Fields the formats do not use (ids, categories...) are carried over.

| from \\ to        | chat                          | alpaca / prompt-response            |
|-----------------|-------------------------------|-------------------------------------|
| alpaca          | user = instruction + input    | prompt-response: prompt = instr. + input |
| prompt-response | user/assistant                | alpaca: instruction = prompt, input ""   |
| chat            | normalised (ShareGPT -> role/content) | only one user->assistant exchange |

Alpaca's instruction and input are joined with a blank line where the target has one prompt
field (the text the model sees is unchanged; the split cannot be recovered). A chat with a
system message or more than one exchange does not fit alpaca or prompt-response: that row is
an error (exit 2, nothing written) unless `--last-turn` (keep the last user->assistant
exchange; earlier turns and the system message are dropped and counted as lossy) or
`--on-error skip` (drop the row, counted). `text` rows have no prompt/response split and cannot
be converted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_job.errors import DataError, SpecError
from sft_job.synth.parse import Pair
from sft_job.synth.rows import OUT_FORMATS, check_out_uri, check_row, pair_to_row

log = logging.getLogger("sft_job.synth")


class Unconvertible(ValueError):
    """A valid source row that the target format cannot hold."""


@dataclass(frozen=True)
class ConvertOptions:
    to: str
    from_: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    on_error: str = "fail"  # fail | skip
    last_turn: bool = False


def convert(in_uri: str, out_uri: str, opts: ConvertOptions, workdir: Path) -> dict[str, Any]:
    """Convert `in_uri` into `out_uri`; returns the stats."""
    from pydantic import ValidationError

    from sft_job.data import formats, load
    from sft_job.data.formats import RowError
    from sft_job.spec import DataSpec
    from sft_job.synth.rows import write_rows

    if opts.to not in OUT_FORMATS:
        raise SpecError(f"--to {opts.to}: choose one of {', '.join(OUT_FORMATS)}")
    check_out_uri(out_uri, opts.to)
    try:
        spec = DataSpec(train=in_uri, format=opts.from_, prompt_field=opts.prompt_field,
                        response_field=opts.response_field, messages_field=opts.messages_field)
    except ValidationError as e:
        raise SpecError(f"--from {opts.from_}: {e.errors()[0]['msg']}") from None
    result = load.read(load.fetch(in_uri, workdir))
    if not result.records:
        raise DataError(f"{in_uri}: no rows to convert")
    src_fmt = opts.from_
    if src_fmt == "auto":
        src_fmt = formats.detect([r.row for r in result.records[:20]], spec)
    if src_fmt == "text":
        raise DataError(f"{in_uri}: text rows have no prompt/response split, so they cannot be "
                        f"converted to {opts.to}")
    bad = [(m.source, m.reason) for m in result.malformed]
    rows, lossy = [], 0
    for rec in result.records:
        try:
            check_row(rec.row, src_fmt, rec.source, spec)
            row, was_lossy = convert_row(rec.row, src_fmt, opts, spec)
            check_row(row, opts.to, rec.source)
        except (RowError, Unconvertible) as e:
            bad.append((rec.source, str(e)))
            continue
        rows.append(row)
        lossy += was_lossy
    _report_bad(bad, opts, len(result.records) + len(result.malformed))
    if not rows:
        raise DataError(f"{in_uri}: no row could be converted to {opts.to}")
    write_rows(rows, out_uri, opts.to, workdir)
    return {"in": in_uri, "out": out_uri, "from": src_fmt, "to": opts.to, "rows": len(rows),
            "skipped": len(bad), "lossy": lossy}


def _report_bad(bad: list[tuple[str, str]], opts: ConvertOptions, total: int) -> None:
    if not bad:
        return
    examples = "; ".join(f"{src}: {why}" for src, why in bad[:3])
    if opts.on_error == "skip":
        log.warning("skipping %d of %d rows that cannot be converted, e.g. %s", len(bad), total,
                    examples)
        return
    hint = "pass --on-error skip to drop them"
    if any("exchange" in why or "system message" in why for _, why in bad):
        hint += ", or --last-turn to keep each chat's last exchange"
    raise DataError(f"{len(bad)} of {total} rows cannot be converted to {opts.to}, e.g. "
                    f"{examples}; nothing was written ({hint})")


def convert_row(row: dict[str, Any], src: str, opts: ConvertOptions, spec: Any
                ) -> tuple[dict[str, Any], bool]:
    """One source row as a row of `opts.to`, and whether something was dropped on the way."""
    if src == "chat":
        key = spec.messages_field if spec.messages_field in row else "conversations"
        msgs = [_message(m) for m in row[key]]
        consumed = {key}
        if opts.to == "chat":
            return _with_extras({"messages": msgs}, row, consumed), False
        pair, lossy = _exchange(msgs, opts.last_turn)
    else:
        if src == "alpaca":
            pair = Pair(row["instruction"], row["output"], row.get("input") or "")
            consumed = {"instruction", "input", "output"}
        elif src == "prompt-response":
            pair = Pair(row[spec.prompt_field], row[spec.response_field])
            consumed = {spec.prompt_field, spec.response_field}
        else:
            raise SpecError(f"--from {src}: choose auto, {', '.join(OUT_FORMATS)}")
        lossy = False
    return _with_extras(pair_to_row(pair, opts.to), row, consumed), lossy


def _message(m: dict[str, Any]) -> dict[str, str]:
    """A chat message as {role, content} (ShareGPT's from/value and human/gpt mapped)."""
    role = m.get("role", m.get("from"))
    role = {"human": "user", "gpt": "assistant"}.get(role, role)
    out = {k: v for k, v in m.items() if k not in ("role", "from", "content", "value")}
    return {"role": role, "content": m.get("content", m.get("value")), **out}


def _exchange(msgs: list[dict[str, str]], last_turn: bool) -> tuple[Pair, bool]:
    """The one user->assistant exchange of a chat (the last one with `last_turn`)."""
    system = [m for m in msgs if m["role"] == "system"]
    turns = [m for m in msgs if m["role"] != "system"]
    if [m["role"] for m in turns] == ["user", "assistant"] and not system:
        return Pair(turns[0]["content"], turns[1]["content"]), False
    if not last_turn:
        if system and len(turns) == 2:
            raise Unconvertible("a system message, which the target format cannot hold")
        raise Unconvertible(f"{sum(m['role'] == 'assistant' for m in turns)} assistant turns in "
                            f"{len(msgs)} messages; the target holds one exchange")
    if len(turns) < 2 or turns[-2]["role"] != "user":
        raise Unconvertible("the last assistant message does not follow a user message, so the "
                            "last exchange cannot stand alone")
    return Pair(turns[-2]["content"], turns[-1]["content"]), True


def _with_extras(new: dict[str, Any], row: dict[str, Any], consumed: set[str]) -> dict[str, Any]:
    """`new` plus the source row's other fields; a field the target would overwrite is an error."""
    for k, v in row.items():
        if k in consumed:
            continue
        if k in new:
            raise Unconvertible(f"its field '{k}' would be overwritten by the {k} field of the "
                                "target format")
        new[k] = v
    return new

