"""hf:// against the fake Hub (tests/fake_hub.py): real huggingface_hub client calls over HTTP.
The fake does not cover the LFS/Xet large-file path: every file travels as a regular file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sft_job import storage
from sft_job.errors import AccessError, TransientError
from sft_job.storage import ChecksumError
from sft_job.storage.hub import push_folder
from tests.servers import fault_proxy, use_env
from tests.storage.conftest import tree


def test_push_folder_private_and_verified(hub: Any, small: Path) -> None:
    url = push_folder(small, "org/model", commit_message="Add model")
    repo = hub.repos[("model", "org/model")]
    assert repo.private
    assert url.startswith(f"{hub.url}/org/model/commit/")
    assert {p: hub.file("org/model", p) for p in repo.files(None)} == tree(small)

    (small / "config.json").write_text('{"a": 2}')  # a second push updates the repo
    push_folder(small, "org/model")
    assert hub.file("org/model", "config.json") == b'{"a": 2}'
    push_folder(small, "org/public", private=False)
    assert not hub.repos[("model", "org/public")].private


def test_download_model_folder_and_file(hub: Any, small: Path, tmp_path: Path) -> None:
    push_folder(small, "org/model")
    assert storage.list_keys("hf://org/model") == ["config.json", "sub/state.bin"]
    assert storage.list_keys("hf://org/model/sub") == ["state.bin"]
    assert storage.exists("hf://org/model") and storage.exists("hf://org/model/config.json")
    assert not storage.exists("hf://org/model/nope.json")
    assert not storage.exists("hf://org/absent")
    assert storage.stat("hf://org/model/config.json").size == 8

    assert tree(storage.get_dir("hf://org/model", tmp_path / "all")) == tree(small)
    assert tree(storage.get_dir("hf://org/model/sub", tmp_path / "sub")) == tree(small / "sub")
    one = storage.get("hf://org/model/sub/state.bin", tmp_path / "one.bin")
    assert one.read_bytes() == (small / "sub" / "state.bin").read_bytes()
    assert not list(tmp_path.glob("**/.hf-*"))  # temp folders cleaned


def test_dataset_uris(hub: Any, small: Path, tmp_path: Path) -> None:
    storage.put_dir(small, "hf://datasets/org/data/train")
    storage.write_text("hf://datasets/org/data/README.md", "---\nlicense: mit\n---\n# data\n")
    assert ("dataset", "org/data") in hub.repos
    assert storage.list_keys("hf://datasets/org/data") == [
        "README.md", "train/config.json", "train/sub/state.bin"]
    assert storage.read_text("hf://datasets/org/data/README.md").endswith("# data\n")
    assert tree(storage.get_dir("hf://datasets/org/data/train", tmp_path / "d")) == tree(small)
    storage.delete_prefix("hf://datasets/org/data/train")
    assert storage.list_keys("hf://datasets/org/data") == ["README.md"]


def test_rot_on_the_hub_is_caught(hub: Any, small: Path, tmp_path: Path) -> None:
    push_folder(small, "org/model")
    hub.corrupt("org/model", "sub/state.bin")
    with pytest.raises(ChecksumError, match=r"sub/state\.bin") as err:
        storage.get_dir("hf://org/model", tmp_path / "out")
    assert err.value.exit_code == 75


def test_access_errors(hub: Any, small: Path, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    push_folder(small, "org/model")
    with pytest.raises(AccessError, match="repository not found"):
        storage.get_dir("hf://org/absent", tmp_path / "x")
    with pytest.raises(AccessError, match="no such file"):
        storage.get("hf://org/model/nope.json", tmp_path / "y")

    use_env(monkeypatch, {"HF_TOKEN": "hf_wrong"})
    with pytest.raises(AccessError, match="denied access \\(401\\)"):
        push_folder(small, "org/other")
    with pytest.raises(AccessError, match="repository not found, or private"):
        storage.list_keys("hf://org/model")  # private, and this token is no good

    from huggingface_hub import constants

    use_env(monkeypatch, {"HF_TOKEN": None})
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(AccessError, match="needs a token; set HF_TOKEN"):
        push_folder(small, "org/other")
    with pytest.raises(AccessError, match="needs a token"):
        storage.probe("hf://org/other", write=True)


def test_probe_and_read_only_token(hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert storage.probe("hf://org/new-model", write=True) == "hf:HF_TOKEN"
    hub.role = "read"
    with pytest.raises(AccessError, match="read-only"):
        storage.probe("hf://org/new-model", write=True)


def test_offline_mode_is_named(hub: Any, monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    use_env(monkeypatch, {"HF_HUB_OFFLINE": "1"})
    with pytest.raises(AccessError, match="HF_HUB_OFFLINE is set"):
        storage.get_dir("hf://org/model", tmp_path / "x")


def test_hub_outage_retried_then_transient(hub: Any, small: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    push_folder(small, "org/model")
    with fault_proxy(hub.url, match=r"^GET /api/") as proxy:
        use_env(monkeypatch, {"HF_ENDPOINT": proxy.url, "SFT_JOB_STORAGE_MAX_ATTEMPTS": "3"})
        proxy.fail_next(2, "error")
        assert tree(storage.get_dir("hf://org/model", tmp_path / "ok")) == tree(small)
        assert proxy.stats["error"] == 2
        proxy.error_rate = 1.0
        with pytest.raises(TransientError, match="still fails after 3 attempts"):
            storage.list_keys("hf://org/model")
