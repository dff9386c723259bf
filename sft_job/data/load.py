"""Read training data files into records: JSONL, JSON arrays, CSV, Parquet, `save_to_disk` folders.

Every record carries where it came from ("file:line" or "file:row N") so malformed rows can
be reported precisely. Bucket URIs are fetched first (a prefix means every data file under it).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_job.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_LINE_BYTES = 16 * 1024 * 1024  # a single JSON line bigger than this is refused, not parsed


@dataclass
class Record:
    """One row of input data and where it was read from."""

    row: dict[str, Any]
    source: str


@dataclass
class Malformed:
    """A row that could not be used, with the reason."""

    source: str
    reason: str


@dataclass
class ReadResult:
    records: list[Record] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def fetch(uri: str, workdir: Path) -> Path:
    """Make `uri` available locally: a local path is used in place, a bucket object or prefix
    is downloaded under `workdir/data/`."""
    from sft_job.storage.base import is_remote

    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise DataError(f"{uri}: no such file or directory")
        return path
    from sft_job import storage

    dest = workdir / "data" / uri.replace("://", "/").strip("/")
    if uri.startswith("hf://"):
        return storage.get_dir(uri, dest)
    keys = storage.list_keys(uri)
    if keys and not (len(keys) == 1 and keys[0] in ("", ".")):
        files = [k for k in keys if k.endswith(DATA_SUFFIXES) or k.endswith(".arrow")
                 or k.endswith("dataset_info.json") or k.endswith("state.json")]
        if not files:
            raise DataError(f"{uri}: prefix holds no data files ({', '.join(DATA_SUFFIXES)})")
        return storage.get_dir(uri, dest)
    if storage.exists(uri):
        return storage.get(uri, dest)
    raise DataError(f"{uri}: no object or prefix found (empty or missing)")


def data_files(path: Path) -> list[Path]:
    """The data files that `path` names: itself, or the data files inside a folder."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES
                   and p.name not in ("dataset_info.json", "state.json", "dataset_dict.json"))
    if not files:
        raise DataError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) inside")
    return files


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def read(path: Path, max_rows: int | None = None) -> ReadResult:
    """Read every record under `path`, collecting malformed rows instead of failing."""
    out = ReadResult()
    if is_hf_dataset_dir(path):
        out.files = [path]
        for i, row in enumerate(_read_hf_dir(path)):
            out.records.append(Record(row, f"{path}:row {i}"))
            if max_rows and len(out.records) >= max_rows:
                break
        return out
    for f in data_files(path):
        out.files.append(f)
        for item in _read_file(f):
            if isinstance(item, Malformed):
                out.malformed.append(item)
            else:
                out.records.append(item)
            if max_rows and len(out.records) >= max_rows:
                return out
    return out


def _read_file(path: Path) -> Iterator[Record | Malformed]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    head = path.open("rb").read(512)
    _check_not_html(path, head)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path, head)
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported data file type '{suffix}' "
                        f"(use {', '.join(DATA_SUFFIXES)} or a datasets save_to_disk folder)")


def _check_not_html(path: Path, head: bytes) -> None:
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith((b"<!doctype html", b"<html", b"<?xml")):
        raise DataError(f"{path}: looks like an HTML/XML page, not data "
                        "(a login or error page saved instead of the file?)")


def _decode(raw: bytes, path: Path, where: str | None = None) -> str:
    """UTF-8 text (a BOM is dropped); DataError naming the line (`where`, or counted in `raw`)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        where = where or str(raw.count(b"\n", 0, e.start) + 1)
        raise DataError(f"{path}:{where}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        "re-encode the file as UTF-8") from None


def _lines(path: Path) -> Iterator[tuple[int, bytes | int]]:
    """(line number, bytes) per line; a line over MAX_LINE_BYTES comes as its size instead and
    is never held in memory whole."""
    with path.open("rb") as f:
        lineno = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
                yield lineno, raw
                continue
            size = len(raw)
            while (chunk := f.readline(1 << 20)) and not chunk.endswith(b"\n"):
                size += len(chunk)
            yield lineno, size + len(chunk)


def _read_jsonl(path: Path) -> Iterator[Record | Malformed]:
    for lineno, raw in _lines(path):
        where = f"{path}:{lineno}"
        if isinstance(raw, int):
            yield Malformed(where, f"line is {raw // 1_000_000} MB, over the "
                            f"{MAX_LINE_BYTES // 1_000_000} MB limit")
            continue
        line = _decode(raw, path, str(lineno)).strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield Malformed(where, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            yield Malformed(where, "invalid JSON (nested too deeply)")
            continue
        if not isinstance(row, dict):
            yield Malformed(where, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield Record(row, where)


def _read_json(path: Path, head: bytes) -> Iterator[Record | Malformed]:
    text = _decode(path.read_bytes(), path)
    try:
        doc = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text[:65536]:
            yield from _read_jsonl(path)  # JSON Lines saved as .json
            return
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                        "a JSON file must hold one array of objects (or use .jsonl)") from None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) == 1:
            doc = lists[0]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(doc).__name__}")
    for i, row in enumerate(doc):
        if isinstance(row, dict):
            yield Record(row, f"{path}:item {i}")
        else:
            yield Malformed(f"{path}:item {i}", f"expected an object, got {type(row).__name__}")


def _read_csv(path: Path) -> Iterator[Record | Malformed]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    raw = path.read_bytes()
    text = _decode(raw, path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: CSV has no header row")
        for row in reader:
            lineno = reader.line_num
            if None in row:
                yield Malformed(f"{path}:{lineno}", "more values than header columns")
                continue
            yield Record({k: v for k, v in row.items() if k is not None}, f"{path}:{lineno}")
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV ({e})") from None


def _read_parquet(path: Path) -> Iterator[Record | Malformed]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield Record(row, f"{path}:row {i}")


def _read_hf_dir(path: Path) -> Iterator[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError/... for bad folders
        raise DataError(f"{path}: not a readable datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: DatasetDict has no 'train' split (has {list(ds)})")
        ds = ds["train"]
    yield from ds

