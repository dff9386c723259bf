"""The prepared-data cache: content-addressed folders under `data.cache_uri`, committed with a
marker like checkpoints, prepared by one process and loaded by every other rank and rerun.

    <cache_uri>/<data key>-<tokenizer key>/   train.arrow eval.arrow lengths.npy meta.json
                                              COMMITTED (written last: the file list and sizes)

The data key hashes the data files' identities (size and ETag / generation / blob id, or size
and mtime for local files), every data.* field but the cache's own and the files' VERSION; the
tokenizer key hashes its vocabulary, merges, normalizer and post-processor, special tokens and
chat template, and the transformers/tokenizers versions. Who prepares: rank 0 when the cache
is a bucket (other nodes download it once each), each node's first rank when it is a local
path; every other rank waits for the commit (data.cache_wait_minutes). A folder without its
marker, with a file whose size is not the marker's, or of another VERSION is ignored (one log
line) and prepared again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.data.prepared import FILES, VERSION, prepare_dir
from sft_job.errors import DataError, TransientError
from sft_job.spec import DATA_HOW, DataSpec
from sft_job.storage.base import COMMIT_MARKER
from sft_job.topology import here
from sft_job.uri import is_remote, split_uri

log = logging.getLogger("sft_job.data")


@dataclass
class Entry:
    """A usable prepared folder on this machine."""

    dir: Path
    uri: str
    meta: dict[str, Any]
    prepared_here: bool
    waited_s: float = 0.0


def data_key(spec: DataSpec) -> str:
    """Hash of what the rows are made from, besides the tokenizer (no file is downloaded)."""
    fields = {k: v for k, v in spec.model_dump(mode="json").items() if k not in DATA_HOW}
    doc = {"version": VERSION, "spec": fields, "train": identity(spec.train),
           "eval": identity(spec.eval) if spec.eval else None}
    return _hash(doc)


def tokenizer_key(tokenizer: Any) -> str:
    """Hash of everything in the tokenizer that can change the rows."""
    import tokenizers
    import transformers

    from sft_job.data.formats import special_tokens

    backend = getattr(tokenizer, "backend_tokenizer", None)
    doc = {"class": type(tokenizer).__name__,
           "model": backend.to_str() if backend is not None
           else sorted(tokenizer.get_vocab().items()),
           "chat_template": getattr(tokenizer, "chat_template", None),
           "special": special_tokens(tokenizer),
           "bos": getattr(tokenizer, "bos_token", None), "eos": tokenizer.eos_token,
           "eos_id": tokenizer.eos_token_id,
           "split_special": bool(getattr(tokenizer, "split_special_tokens", False)),
           "versions": [transformers.__version__, tokenizers.__version__]}
    return _hash(doc)


def identity(uri: str) -> list[list[Any]]:
    """[name, size, tag] of every object a data URI names: ETag/generation/blob id in buckets
    and on the Hub, mtime for local files."""
    if not is_remote(uri):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise DataError(f"{uri}: no such file or directory")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [[p.relative_to(path).as_posix() if path.is_dir() else p.name,
                 p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    info = storage.list_info(uri)
    if info and set(info) - {"", "."}:
        return [[k, i.size, i.etag] for k, i in sorted(info.items())]
    st = storage.stat(uri)
    if st is None:
        raise DataError(f"{uri}: no object or prefix found (empty or missing)")
    return [["", st.size, st.etag]]


def committed_for_data(spec: DataSpec, cache_uri: str) -> str | None:
    """A committed entry made from this data and these data.* fields with any tokenizer: the
    rows were read and accepted before, so the job's tokenizer-free row scan can be skipped."""
    prefix = data_key(spec) + "-"
    names = {k.split("/", 1)[0] for k in storage.list_keys(cache_uri)
             if k.startswith(prefix) and k.endswith("/" + COMMIT_MARKER)}
    return storage.join(cache_uri, sorted(names)[0]) if names else None


def obtain(spec: DataSpec, tokenizer: Any, workdir: Path, cache_uri: str, local_root: Path,
           procs: int = 1, check_stop: Callable[[], None] | None = None) -> Entry:
    """The prepared folder of this data and tokenizer on this machine: found committed (here,
    or in the bucket and downloaded), prepared by this process, or waited for."""
    key = f"{data_key(spec)}-{tokenizer_key(tokenizer)}"
    uri = storage.join(cache_uri, key)
    remote = is_remote(cache_uri)
    local = local_root / key if remote else Path(split_uri(uri)[2])
    topo = here()
    wait_s = spec.cache_wait_minutes * 60
    stop = check_stop or (lambda: None)
    if topo.local_rank != 0:  # another rank of this node makes the folder (prepared or downloaded)
        return _waited(local, uri, key, wait_s, stop, f"this node's first rank to ready {uri}",
                       lambda: _problem(local, key) is None)
    if remote:
        _clear_others(local_root, key)
        if not topo.is_main:
            return _waited(local, uri, key, wait_s, stop, f"rank 0 to commit {uri}",
                           lambda: _download(uri, local, key))
        if _problem(local, key) is None or _download(uri, local, key):
            if not storage.is_committed(uri):  # a copy on this machine, gone from the bucket
                storage.put_dir(local, uri, commit=True)
            return _found(local, uri)
        _drop_remote(uri)
    else:
        why = _problem(local, key)
        if why is None:
            return _found(local, uri)
        if local.exists():
            log.warning("data: ignoring the prepared data at %s (%s); preparing it again", uri, why)
    return _prepare(spec, tokenizer, workdir, uri, local, remote, procs, stop)


