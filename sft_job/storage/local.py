"""Local filesystem backend: plain paths and file:// URIs (keys are absolute paths)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sft_job.errors import AccessError, SftJobError, SpecError, TransientError
from sft_job.storage.base import ObjectInfo, mapped_errors

F = TypeVar("F", bound=Callable[..., Any])
_TEMP = re.compile(r"\..+\.tmp-\d+")  # a file being written (LocalStore._write), not an object
_TRANSIENT = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.ESTALE}
_BAD_NAME = {errno.ENAMETOOLONG, errno.EINVAL, errno.ELOOP}


def os_error(err: OSError, path: str) -> SftJobError:
    """The user-facing error for a filesystem failure on `path`: a full or failing disk is
    transient (75), a name the filesystem refuses is a bad spec (2), the rest (read-only, not
    permitted, a parent that is a file, a system folder) is access (3)."""
    why = err.strerror or type(err).__name__
    where = err.filename if isinstance(err.filename, str) else path
    if err.errno in _TRANSIENT:
        return TransientError(f"{path}: {why} ({where}); free space or rerun the job later")
    if err.errno in _BAD_NAME:
        return SpecError(f"{path}: {why} ({where}); use a shorter or plainer path")
    return AccessError(f"{path}: cannot write or read here: {why} ({where})")


def _fs_errors(fn: F) -> F:
    """Turn OSError (and a NUL in a path) inside a LocalStore method into os_error's answer."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = next((a for a in args if isinstance(a, str)), "")
        try:
            return fn(self, *args, **kwargs)
        except OSError as e:
            raise os_error(e, key) from None
        except ValueError as e:  # "embedded null byte"
            raise SpecError(f"{key!r}: not a usable path ({e})") from None

    return wrapper  # type: ignore[return-value]


class LocalStore:
    """Keys are absolute paths. Writes go to a temp name then rename, so readers never
    see a half-written file."""

    atomic = False
    scheme = "file"

    @_fs_errors
    def get_file(self, key: str, dest: Path) -> Path:
        src = Path(key)
        if not src.is_file():
            raise AccessError(f"{key}: no such file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        return dest

    @_fs_errors
    def get_prefix(self, prefix: str, dest: Path) -> Path:
        src = Path(prefix)
        if not src.is_dir():
            raise AccessError(f"{prefix}: no such directory")
        if src.resolve() != dest.resolve():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest

    @_fs_errors
    def put_files(self, pairs: list[tuple[Path, str]], desc: str) -> None:
        for src, key in pairs:
            if src.resolve() != Path(key).resolve():  # a folder uploaded onto itself
                self._write(key, lambda tmp, src=src: shutil.copyfile(src, tmp))

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda tmp: tmp.write_bytes(data))

    @_fs_errors
    def _write(self, key: str, fill: Callable[[Path], Any]) -> None:
        dest = Path(key)
        if dest.is_dir():
            raise AccessError(f"{key}: is a directory, cannot write a file there")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")  # matches _TEMP
        fill(tmp)
        os.replace(tmp, dest)

    @_fs_errors
    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        """Files under `prefix`. Another process may be writing into the same folder (the nodes
        of a job on a shared volume): a write in progress (its temp name) is no object yet, and
        a file renamed or removed while listing is left out."""
        root = Path(prefix)
        if not root.is_dir():
            return {}
        out = {}
        for p in root.rglob("*"):
            info = None if _TEMP.fullmatch(p.name) else self.stat(str(p))
            if info is not None:
                out[p.relative_to(root).as_posix()] = info
        return out

    @_fs_errors
    def stat(self, key: str) -> ObjectInfo | None:
        try:
            return _info(Path(key)) if Path(key).is_file() else None
        except FileNotFoundError:  # removed since is_file()
            return None

    @_fs_errors
    def exists(self, key: str) -> bool:
        return Path(key).is_file()

    @_fs_errors
    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            Path(key).unlink()

    @_fs_errors
    def delete_prefix(self, prefix: str) -> None:
        root = Path(prefix)
        if root.is_file():
            root.unlink()
        else:
            shutil.rmtree(root, ignore_errors=True)

    @_fs_errors
    def read_bytes(self, key: str) -> bytes:
        p = Path(key)
        if not p.is_file():
            raise AccessError(f"{key}: no such file")
        return p.read_bytes()

    @_fs_errors
    def probe(self, key: str, write: bool) -> str:
        p = Path(key)
        if not write:
            if not p.exists():
                raise AccessError(f"{key}: no such file or directory")
            return "local"
        # make (and remove) a temporary folder in the nearest existing ancestor: what a run
        # would do first, without leaving anything behind
        parent = next(q for q in (p, *p.parents) if q.exists())
        if not parent.is_dir():
            raise AccessError(f"{key}: {parent} is a file, not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".sft-job-probe-", dir=parent))
        return "local"

    def credential_source(self) -> str:
        return "local"

    def _errors(self, key: str) -> contextlib.AbstractContextManager[None]:
        """OSError -> os_error's answer (for storage.conditional)."""
        return mapped_errors(lambda e, uri: os_error(e, uri) if isinstance(e, OSError) else None,
                             key)


def _info(p: Path) -> ObjectInfo:
    st = p.stat()
    return ObjectInfo(st.st_size, f"{st.st_mtime_ns}-{st.st_size}")
