"""The Hugging Face Hub as a store, through huggingface_hub.

URIs: `hf://org/name[@rev][/path]` (models), `hf://datasets/org/name[@rev][/path]` (datasets).
Downloads use snapshot_download/hf_hub_download pinned to one commit; uploads create the repo
(private by default) and commit a folder with upload_folder, with the token from HF_TOKEN (or
the token file). A Hub commit is atomic, so no COMMITTED marker is written here. Every file is
verified after a transfer against the Hub's tree listing: git blob SHA-1, or SHA-256 for LFS
files. HF_ENDPOINT points the client at another Hub (tests use a fake one on loopback).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sft_job.errors import AccessError, SftJobError, SpecError, TransientError
from sft_job.storage.base import ObjectInfo, local_files, mapped_errors, targets
from sft_job.storage.checksum import ChecksumError, git_blob_sha1, sha256_hex
from sft_job.storage.retry import call, max_attempts, transfer_verified


class HubStore:
    """Repositories on the Hub. Keys are `[datasets/]org/name[@rev][/path]`."""

    atomic = True  # a Hub commit is atomic: no marker
    scheme = "hf"

    def __init__(self, bucket: str = "") -> None:
        del bucket  # hf:// URIs carry no bucket: the repo id is in the key

    def get_file(self, key: str, dest: Path) -> Path:
        u = _parse(key)
        if not u.path_in_repo:
            raise SpecError(f"hf://{key}: names a repository, not a file in it")
        with _errors(key):
            sha = self._sha(u)
            entry = self._tree(u, sha, file=True)[u.path_in_repo]
            self._download(u, sha, {dest: entry}, dest.parent)
        return dest

    def get_prefix(self, prefix: str, dest: Path) -> Path:
        u = _parse(prefix)
        with _errors(prefix):
            sha = self._sha(u)
            self._download(u, sha, dict(targets(self._tree(u, sha), dest, f"hf://{prefix}")),
                           dest)
        return dest

    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        u = _parse(prefix)
        with _errors(prefix):
            entries = self._tree(u, self._sha(u))
            return {rel: ObjectInfo(e.size, e.lfs.sha256 if e.lfs else e.blob_id)
                    for rel, e in entries.items()}

    def stat(self, key: str) -> ObjectInfo | None:
        u = _parse(key)
        with _errors(key):
            if not u.path_in_repo:
                return None
            found = [e for e in _api().get_paths_info(u.id, [u.path_in_repo], repo_type=u.type,
                                                      revision=u.revision)
                     if hasattr(e, "blob_id")]
            return ObjectInfo(found[0].size, found[0].blob_id) if found else None

    def exists(self, key: str) -> bool:
        u = _parse(key)
        with _errors(key):
            if not u.path_in_repo:
                return bool(_api().repo_exists(u.id, repo_type=u.type))
            return bool(_api().file_exists(u.id, u.path_in_repo, repo_type=u.type,
                                           revision=u.revision))

    def read_bytes(self, key: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="sft-job-hf-") as tmp:
            return self.get_file(key, Path(tmp) / "blob").read_bytes()

    def put_files(self, pairs: list[tuple[Path, str]], uri: str) -> None:
        """Commit the files at once to the repository their keys name."""
        u = _parse(uri.removeprefix("hf://"))
        files = {}
        for src, key in pairs:
            path = _parse(key).path_in_repo
            if not path:
                raise SpecError(f"hf://{key}: name a file path inside the repository")
            files[path] = src
        self._commit(u, files, f"Upload {u.path_in_repo or 'folder'}")

    def write_bytes(self, key: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="sft-job-hf-") as tmp:
            p = Path(tmp) / "blob"
            p.write_bytes(data)
            self.put_files([(p, key)], f"hf://{key}")

    def delete(self, key: str) -> None:
        self.delete_prefix(key)

    def delete_prefix(self, prefix: str) -> None:
        from huggingface_hub import CommitOperationDelete

        u = _parse(prefix)
        if not u.path_in_repo:
            raise ValueError(f"refusing to delete every file of hf://{u.id}")
        with _errors(prefix):
            paths = [f"{u.path_in_repo}/{rel}" for rel in self._tree(u, self._sha(u))]
            if self.exists(prefix):
                paths.append(u.path_in_repo)
            if paths:
                ops = [CommitOperationDelete(path_in_repo=p) for p in paths]
                call(lambda: _api().create_commit(
                    u.id, ops, commit_message=f"Delete {u.path_in_repo}", repo_type=u.type,
                    revision=u.revision), _transient, what=f"hf://{prefix}")

    def probe(self, key: str, write: bool) -> str:
        """Check the token and access now; returns where the token came from."""
        u = _parse(key)
        source = self.credential_source()
        with _errors(key, write=write):
            if write:
                _require_token(key)
                role = _api().whoami().get("auth", {}).get("accessToken", {}).get("role")
                if role == "read":
                    raise AccessError(f"hf://{key}: HF_TOKEN is a read-only token; use one "
                                      "with write access")
            else:
                self._sha(u)
                if u.path_in_repo and not self._tree(u, None) and not self.exists(key):
                    raise AccessError(f"hf://{key}: no such file or folder in the repository")
        return source

    def credential_source(self) -> str:
        """Where the Hub token comes from: 'hf:HF_TOKEN', 'hf:token-file' or 'hf:anonymous'."""
        from huggingface_hub import get_token

        if os.environ.get("HF_TOKEN"):
            return "hf:HF_TOKEN"
        return "hf:token-file" if get_token() else "hf:anonymous"

    def _sha(self, u: Any) -> str:
        """The commit the revision points at, so a listing and its download agree."""
        info = call(lambda: _api().repo_info(u.id, repo_type=u.type, revision=u.revision),
                    _transient, what=f"hf://{u.id}")
        return str(info.sha)

    def _tree(self, u: Any, sha: str | None, file: bool = False) -> dict[str, Any]:
        """Files under u.path_in_repo, by path relative to it (file=True: the file itself)."""
        from huggingface_hub.errors import EntryNotFoundError
        from huggingface_hub.hf_api import RepoFile

        api = _api()
        path = u.path_in_repo
        if file:
            found = [e for e in api.get_paths_info(u.id, [path], repo_type=u.type, revision=sha)
                     if isinstance(e, RepoFile)]
            if not found:
                raise AccessError(f"hf://{u.id}/{path}: no such file in the repository")
            return {path: found[0]}
        try:
            files = call(lambda: [e for e in api.list_repo_tree(
                u.id, path_in_repo=path or None, recursive=True, repo_type=u.type, revision=sha)
                if isinstance(e, RepoFile)], _transient, what=f"hf://{u.id}/{path}")
        except EntryNotFoundError:
            return {}
        cut = len(path) + 1 if path else 0
        return {e.path[cut:]: e for e in files if not path or e.path.startswith(path + "/")}

    def _download(self, u: Any, sha: str, targets: dict[Path, Any], root: Path) -> None:
        """Download each entry to its target path via a temp folder inside `root`."""
        from huggingface_hub import snapshot_download

        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=root))
        attempts = [0]
        try:
            def transfer(batch: list[Path]) -> None:
                attempts[0] += 1  # a retry must not trust the local_dir metadata
                snapshot_download(u.id, repo_type=u.type, revision=sha, local_dir=tmp,
                                  allow_patterns=[targets[t].path for t in batch],
                                  force_download=attempts[0] > 1, endpoint=_endpoint())

            def verify(target: Path) -> None:
                e = targets[target]
                _verify(tmp / e.path, e, f"hf://{u.id}/{e.path}")

            transfer_verified(list(targets), transfer, verify,
                              lambda t: f"hf://{u.id}/{targets[t].path}")
            for target, e in targets.items():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / e.path, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, u: Any, files: dict[str, Path], message: str,
                private: bool = True) -> str:
        """Create the repo if needed (private by default), commit `files` (path in repo ->
        local file) in one commit, verify each against the commit's tree; the commit URL."""
        from huggingface_hub import CommitOperationAdd

        key = f"{u.type}s/{u.id}" if u.type != "model" else u.id
        with _errors(key, write=True):
            _require_token(key)
            call(lambda: _api().create_repo(u.id, repo_type=u.type, private=private,
                                            exist_ok=True), _transient, what=f"hf://{key}")
            commit: list[Any] = []

            def transfer(batch: list[str]) -> None:
                ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=files[p]) for p in batch]
                commit.append(call(lambda: _api().create_commit(
                    u.id, ops, commit_message=message, repo_type=u.type, revision=u.revision),
                    _transient, what=f"hf://{key}"))

            def verify(path: str) -> None:
                found = _api().get_paths_info(u.id, [path], repo_type=u.type,
                                              revision=commit[-1].oid)
                if not found or not hasattr(found[0], "blob_id"):
                    raise ChecksumError(f"hf://{u.id}/{path}: missing after the upload")
                _verify(files[path], found[0], f"hf://{u.id}/{path}")

            transfer_verified(sorted(files), transfer, verify, lambda p: f"hf://{u.id}/{p}")
            return str(commit[-1].commit_url)


