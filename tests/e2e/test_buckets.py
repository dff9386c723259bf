"""A job whose spec, data, base model and outputs all live in buckets, run as a CLI subprocess
against moto's S3 server and a GCS emulator on 127.0.0.1 (and the reverse), then read back with
the plain boto3 / google-cloud-storage clients. The Hub push goes to tests/fake_hub.py, a small
local server standing in for the Hub (create_repo + upload_folder endpoints, no LFS/Xet path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.servers import gcs_server, hub_server, s3_server

SPEC = """
name: bucket-job
model: {{base: {base}}}
data: {{train: {data}, format: prompt-response, eval_fraction: 0.1, max_length: 128}}
method: {{kind: lora, r: 4, alpha: 8}}
train: {{max_steps: 3, batch_size: 4, logging_steps: 1}}
eval: {{num_samples: 1, max_new_tokens: 4}}
backend: cpu
output: {{uri: {out}{hub}}}
"""


@pytest.fixture(scope="module")
def servers():
    with s3_server(["data", "models", "runs"]) as s3, gcs_server(["data", "models", "runs"]) as gcs:
        yield s3, gcs


def _put_tree_s3(s3, local: Path, bucket: str, prefix: str) -> None:
    c = s3.client()
    for f in local.rglob("*"):
        if f.is_file():
            c.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


def _put_tree_gcs(gcs, local: Path, bucket: str, prefix: str) -> None:
    b = gcs.client().bucket(bucket)
    for f in local.rglob("*"):
        if f.is_file():
            b.blob(f"{prefix}/{f.relative_to(local).as_posix()}").upload_from_filename(str(f))


def _get_tree_s3(s3, bucket: str, prefix: str, dest: Path) -> set[str]:
    c = s3.client()
    keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/") for o in page.get("Contents", [])]
    for k in keys:
        target = dest / k[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        c.download_file(bucket, k, str(target))
    return {k[len(prefix) + 1:] for k in keys}


def _get_tree_gcs(gcs, bucket: str, prefix: str, dest: Path) -> set[str]:
    names = []
    for blob in gcs.client().list_blobs(bucket, prefix=prefix + "/"):
        target = dest / blob.name[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
        names.append(blob.name[len(prefix) + 1:])
    return set(names)


EXPECTED = {"_SUCCESS", "job.yaml", "model/COMMITTED", "model/model.safetensors",
            "model/config.json", "adapter/COMMITTED", "adapter/adapter_model.safetensors",
            "metrics/COMMITTED", "metrics/summary.json", "metrics/samples.md"}


@pytest.mark.parametrize("direction", ["s3-to-gcs", "gcs-to-s3"])
def test_everything_in_buckets(direction: str, servers, sft_cache: Path, tmp_path: Path) -> None:
    from sft_job.models.builtin import build_builtin

    s3, gcs = servers
    tiny = build_builtin("builtin:tiny-llama")
    data = REPO / "sft_job/sample_data/polite.jsonl"
    src, dst = ("s3", "gs") if direction == "s3-to-gcs" else ("gs", "s3")
    prefix = f"{direction}"
    if src == "s3":
        _put_tree_s3(s3, tiny, "models", f"{prefix}/tiny")
        s3.client().upload_file(str(data), "data", f"{prefix}/polite.jsonl")
    else:
        _put_tree_gcs(gcs, tiny, "models", f"{prefix}/tiny")
        gcs.client().bucket("data").blob(f"{prefix}/polite.jsonl").upload_from_filename(str(data))
    spec_text = SPEC.format(base=f"{src}://models/{prefix}/tiny", data=f"{src}://data/{prefix}/polite.jsonl",
                            out=f"{dst}://runs/{prefix}", hub="")
    # the spec itself is read from the source bucket
    if src == "s3":
        s3.client().put_object(Bucket="data", Key=f"{prefix}/job.yaml", Body=spec_text.encode())
    else:
        gcs.client().bucket("data").blob(f"{prefix}/job.yaml").upload_from_string(spec_text)
    res = run_cli(["run", f"{src}://data/{prefix}/job.yaml"], sft_cache,
                  SFT_JOB_WORKDIR=str(tmp_path / "work"), **s3.env, **gcs.env)
    assert res.returncode == 0, res.stderr[-4000:]

    got = tmp_path / "got"
    keys = _get_tree_gcs(gcs, "runs", prefix, got) if dst == "gs" else _get_tree_s3(s3, "runs", prefix, got)
    assert keys >= EXPECTED
    assert not any(k.startswith(".sft-job-probe") for k in keys), "the access probe was left behind"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(got / "model")
    tok = AutoTokenizer.from_pretrained(got / "model")
    ids = tok("<|user|>\nHi\n<|assistant|>\n", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
    summary = json.loads((got / "metrics/summary.json").read_text())
    assert summary["model_uri"] == f"{dst}://runs/{prefix}/model"
    assert summary["merge_max_logit_diff"] < 1e-4


def test_missing_bucket_is_exit_3_before_training(servers, sft_cache: Path, tmp_path: Path) -> None:
    s3, _gcs = servers
    spec = tmp_path / "job.yaml"
    spec.write_text(SPEC.format(base="builtin:tiny-llama", data=REPO / "sft_job/sample_data/polite.jsonl",
                                out="s3://no-such-bucket/run", hub=""))
    res = run_cli(["run", str(spec)], sft_cache, **s3.env)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "no-such-bucket" in res.stderr and "Traceback" not in res.stderr
    assert "step 1/" not in res.stderr


def test_push_to_hub_with_model_card(sft_cache: Path, tmp_path: Path) -> None:
    """output.push_to_hub: the merged model and its card reach the (fake) Hub, private."""
    with hub_server() as hub:
        spec = tmp_path / "job.yaml"
        spec.write_text(SPEC.format(base="builtin:tiny-llama",
                                    data=REPO / "sft_job/sample_data/polite.jsonl",
                                    out=tmp_path / "out", hub=", push_to_hub: acme/tiny-polite"))
        res = run_cli(["run", str(spec)], sft_cache, **hub.env)
        assert res.returncode == 0, res.stderr[-4000:]
        repo = hub.repos.get(("model", "acme/tiny-polite"))
        assert repo is not None, "the Hub repo was not created"
        files = repo.files(None) or {}
        assert {"model.safetensors", "config.json", "README.md", "tokenizer.json"} <= set(files)
        assert repo.private is True
        card = files["README.md"].decode()
        assert "## Samples" in card and "eval loss" in card
        assert "hf_fake_write_token" not in res.stderr + res.stdout
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
