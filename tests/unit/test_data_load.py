"""data/load.py: every file kind read into records that know their file:line, and the ways a
data file can be broken (bad JSON line, wrong encoding, BOM, empty, an HTML page)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from sft_job.data.load import fetch, read
from sft_job.errors import DataError

ROWS = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi, politely.", "input": "", "output": "Hello, nice to meet you!"},
]


def rows_of(path: Path, **kw: int) -> list[dict]:
    res = read(path, **kw)
    assert not res.malformed, res.malformed
    return [r.row for r in res.records]


def test_jsonl_rows_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n  \n"
                    + json.dumps(ROWS[2]))  # blank lines and no final newline
    res = read(path)
    assert [r.row for r in res.records] == ROWS
    assert [r.source for r in res.records] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert res.files == [path]


def test_jsonl_malformed_line_reported_as_file_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(ROWS[0]), '{"instruction": "x", "output": ', "[1, 2]",
                               json.dumps(ROWS[1])]) + "\n")
    res = read(path)
    assert [r.row for r in res.records] == ROWS[:2]
    assert [m.source for m in res.malformed] == [f"{path}:2", f"{path}:3"]
    assert "invalid JSON" in res.malformed[0].reason
    assert "expected a JSON object" in res.malformed[1].reason


def test_json_array(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    res = read(path)
    assert [r.row for r in res.records] == ROWS
    assert res.records[2].source == f"{path}:item 2"


def test_json_object_holding_one_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 2, "data": ROWS}, indent=2))
    assert rows_of(path) == ROWS


def test_json_object_with_one_row_per_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"data": [\n' + ",\n".join(json.dumps(r) for r in ROWS) + "\n]}\n")
    assert rows_of(path) == ROWS


def test_json_lines_saved_as_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    res = read(path)
    assert [r.row for r in res.records] == ROWS
    assert res.records[1].source == f"{path}:2"


def test_json_with_two_lists_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}, indent=1))
    with pytest.raises(DataError, match="expected a JSON array"):
        read(path)


def test_invalid_json_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,,}\n]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: invalid JSON")):
        read(path)


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ROWS)
    res = read(path)
    assert [r.row for r in res.records] == ROWS
    assert [r.source for r in res.records] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_csv_row_with_extra_values_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,response\nhi,hello\na,b,c\nbye,goodbye\n")
    res = read(path)
    assert [r.row for r in res.records] == [{"prompt": "hi", "response": "hello"},
                                           {"prompt": "bye", "response": "goodbye"}]
    assert [m.source for m in res.malformed] == [f"{path}:3"]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    res = read(path)
    assert [r.row for r in res.records] == ROWS
    assert res.records[1].source == f"{path}:row 1"


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read(path)


def test_datasets_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    res = read(tmp_path / "ds")
    assert [r.row for r in res.records] == ROWS
    assert res.records[0].source.endswith("ds:row 0")


def test_datasets_dict_folder_uses_train_split(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert rows_of(tmp_path / "dd") == ROWS[:2]


def test_directory_of_shards(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    (shards / "part-00000.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (shards / "part-00001.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (shards / "sub" / "part-00002.jsonl").write_text(json.dumps(ROWS[2]) + "\n")
    (shards / "README.md").write_text("# not data\n")
    (shards / "_SUCCESS").write_text("")
    res = read(shards)
    assert [r.row for r in res.records] == ROWS
    assert [f.name for f in res.files] == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]


def test_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no data files"):
        read(tmp_path)


def test_max_rows_stops_early(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS * 5) + "\n")
    assert len(read(path, max_rows=4).records) == 4


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_utf8_bom_is_ignored(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d.{suffix}"
    if suffix == "jsonl":
        body = "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n"
    elif suffix == "json":
        body = json.dumps(ROWS)
    else:
        body = "instruction,input,output\n" + "".join(
            f'"{r["instruction"]}","{r["input"]}","{r["output"]}"\n' for r in ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert rows_of(path) == ROWS  # in particular the first key is not '\ufeffinstruction'


def test_non_ascii_utf8_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    row = {"prompt": "Wie spät ist es? 東京", "response": "Es ist 5 Uhr — 🙂"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert rows_of(path) == [row]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_non_utf8_bytes_are_a_data_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d.{suffix}"
    good = json.dumps(ROWS[0]).encode()
    if suffix == "jsonl":
        data = good + b"\n" + '{"prompt": "caf\u00e9"}'.encode("latin-1") + b"\n"
        where = f"{path}:2"
    elif suffix == "json":
        data = b"[" + good + b', {"prompt": "caf\xe9"}]'
        where = f"{path}:"
    else:
        data = b"prompt,response\ncaf\xe9,ok\n"
        where = f"{path}:"
    path.write_bytes(data)
    with pytest.raises(DataError) as ei:
        read(path)
    assert where in str(ei.value) and "not UTF-8" in str(ei.value)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d.{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(f"{path}: file is empty")):
        read(path)


@pytest.mark.parametrize("head", [b"<!DOCTYPE html>\n<html><body>Sign in</body></html>",
                                  b"\xef\xbb\xbf\n  <html>\n<head></head></html>",
                                  b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>'])
def test_html_page_saved_as_data(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(head)
    with pytest.raises(DataError, match="HTML"):
        read(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'"):
        read(path)


def test_fetch_local_paths(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("{}\n")
    assert fetch(str(path), tmp_path) == path
    assert fetch(f"file://{path}", tmp_path) == path
    with pytest.raises(DataError, match="no such file"):
        fetch(str(tmp_path / "missing.jsonl"), tmp_path)



# ------------------------------------------------------------------ a JSON array, streamed


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read JSON arrays 7 bytes at a time: every value crosses a chunk boundary."""
    from sft_job.data import load

    monkeypatch.setattr(load._JsonText, "CHUNK", 7)


def test_json_array_streamed_across_chunks(tmp_path: Path, tiny_chunks: None) -> None:
    rows = [*ROWS, {"prompt": "Wie spät? 東京 🙂", "response": "x" * 40, "n": 12345678901234}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    res = read(path)
    assert [r.row for r in res.records] == rows
    assert [r.source for r in res.records] == [f"{path}:item {i}" for i in range(len(rows))]
    path.write_text("[]")
    assert read(path).records == []
    path.write_text('[{"a": 1}, 7, {"b": 2}]')
    res = read(path)
    assert [r.row for r in res.records] == [{"a": 1}, {"b": 2}]
    assert [(m.source, m.reason) for m in res.malformed] == [(f"{path}:item 1",
                                                              "expected an object, got int")]


@pytest.mark.parametrize(("text", "line", "what"), [
    ('[\n  {"a": 1},\n  {"a": 2,,}\n]\n', 3, "Expecting property name"),
    ('[\n  {"a": 1}\n  {"a": 2}\n]\n', 3, "Expecting ',' delimiter"),
    ('[\n  {"a": 1}\n]\n]\n', 4, "Extra data"),
    ('[\n  {"a": 1},\n', 3, "Expecting value"),
])
def test_json_array_errors_name_the_line(text: str, line: int, what: str, tmp_path: Path,
                                         tiny_chunks: None) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{path}:{line}: invalid JSON ({what}")):
        read(path)


def test_json_array_non_utf8_names_the_line(tmp_path: Path, tiny_chunks: None) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"a": "ok"},\n{"a": "caf\xe9"}\n]')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not UTF-8")):
        read(path)
