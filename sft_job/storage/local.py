"""Local filesystem backend: plain paths and file:// URIs (keys are absolute paths)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sft_job.errors import AccessError
from sft_job.storage.base import COMMIT_MARKER, ObjectInfo, local_files, manifest


class LocalStore:
    """Keys are absolute paths. Writes go to a temp name then rename, so readers never
    see a half-written file."""

    def get_file(self, key: str, dest: Path) -> Path:
        src = Path(key)
        if not src.is_file():
            raise AccessError(f"{key}: no such file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
        return dest

    def get_prefix(self, prefix: str, dest: Path) -> Path:
        src = Path(prefix)
        if not src.is_dir():
            raise AccessError(f"{prefix}: no such directory")
        if src.resolve() != dest.resolve():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest

    def put_file(self, src: Path, key: str) -> None:
        dest = Path(key)
        if dest.is_dir():
            raise AccessError(f"{key}: is a directory, cannot write a file there")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def put_dir(self, src: Path, prefix: str, commit: bool = True) -> None:
        root = Path(prefix)
        if root.exists() and not root.is_dir():
            raise AccessError(f"{prefix}: exists and is a file, not a directory")
        files = local_files(src)
        if commit:  # a re-upload must not look committed while it is in flux
            (root / COMMIT_MARKER).unlink(missing_ok=True)
        if src.resolve() != root.resolve():
            for rel, f in files:
                self.put_file(f, str(root / rel))
        if commit:
            self.write_bytes(str(root / COMMIT_MARKER), manifest(files))

    def list(self, prefix: str) -> list[str]:
        root = Path(prefix)
        if not root.is_dir():
            return []
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def exists(self, key: str) -> bool:
        return Path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        root = Path(prefix)
        if root.is_file():
            root.unlink()
            return
        (root / COMMIT_MARKER).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)

    def read_bytes(self, key: str) -> bytes:
        p = Path(key)
        if not p.is_file():
            raise AccessError(f"{key}: no such file")
        return p.read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        dest = Path(key)
        if dest.is_dir():
            raise AccessError(f"{key}: is a directory, cannot write a file there")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def stat(self, key: str) -> ObjectInfo | None:
        p = Path(key)
        if not p.is_file():
            return None
        st = p.stat()
        return ObjectInfo(st.st_size, f"{st.st_mtime_ns}-{st.st_size}")

    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        root = Path(prefix)
        out = {}
        for rel in self.list(prefix):
            info = self.stat(str(root / rel))
            if info is not None:
                out[rel] = info
        return out

    def probe(self, key: str, write: bool) -> str:
        p = Path(key)
        if write:
            parent = next((q for q in (p, *p.parents) if q.exists()), None)
            if parent is None or not os.access(parent, os.W_OK):
                raise AccessError(f"{key}: not writable by uid {os.getuid()}")
        elif not p.exists():
            raise AccessError(f"{key}: no such file or directory")
        return "local"

    def credential_source(self) -> str:
        return "local"
