"""`data convert` between alpaca, chat and prompt-response: round trips, what is lossy, and
clear errors for rows that cannot be converted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sft_job.data import formats, load
from sft_job.errors import DataError, SpecError
from sft_job.spec import DataSpec
from sft_job.synth.convert import ConvertOptions, convert
from tests.conftest import REPO

SAMPLES = REPO / "sft_job" / "sample_data"


def conv(src: Path | str, dst: Path, to: str, **kw: object) -> dict:
    return convert(str(src), str(dst), ConvertOptions(to=to, **kw), dst.parent / "work")  # type: ignore[arg-type]


def rows(path: Path) -> list[dict]:
    return [r.row for r in load.read(path).records]


def fmt_of(path: Path) -> str:
    return formats.detect(rows(path), DataSpec(train=str(path)))


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in data))
    return path


def test_alpaca_round_trips_through_chat_and_prompt_response(tmp_path: Path) -> None:
    src = rows(SAMPLES / "alpaca.jsonl")
    s = conv(SAMPLES / "alpaca.jsonl", tmp_path / "chat.jsonl", "chat")
    assert s == {**s, "from": "alpaca", "rows": len(src), "skipped": 0, "lossy": 0}
    assert fmt_of(tmp_path / "chat.jsonl") == "chat"
    conv(tmp_path / "chat.jsonl", tmp_path / "pr.jsonl", "prompt-response")
    conv(tmp_path / "pr.jsonl", tmp_path / "back.jsonl", "alpaca")
    back = rows(tmp_path / "back.jsonl")
    assert len(back) == len(src)
    for a, b in zip(src, back, strict=True):
        # instruction + input become one prompt (the text is kept; the split is not)
        joined = a["instruction"] + (f"\n\n{a['input']}" if a["input"].strip() else "")
        assert b == {"instruction": joined, "input": "", "output": a["output"]}
    assert sum(bool(a["input"]) for a in src) > 0  # the sample really has inputs


def test_prompt_response_chat_alpaca_are_lossless(tmp_path: Path) -> None:
    src = rows(SAMPLES / "polite.jsonl")
    conv(SAMPLES / "polite.jsonl", tmp_path / "a.json", "alpaca")
    conv(tmp_path / "a.json", tmp_path / "c.parquet", "chat")
    conv(tmp_path / "c.parquet", tmp_path / "back.jsonl", "prompt-response")
    assert rows(tmp_path / "back.jsonl") == src
    assert fmt_of(tmp_path / "a.json") == "alpaca" and fmt_of(tmp_path / "c.parquet") == "chat"


def test_multi_turn_chat_to_alpaca_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    with pytest.raises(DataError, match=r"rows cannot be converted to alpaca.*chat.jsonl:\d+: .*"
                                        r"--last-turn") as err:
        conv(SAMPLES / "chat.jsonl", out, "alpaca")
    assert "nothing was written" in str(err.value)
    assert not out.exists()


def test_last_turn_and_skip(tmp_path: Path) -> None:
    src = rows(SAMPLES / "chat.jsonl")
    single = [r for r in src if [m["role"] for m in r["messages"]] == ["user", "assistant"]]
    s = conv(SAMPLES / "chat.jsonl", tmp_path / "last.jsonl", "alpaca", last_turn=True)
    assert s["rows"] == len(src) and s["lossy"] == len(src) - len(single) > 0
    last = rows(tmp_path / "last.jsonl")
    for r, out in zip(src, last, strict=True):
        assert out["instruction"] == r["messages"][-2]["content"]
        assert out["output"] == r["messages"][-1]["content"]
    s = conv(SAMPLES / "chat.jsonl", tmp_path / "skip.jsonl", "prompt-response", on_error="skip")
    assert s["rows"] == len(single) and s["skipped"] == len(src) - len(single)
    assert [r["prompt"] for r in rows(tmp_path / "skip.jsonl")] == \
        [r["messages"][0]["content"] for r in single]


def test_chat_to_chat_normalises_sharegpt_and_keeps_extras(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "sg.jsonl", [
        {"id": 7, "conversations": [{"from": "system", "value": "Be brief."},
                                    {"from": "human", "value": "Hi there, who are you?"},
                                    {"from": "gpt", "value": "An assistant."}]}])
    conv(src, tmp_path / "c.jsonl", "chat")
    assert rows(tmp_path / "c.jsonl") == [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, who are you?"},
        {"role": "assistant", "content": "An assistant."}], "id": 7}]
    with pytest.raises(DataError, match="a system message"):
        conv(src, tmp_path / "a.jsonl", "alpaca")


def test_custom_field_names(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 2+2?", "answer": "4", "tag": "math"}])
    with pytest.raises(DataError, match="cannot detect the data format"):
        conv(src, tmp_path / "x.jsonl", "chat")
    conv(src, tmp_path / "c.jsonl", "chat", prompt_field="question", response_field="answer")
    assert rows(tmp_path / "c.jsonl") == [{"messages": [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], "tag": "math"}]


def test_bad_rows(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "fine prompt", "response": "fine"}\n{"prompt": "x", "resp\n'
                   '{"prompt": "no response", "response": ""}\n')
    with pytest.raises(DataError, match=r"2 of 3 rows.*bad.jsonl:2: invalid JSON.*bad.jsonl:3: "
                                        r"empty 'response'"):
        conv(src, tmp_path / "o.jsonl", "alpaca")
    s = conv(src, tmp_path / "o.jsonl", "alpaca", on_error="skip")
    assert s["rows"] == 1 and s["skipped"] == 2


def test_unconvertible_inputs_and_outputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="text rows have no prompt/response split"):
        conv(SAMPLES / "text.jsonl", tmp_path / "o.jsonl", "chat")
    with pytest.raises(SpecError, match="CSV cannot hold chat"):
        conv(SAMPLES / "polite.jsonl", tmp_path / "o.csv", "chat")
    with pytest.raises(SpecError, match="must end in one of"):
        conv(SAMPLES / "polite.jsonl", tmp_path / "o.txt", "alpaca")
    src = write_jsonl(tmp_path / "clash.jsonl", [{"prompt": "p text", "response": "r", "output": "x"}])
    with pytest.raises(DataError, match="field 'output' would be overwritten"):
        conv(src, tmp_path / "o.jsonl", "alpaca", from_="prompt-response")


def test_csv_output_reads_back(tmp_path: Path) -> None:
    conv(SAMPLES / "alpaca.jsonl", tmp_path / "a.csv", "alpaca")
    assert rows(tmp_path / "a.csv") == rows(SAMPLES / "alpaca.jsonl")


def test_cli_convert(tmp_path: Path) -> None:
    sft_job = REPO / ".venv" / "bin" / "sft-job"
    cmd = [str(sft_job)] if sft_job.exists() else [sys.executable, "-m", "sft_job"]
    out = tmp_path / "c.jsonl"
    r = subprocess.run([*cmd, "data", "convert", str(SAMPLES / "alpaca.jsonl"), str(out), "--to", "chat"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("convert: 64 rows alpaca -> chat")
    r = subprocess.run([*cmd, "data", "convert", str(SAMPLES / "chat.jsonl"), str(out), "--to",
                        "alpaca"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--last-turn" in r.stderr
