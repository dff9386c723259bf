"""The chat client's small parts: Retry-After forms, key masking, quota errors."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import pytest

from sft_job.errors import AccessError
from sft_job.synth.client import MAX_RETRY_AFTER, ChatClient, ClientSettings, _retry_after
from sft_job.synth.run import synthesize
from tests.synth.conftest import make_cfg
from tests.synth.fake_openai import FakeOpenAI, Reply


@pytest.mark.parametrize(("headers", "want"), [
    ({}, None),
    ({"retry-after": "3"}, 3.0),
    ({"retry-after": "0.5"}, 0.5),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
    ({"retry-after": "99999"}, MAX_RETRY_AFTER),
    ({"retry-after": "soon"}, None),
])
def test_retry_after(headers: dict[str, str], want: float | None) -> None:
    assert _retry_after(headers) == want


def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= _retry_after({"retry-after": when}) <= 31


def test_key_is_masked_and_not_in_repr() -> None:
    s = ClientSettings(base_url="http://x/v1", model="m", api_key="sk-abcdefghijklmnop")
    assert "abcdef" not in repr(s)
    c = ChatClient(s)
    assert c._mask("bad key sk-abcdefghijklmnop and sk-otherkey1234567") == "bad key *** and sk-oth***"


def test_insufficient_quota_is_access_error(tmp_path: Path) -> None:
    quota = Reply(status=429, code="insufficient_quota")
    with FakeOpenAI(default=lambda key: quota) as api:
        with pytest.raises(AccessError, match="insufficient_quota"):
            synthesize(make_cfg(api.url, str(tmp_path / "o.jsonl"), tmp_path))
        keys = [s.key for s in api.seen]
    assert len(keys) == len(set(keys)) <= 4  # each worker's first request, none retried
