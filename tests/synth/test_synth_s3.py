"""Bucket output on moto's S3 server: the journal is uploaded when a run fails, a rerun on a
fresh machine (empty work dir) continues from it, and convert reads/writes s3:// too."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sft_job import storage
from sft_job.errors import TransientError
from sft_job.synth.convert import ConvertOptions, convert
from sft_job.synth.run import synthesize
from tests.conftest import REPO
from tests.servers import S3Server, s3_server, use_env
from tests.synth.conftest import EXPECTED_PROMPTS, SCRIPT, group, make_cfg, prompts_of
from tests.synth.fake_openai import FakeOpenAI


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"synth-{uuid.uuid4().hex[:8]}"
    s3.client().create_bucket(Bucket=name)
    use_env(monkeypatch, {**s3.env, "AWS_MAX_ATTEMPTS": "2"})
    return f"s3://{name}"


def test_s3_output_resumes_on_a_fresh_machine(bucket: str, tmp_path: Path) -> None:
    out = f"{bucket}/data/interview.jsonl"
    with FakeOpenAI(SCRIPT, fail_after=6) as api:
        with pytest.raises(TransientError):
            synthesize(make_cfg(api.url, out, tmp_path / "pod1", client_max_retries=1))
        assert not storage.exists(out)
        uploaded = storage.read_text(out + ".synth-journal").splitlines()
        first = [(e["topic"], e["i"]) for e in map(json.loads, uploaded[1:])]
        assert len(first) >= 6  # saved on the way out, not only at checkpoints
        api.fail_after = None
        seen = len(api.seen)
        stats = synthesize(make_cfg(api.url, out, tmp_path / "pod2"))  # nothing local
        second = [s.key for s in api.seen[seen:] if s.status == 200]
    assert not set(first) & set(second)
    assert stats["requests"] == 14 and stats["kept"] == len(EXPECTED_PROMPTS)
    rows = [json.loads(x) for x in storage.read_text(out).splitlines()]
    assert sorted(group(p) for p in prompts_of(rows)) == sorted(group(p) for p in EXPECTED_PROMPTS)
    # a data prefix holding output and journal reads as the output only
    from sft_job.data import load

    assert len(load.read(load.fetch(f"{bucket}/data", tmp_path / "read")).records) == len(rows)


def test_convert_between_buckets(bucket: str, tmp_path: Path) -> None:
    storage.put_file(REPO / "sft_job" / "sample_data" / "polite.jsonl", f"{bucket}/in/polite.jsonl")
    s = convert(f"{bucket}/in/polite.jsonl", f"{bucket}/out/chat.parquet",
                ConvertOptions(to="chat"), tmp_path)
    assert s["rows"] == 60 and s["from"] == "prompt-response"
    dl = storage.get(f"{bucket}/out/chat.parquet", tmp_path / "chat.parquet")
    from sft_job.data import load

    recs = load.read(dl).records
    assert len(recs) == 60 and recs[0].row["messages"][1]["role"] == "assistant"