def _prepare(spec: DataSpec, tokenizer: Any, workdir: Path, uri: str, local: Path,
             remote: bool, procs: int, stop: Callable[[], None]) -> Entry:
    log.info("data: preparing %s", uri)
    t0 = time.perf_counter()
    tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        meta = prepare_dir(spec, tokenizer, workdir, tmp, procs, stop)
        meta["key"] = local.name
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        ours = _install(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if ours:
        storage.put_dir(local, str(local), commit=True)  # the marker (a local cache: the commit)
    if remote and not storage.is_committed(uri):  # (another job may have committed it meanwhile)
        storage.put_dir(local, uri, commit=True)
    log.info("data: prepared in %.1fs and committed to %s", time.perf_counter() - t0, uri)
    return Entry(local, uri, _meta(local), prepared_here=True)


def _install(tmp: Path, local: Path) -> bool:
    """Move a finished folder into place (True); a folder already there without a valid
    commit is replaced, one that another process committed meanwhile is kept (False)."""
    if local.exists():
        if _problem(local, local.name) is None:
            return False
        storage.delete_prefix(str(local))
    local.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, local)
    return True


def _found(local: Path, uri: str) -> Entry:
    meta = _meta(local)
    log.info("data: using the prepared data %s (%d train rows, prepared in %ss)", uri,
             meta["stats"]["train_rows_batched"], meta.get("prepare_s"))
    return Entry(local, uri, meta, prepared_here=False)


def _waited(local: Path, uri: str, key: str, wait_s: float, stop: Callable[[], None],
            what: str, ready: Callable[[], bool]) -> Entry:
    t0 = time.monotonic()
    delay = 0.2
    while not ready():
        if time.monotonic() - t0 > wait_s:
            raise TransientError(f"data: waited {wait_s / 60:g} min for {what}, in vain (did "
                                 "the preparing rank stop?); a rerun prepares it again, or "
                                 "raise data.cache_wait_minutes for larger data")
        stop()
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)
    entry = Entry(local, uri, _meta(local), prepared_here=False,
                  waited_s=round(time.monotonic() - t0, 2))
    log.info("data: %s ready after waiting %.1fs", uri, entry.waited_s)
    return entry


def _download(uri: str, local: Path, key: str) -> bool:
    """Fetch a committed entry into `local` (atomically); False when there is none yet or it
    is broken (logged: the preparing rank replaces it)."""
    if _problem(local, key) is None:
        return True
    if not storage.is_committed(uri):
        return False
    tmp = local.with_name(f"{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        storage.get_dir(uri, tmp)
        why = _problem(tmp, key)
        if why is not None:
            log.warning("data: ignoring the prepared data at %s (%s)", uri, why)
            return False
        _install(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _problem(local, key) is None


def _drop_remote(uri: str) -> None:
    """Remove what an unfinished or broken preparation left under `uri` (one log line)."""
    if storage.list_keys(uri):
        log.warning("data: ignoring the prepared data at %s (%s); preparing it again", uri,
                    "broken" if storage.is_committed(uri) else "no commit marker")
        storage.delete_prefix(uri)


def _problem(d: Path, key: str) -> str | None:
    """Why the folder `d` cannot be used (None: it can)."""
    marker = d / COMMIT_MARKER
    if not marker.is_file():
        return "no commit marker" if d.exists() else "absent"
    try:
        listed = json.loads(marker.read_text())["files"]
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable commit marker or meta.json"
    if meta.get("version") != VERSION or meta.get("key") != key:
        return f"written by another version ({meta.get('version')}, this is {VERSION})"
    for rel in FILES:
        f = d / rel
        size = f.stat().st_size if f.is_file() else None
        if size != listed.get(rel):
            return f"{rel} is {size} bytes, its commit marker says {listed.get(rel)}"
    return None


def _clear_others(root: Path, key: str) -> None:
    """Other prepared folders on this machine's scratch are older data: free their disk."""
    if root.is_dir():
        for d in root.iterdir():
            if d.name != key and not d.name.startswith(key + ".tmp-"):
                shutil.rmtree(d, ignore_errors=True)


def _meta(d: Path) -> dict[str, Any]:
    return json.loads((d / "meta.json").read_text())


def _hash(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
