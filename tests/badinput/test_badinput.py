"""Bad input, everywhere: each case of cases.CASES runs the real CLI as a subprocess and must end
with the documented exit code, exactly one `error:` line naming the file/line/field, no Python
traceback, and its output location (a previous run's unfinished output, locally and in a
bucket) byte for byte as it was.

The cases run a few at a time (they are independent processes), so the whole corpus takes about
as long as its slowest cases. `pytest tests/badinput -k html` runs only the matching ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.badinput.cases import BASE, GOOD, Case, Ctx
from tests.badinput.hostile import ALL_CASES as CASES
from tests.conftest import cli_env
from tests.servers import GCSServer, S3Server, gcs_server, hub_server, s3_server

WORKERS = max(2, os.cpu_count() or 2)
TIMEOUT = 600


@dataclass
class Result:
    d: Path
    code: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    wall: float


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server(["data", "runs", "models"]) as server:
        yield server


@pytest.fixture(scope="module")
def hub() -> Iterator[Any]:
    with hub_server() as server:
        yield server


@pytest.fixture(scope="module")
def gcs() -> Iterator[GCSServer]:
    with gcs_server(["gdata"]) as server:
        yield server


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            s3: S3Server, gcs: GCSServer, hub: Any, tiny: Path, sft_cache: Path
            ) -> dict[str, Result | BaseException]:
    """Run every selected case, WORKERS at a time, the slow (heavy) ones first."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if isinstance(getattr(item, "callspec", None) and
                            item.callspec.params.get("case"), Case)}
    cases = sorted((c for c in CASES if c.id in wanted), key=lambda c: not c.heavy)
    root = tmp_path_factory.mktemp("badinput")

    def one(case: Case) -> Result | BaseException:
        try:
            return run_case(case, root, s3, tiny, sft_cache,
                            {**gcs.env, **(hub.env if case.hub else {})})
        except BaseException as e:  # reported by that case's test, not by all of them
            return e

    t0 = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        out = dict(zip([c.id for c in cases], pool.map(one, cases), strict=True))
    walls = sorted(((r.wall, k) for k, r in out.items() if isinstance(r, Result)), reverse=True)
    slowest = ", ".join(f"{k} {w:.0f}s" for w, k in walls[:6])
    request.config.badinput_summary = (  # printed at the end by conftest.py
        f"badinput: {len(cases)} cases in {time.monotonic() - t0:.0f}s, {WORKERS} at a time; "
        f"slowest: {slowest}")
    return out


# ------------------------------------------------------------------ running a case


def fill(value: Any, d: Path, case_id: str) -> Any:
    """Replace {d} and {id} in every string of `value`."""
    if isinstance(value, str):
        return value.replace("{d}", str(d)).replace("{id}", case_id)
    if isinstance(value, dict):
        return {k: fill(v, d, case_id) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fill(v, d, case_id) for v in value)
    return value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`; None deletes a key."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def previous_run(out: Path, s3: Any, case_id: str) -> None:
    """What an interrupted earlier run left: a sentinel, its job.yaml, a committed checkpoint,
    metrics, and no _SUCCESS; locally under `out` and in s3://runs/<case id>/."""
    files = {"sentinel.txt": b"do not touch", "job.yaml": b"name: previous-run\n",
             "checkpoints/step-0000002/adapter_model.safetensors": b"\x00" * 64,
             "checkpoints/step-0000002/COMMITTED": b"{}",
             "metrics/metrics.jsonl": b'{"step": 2, "loss": 1.5}\n'}
    for rel, body in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(body)
        s3.put_object(Bucket="runs", Key=f"{case_id}/{rel}", Body=body)


def snapshot(d: Path, s3: Any, case_id: str) -> dict[str, str]:
    """Every file under the case folder and under s3://runs/<case id>/, with a content hash."""
    out = {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(d.rglob("*")) if p.is_file()}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="runs", Prefix=f"{case_id}/"):
        for o in page.get("Contents", []):
            out[f"s3://runs/{o['Key']}"] = o["ETag"]
    return out


def write_spec(case: Case, d: Path) -> None:
    path = d / "job.yaml"  # case.spec_path may name another (missing) file
    if isinstance(case.spec, bytes):
        path.write_bytes(case.spec)
    elif isinstance(case.spec, str):
        path.write_text(fill(case.spec, d, case.id))
    else:
        path.write_text(yaml.safe_dump(fill(merge(BASE, case.spec or {}), d, case.id),
                                       sort_keys=False))


def run_case(case: Case, root: Path, s3: S3Server, tiny: Path, cache: Path,
             more_env: dict[str, str]) -> Result:
    d = root / case.id
    d.mkdir()
    client = s3.client()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    previous_run(d / "out", client, case.id)
    if case.files:
        case.files(Ctx(d, case.id, client, tiny))
    write_spec(case, d)
    env = cli_env(cache, **s3.env, **more_env, SFT_JOB_WORKDIR=str(root / f"{case.id}.work"))
    for k, v in case.env:
        if v is None:
            env.pop(k, None)
        else:
            env[k] = fill(v, d, case.id)
    before = snapshot(d, client, case.id)
    args = [case.cmd, fill(case.spec_path, d, case.id), *fill(case.args, d, case.id)]
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "sft_job", *args], cwd=d, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT)
    wall = time.monotonic() - t0
    return Result(d, res.returncode, res.stdout, res.stderr, before, snapshot(d, client, case.id),
                  wall)


# ------------------------------------------------------------------ the table


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, results: dict[str, Result | BaseException]) -> None:
    r = results[case.id]
    if isinstance(r, BaseException):
        raise r
    shown = f"exit {r.code} in {r.wall:.1f}s\n--- stderr\n{r.stderr}\n--- stdout\n{r.stdout}"
    assert "Traceback" not in r.stderr + r.stdout, shown
    assert r.code == case.code, shown
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    needles = [fill(n, r.d, case.id) for n in case.needles]
    if case.code == 0:
        assert not errors, shown
        for n in needles:
            assert n in r.stdout, f"{n!r} not in stdout\n{shown}"
    else:
        assert len(errors) == 1, shown
        line = errors[0]
        if case.cmd == "validate":
            assert r.stderr.strip() == line, f"validate printed more than the error\n{shown}"
        else:
            assert r.stderr.strip().splitlines()[-1] == line, shown
            assert "plan:" not in r.stderr and "'loss'" not in r.stderr, "it trained\n" + shown
        for n in needles:
            assert n in line, f"{n!r} not in the error line\n{shown}"
    assert r.after == r.before, f"the case folder or s3://runs/{case.id}/ changed\n{shown}"
    if case.before_model:  # run's cheap checks failed it: no model resolved, no tokenizer
        assert " INFO job " not in r.stderr, "the model was resolved before the check\n" + shown