def push_folder(local_dir: Path, repo_id: str, private: bool = True,
                commit_message: str = "Upload with sft-job", repo_type: str = "model") -> str:
    """Create `repo_id` on the Hub if needed (private by default) and commit `local_dir` to it
    with the token from HF_TOKEN; every file is verified after the commit. Returns the commit
    URL. An existing repo keeps its visibility."""
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    files = {rel: p for rel, p in local_files(Path(local_dir))}
    return HubStore()._commit(_parse(f"{prefix}{repo_id}"), files, commit_message, private)


def _verify(path: Path, entry: Any, uri: str) -> None:
    if not path.is_file():
        raise ChecksumError(f"{uri}: missing after the transfer")
    if path.stat().st_size != entry.size and not entry.lfs:
        raise ChecksumError(f"{uri}: {entry.size} bytes on the Hub, {path.stat().st_size} locally")
    if entry.lfs:
        local, remote = sha256_hex(path), entry.lfs.sha256
    else:
        local, remote = git_blob_sha1(path), entry.blob_id
    if local != remote:
        raise ChecksumError(f"{uri}: checksum {remote} on the Hub, {local} locally")


def _parse(key: str) -> Any:
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    try:
        return parse_hf_uri(f"hf://{key}")
    except HfUriError as err:
        raise SpecError(f"hf://{key}: not a Hub URI (hf://org/name[/path] or "
                        f"hf://datasets/org/name[/path]): {err}") from None


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint())


