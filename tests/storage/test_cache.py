"""fetch_model downloads a bucket/Hub model once per content and reuses it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sft_job import storage
from sft_job.errors import AccessError
from sft_job.storage.cache import fetch_model
from tests.storage.conftest import tree


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SFT_JOB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every get_dir the cache makes."""
    calls: list[str] = []
    real = storage.get_dir

    def spy(uri: str, dest: Path) -> Path:
        calls.append(uri)
        return real(uri, dest)

    monkeypatch.setattr(storage, "get_dir", spy)
    return calls


@pytest.mark.parametrize("kind", ["s3", "gs"])
def test_downloads_once_and_again_when_changed(kind: str, request: pytest.FixtureRequest,
                                               small: Path, cache: Path,
                                               downloads: list[str]) -> None:
    uri = storage.join(request.getfixturevalue(f"{kind}_bucket"), "models", "tiny")
    storage.put_dir(small, uri)

    first = fetch_model(uri)
    assert first.parent == cache
    assert tree(first) == tree(small)  # the commit marker is not part of the model
    assert fetch_model(uri + "/") == first
    assert downloads == [uri]
    assert (cache / f"{first.name}.uri").read_text() == uri + "\n"

    storage.write_text(storage.join(uri, "config.json"), '{"a": 3}')
    second = fetch_model(uri)
    assert second != first and (second / "config.json").read_text() == '{"a": 3}'
    assert len(downloads) == 2
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted([first.name,
                                                                            second.name])


def test_concurrent_fetches_share_one_entry(s3_bucket: str, small: Path, cache: Path) -> None:
    uri = storage.join(s3_bucket, "m")
    storage.put_dir(small, uri)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_model(uri)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and tree(results[0]) == tree(small)
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [results[0].name]  # no temp left


def test_hub_model(hub: Any, small: Path, cache: Path, downloads: list[str]) -> None:
    from sft_job.storage.hub import push_folder

    push_folder(small, "org/tiny")
    path = fetch_model("hf://org/tiny")
    assert tree(path) == tree(small)
    assert fetch_model("hf://org/tiny") == path and len(downloads) == 1


def test_local_and_missing(tmp_path: Path, cache: Path, s3_bucket: str) -> None:
    assert fetch_model(str(tmp_path)) == tmp_path
    with pytest.raises(AccessError, match="no such model folder"):
        fetch_model(str(tmp_path / "nope"))
    with pytest.raises(AccessError, match="no model files"):
        fetch_model(storage.join(s3_bucket, "empty"))
