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
    from sft_job.uri import is_remote

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


def source_files(path: Path) -> list[Path]:
    """What `iter_records(path)` reads: the save_to_disk folder itself, or its data files."""
    return [path] if is_hf_dataset_dir(path) else data_files(path)


def iter_records(path: Path, max_rows: int | None = None) -> Iterator[Record | Malformed]:
    """Every record under `path`, and each malformed row in its place, read as a stream (no
    file is held in memory whole), stopping after `max_rows` records."""
    n = 0
    if is_hf_dataset_dir(path):
        for i, row in enumerate(_read_hf_dir(path)):
            yield Record(row, f"{path}:row {i}")
            n += 1
            if max_rows and n >= max_rows:
                return
        return
    for f in data_files(path):
        for item in _read_file(f):
            yield item
            if isinstance(item, Record):
                n += 1
                if max_rows and n >= max_rows:
                    return


def read(path: Path, max_rows: int | None = None) -> ReadResult:
    """Read every record under `path` into lists, collecting malformed rows instead of failing
    (small data: tests, `data convert`; the job streams with `iter_records`)."""
    out = ReadResult(files=source_files(path))
    for item in iter_records(path, max_rows):
        (out.malformed if isinstance(item, Malformed) else out.records).append(item)
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
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        yield from _json_array(path)  # the common case, streamed: never the whole file at once
        return
    text = _decode(path.read_bytes(), path)
    try:
        doc = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text[:65536]:
            yield from _read_jsonl(path)  # JSON Lines saved as .json
            return
        raise _json_error(path, e.lineno, e.msg, e.colno) from None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) == 1:
            doc = lists[0]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(doc).__name__}")
    for i, row in enumerate(doc):
        yield _item(path, i, row)


def _item(path: Path, i: int, row: Any) -> Record | Malformed:
    if isinstance(row, dict):
        return Record(row, f"{path}:item {i}")
    return Malformed(f"{path}:item {i}", f"expected an object, got {type(row).__name__}")


def _json_error(path: Path, line: int, msg: str, col: int) -> DataError:
    return DataError(f"{path}:{line}: invalid JSON ({msg} at column {col}); "
                     "a JSON file must hold one array of objects (or use .jsonl)")


def _json_array(path: Path) -> Iterator[Record | Malformed]:
    """The items of a file holding one JSON array, decoded one at a time from a sliding buffer."""
    with _JsonText(path) as src:
        src.expect("[")
        if src.peek() == "]":
            src.pos += 1
        else:
            i = 0
            while True:
                yield _item(path, i, src.value())
                i += 1
                c = src.peek()
                src.pos += 1
                if c == "]":
                    break
                if c != ",":
                    raise src.error("Expecting ',' delimiter", src.pos - 1)
        if src.peek():
            raise src.error("Extra data", src.pos)


class _JsonText:
    """UTF-8 text of a file read in chunks, with a position; what is behind it is dropped."""

    CHUNK = 1 << 22

    def __init__(self, path: Path) -> None:
        import codecs

        self.path = path
        self.f = path.open("rb")
        self.dec = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.line0, self.eof = "", 0, 1, False
        self.json = json.JSONDecoder()

    def __enter__(self) -> _JsonText:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def more(self) -> bool:
        """Append the next chunk; False at the end of the file."""
        if self.eof:
            return False
        raw = self.f.read(self.CHUNK)
        self.eof = not raw
        self.line0 += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos:], 0
        try:
            self.buf += self.dec.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:
            line = self.line0 + self.buf.count("\n") + raw.count(b"\n", 0, max(e.start, 0))
            raise DataError(f"{self.path}:{line}: not UTF-8 (byte {raw[e.start:e.start + 1]!r}); "
                            "re-encode the file as UTF-8") from None
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ('' at the end)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, c: str) -> None:
        if self.peek() != c:
            raise self.error("Expecting value", self.pos)
        self.pos += 1

    def value(self) -> Any:
        """The next JSON value; reads more while it runs past the buffer (up to the size limit
        of one line in a .jsonl file)."""
        self.peek()
        while True:
            try:
                obj, end = self.json.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise DataError(f"{self.path}: invalid JSON (nested too deeply)") from None
            except json.JSONDecodeError as e:
                if len(self.buf) - self.pos > MAX_LINE_BYTES + self.CHUNK or not self.more():
                    raise self.error(e.msg, e.pos) from None
                continue
            if end == len(self.buf) and self.more():  # a number may go on in the next chunk
                continue
            self.pos = end
            return obj

    def error(self, msg: str, at: int) -> DataError:
        line = self.line0 + self.buf.count("\n", 0, at)
        return _json_error(self.path, line, msg, at - self.buf.rfind("\n", 0, at))


def _text_lines(path: Path) -> Iterator[str]:
    """Decoded lines of a text file, read one at a time (line breaks as str.splitlines)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield from _decode(raw, path, str(lineno)).splitlines(keepends=True)


def _read_csv(path: Path) -> Iterator[Record | Malformed]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(_text_lines(path))
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

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield Record(row, f"{path}:row {i}")
                i += 1
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from None


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

