"""Rows in the formats the job reads (alpaca, chat, prompt-response): build, check, write.

Every row written by `data synth` and `data convert` is first rendered with the job's own
`sft_job.data.formats.to_example`, so a file these commands write is one `sft-job run` accepts.
Files are written by suffix: .jsonl (one object a line), .json (an array), .parquet, .csv
(not for chat: a CSV cell cannot hold a messages list).
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from sft_job.errors import DataError, SpecError
from sft_job.synth.parse import Pair

OUT_FORMATS = ("alpaca", "chat", "prompt-response")
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def joined_prompt(prompt: str, input_: str) -> str:
    """Alpaca's instruction and input as one prompt (formats without an input field)."""
    return f"{prompt}\n\n{input_}" if input_.strip() else prompt


def pair_to_row(p: Pair, fmt: str) -> dict[str, Any]:
    """One Pair as a row of `fmt`."""
    if fmt == "alpaca":
        return {"instruction": p.prompt, "input": p.input, "output": p.response}
    if fmt == "prompt-response":
        return {"prompt": joined_prompt(p.prompt, p.input), "response": p.response}
    if fmt == "chat":
        return {"messages": [{"role": "user", "content": joined_prompt(p.prompt, p.input)},
                             {"role": "assistant", "content": p.response}]}
    raise SpecError(f"unknown output format '{fmt}' (choose {', '.join(OUT_FORMATS)})")


def check_row(row: dict[str, Any], fmt: str, source: str, spec: Any = None) -> None:
    """Raise formats.RowError when the job would refuse `row` as `fmt` (field names from
    `spec`, a DataSpec; the defaults when None)."""
    from sft_job.data.formats import PlainChatML, to_example
    from sft_job.data.load import Record
    from sft_job.spec import DataSpec

    to_example(Record(row, source), fmt, spec or DataSpec(train=source), PlainChatML())


def check_out_uri(uri: str, fmt: str) -> str:
    """The output file type of `uri` (its suffix); SpecError when it cannot hold `fmt`."""
    suffix = Path(uri.split("://", 1)[-1]).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise SpecError(f"{uri}: the output must end in one of {', '.join(FILE_SUFFIXES)}")
    if suffix == ".csv" and fmt == "chat":
        raise SpecError(f"{uri}: CSV cannot hold chat messages; use .jsonl, .json or .parquet")
    return suffix


def write_rows(rows: list[dict[str, Any]], uri: str, fmt: str, workdir: Path) -> None:
    """Write `rows` to `uri` (path or bucket URI) in one go; readers never see half a file."""
    from sft_job import storage

    suffix = check_out_uri(uri, fmt)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / f"out{suffix}"
        _WRITERS[suffix](rows, path)
        storage.put_file(path, uri)


def _write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_json(rows: list[dict[str, Any]], path: Path) -> None:
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text(f"[\n{body}\n]\n" if rows else "[]\n", encoding="utf-8")


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"rows do not fit one Parquet schema ({e}); write .jsonl instead") from None
    pq.write_table(table, path)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (list, dict)):
                raise DataError(f"field '{k}' holds a {type(v).__name__}, which CSV cannot hold; "
                                "write .jsonl instead")
            fields.setdefault(k)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)


_WRITERS = {".jsonl": _write_jsonl, ".json": _write_json, ".parquet": _write_parquet,
            ".csv": _write_csv}