def _require_token(key: str) -> None:
    from huggingface_hub import get_token

    if not get_token():
        raise AccessError(f"hf://{key}: pushing to the Hub needs a token; set HF_TOKEN "
                          "(a write token, e.g. from a Kubernetes Secret)")


def _transient(err: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else 0
        return status == 429 or status >= 500
    return _is_connection_error(err)


def _is_connection_error(err: BaseException) -> bool:
    import httpx2

    return isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError)) and \
        not _offline(err)


def _offline(err: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(err, OfflineModeIsEnabled) or isinstance(err.__cause__, OfflineModeIsEnabled)


def _errors(key: str, write: bool = False) -> contextlib.AbstractContextManager[None]:
    """Turn huggingface_hub errors into AccessError (exit 3) or TransientError (exit 75)."""
    return mapped_errors(map_error, f"hf://{key}", write)


def map_error(err: BaseException, uri: str, write: bool = False) -> SftJobError | None:
    """The user-facing error for a huggingface_hub failure, or None (a bug)."""
    from huggingface_hub import errors as he

    need = "write" if write else "read"
    if _offline(err):
        return AccessError(f"{uri}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset "
                           "it to download or push")
    if isinstance(err, he.GatedRepoError):
        return AccessError(f"{uri}: gated repository; accept its terms on the Hub with the "
                           "account whose token is in HF_TOKEN")
    if isinstance(err, he.RepositoryNotFoundError):
        return AccessError(f"{uri}: repository not found, or private and HF_TOKEN gives no "
                           "access to it")
    if isinstance(err, he.RevisionNotFoundError):
        return AccessError(f"{uri}: revision not found in the repository")
    if isinstance(err, he.EntryNotFoundError):
        return AccessError(f"{uri}: no such file in the repository")
    if isinstance(err, he.HfHubHTTPError):
        status = err.response.status_code if err.response is not None else 0
        if status in (401, 403):
            return AccessError(f"{uri}: the Hub denied access ({status}); set HF_TOKEN to a "
                               f"token with {need} access to the repository")
        if status == 429 or status >= 500:
            return TransientError(f"{uri}: the Hub still fails after {max_attempts()} attempts "
                                  f"({status}); rerun the job later")
        return AccessError(f"{uri}: the Hub refused the request ({status})")
    if _is_connection_error(err):
        return TransientError(f"{uri}: cannot reach the Hub ({type(err).__name__}); check "
                              "HF_ENDPOINT or rerun the job later")
    return None
