"""A checkpoint in the bucket, written by every node and committed by node 0.

    checkpoints/step-000500/
      trainer_state.json, adapter/model, optimizer.pt, scheduler.pt, ...   common: node 0
      global_step500/zero_pp_rank_3_mp_rank_00_optim_states.pt, rng_state_3.pth
                                                    rank files: uploaded by the node of rank 3
      _parts/node-001.json    node 1's part: its files with size and checksum, and the attempt
      COMMITTED               last: every file with its size and checksum

Each node's uploader puts the files its own ranks wrote (node 0 also the common ones) under
the step's prefix. Every other node then writes a part marker listing what it uploaded, each
file with the checksum the store reports for it (S3 ETag, GCS generation:CRC32C; a local
store's mtime-size), as verified against the local bytes. Node 0 waits for the marker of
every node from this attempt (a token all ranks share), checks the listing against all the
parts, deletes what an earlier attempt left under the prefix, and writes COMMITTED. A step
without it is never resumed from, and is deleted once a newer one is committed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sft_job import storage
from sft_job.errors import TransientError
from sft_job.storage import COMMIT_MARKER, ObjectInfo
from sft_job.storage.base import safe_dest

log = logging.getLogger(__name__)

PARTS = "_parts"
# Files one rank writes for itself: HF Trainer's RNG state, DeepSpeed's ZeRO partitions
# (optimizer states; ZeRO-3 also parameters) and NVMe-offloaded tensors. All else is common
# and written by global rank 0.
_RANK_FILE = re.compile(r"(?:^|/)(?:rng_state_(\d+)\.pth|(?:bf16_)?zero_pp_rank_(\d+)_[^/]*"
                        r"|offloaded_tensors/rank(\d+)/.*)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def owner_rank(rel: str) -> int | None:
    """The global rank that wrote the checkpoint file `rel`, or None for a common file."""
    m = _RANK_FILE.search(rel)
    return None if m is None else int(next(g for g in m.groups() if g is not None))


def part_files(src: Path, ranks: set[int], common: bool) -> list[str]:
    """The files under `src` that belong to a node: those of its `ranks`, plus the common ones
    when it is node 0."""
    out = []
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        owner = owner_rank(rel)
        if (owner is None and common) or owner in ranks:
            out.append(rel)
    return out


def part_key(node: int) -> str:
    return f"{PARTS}/node-{node:03d}.json"


def upload_part(folder: Path, step_uri: str, node: int, token: str) -> dict[str, ObjectInfo]:
    """Upload one node's part of a checkpoint (verified file by file); nodes other than 0 then
    write their part marker. Returns what the store now holds for each file of the part."""
    marker = storage.join(step_uri, COMMIT_MARKER)
    if node == 0 and storage.exists(marker):  # a re-upload must not look committed meanwhile
        storage.delete_prefix(marker)
    storage.put_dir(folder, step_uri, commit=False)
    listed = storage.list_info(step_uri)
    local = {p.relative_to(folder).as_posix(): p.stat().st_size
             for p in folder.rglob("*") if p.is_file()}
    missing = [rel for rel, size in local.items()
               if rel not in listed or listed[rel].size != size]
    if missing:
        raise TransientError(f"{step_uri}: {', '.join(missing[:3])} not in the store as uploaded; "
                             "the checkpoint is not committed")
    mine = {rel: listed[rel] for rel in local}
    if node:
        body = {"token": token, "node": node,
                "files": {rel: [i.size, i.etag] for rel, i in sorted(mine.items())}}
        storage.write_text(storage.join(step_uri, part_key(node)), json.dumps(body, indent=1))
    return mine


def parts_ready(step_uri: str, nodes: int, token: str) -> dict[int, dict[str, ObjectInfo]] | None:
    """Every other node's part of this attempt, once all their markers are there; else None."""
    if nodes <= 1:
        return {}
    present = set(storage.list_keys(storage.join(step_uri, PARTS)))
    if any(part_key(n).split("/", 1)[1] not in present for n in range(1, nodes)):
        return None
    out = {}
    for n in range(1, nodes):
        body = json.loads(storage.read_text(storage.join(step_uri, part_key(n))))
        if body.get("token") != token:
            return None  # an earlier attempt's marker: this attempt's part is not done yet
        out[n] = {rel: ObjectInfo(int(s), str(e)) for rel, (s, e) in body["files"].items()}
    return out


def commit(step_uri: str, own: dict[str, ObjectInfo], parts: dict[int, dict[str, ObjectInfo]],
           meta: dict[str, Any]) -> None:
    """Check the store holds exactly what every node uploaded, remove leftovers of earlier
    attempts, then write COMMITTED (every file, its size and checksum, and `meta`)."""
    expected = dict(own)
    for files in parts.values():
        expected.update(files)
    listed = storage.list_info(step_uri)
    wrong = [rel for rel, info in expected.items() if listed.get(rel) != info]
    if wrong:
        raise TransientError(f"{step_uri}: {', '.join(sorted(wrong)[:3])} changed or missing "
                             "after the upload; the checkpoint is not committed")
    markers = {part_key(n) for n in parts}
    stale = sorted(set(listed) - set(expected) - markers - {COMMIT_MARKER})
    if stale:
        log.info("%s: removing %d object(s) an earlier attempt left", step_uri, len(stale))
        for rel in stale:
            storage.delete_prefix(storage.join(step_uri, rel))
    files = {**expected, **{m: listed[m] for m in markers}}
    body = {"committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta,
            "files": {rel: i.size for rel, i in sorted(files.items())},
            "checksums": {rel: i.etag for rel, i in sorted(files.items())}}
    storage.write_text(storage.join(step_uri, COMMIT_MARKER), json.dumps(body, indent=1))


def rotate(checkpoints_uri: str, keep: int, newest: int) -> None:
    """Delete committed checkpoints beyond the newest `keep`, and unfinished uploads older than
    the newest committed one (a preempted run's, or a step a node never finished)."""
    committed = storage.committed_dirs(checkpoints_uri)
    for old in committed[keep:]:
        log.info("deleting old checkpoint %s", old)
        storage.delete_prefix(old)  # marker first, so a half-deleted one is never 'committed'
    done = {u.rstrip("/").rsplit("/", 1)[-1] for u in committed}
    names = {k.split("/", 1)[0] for k in storage.list_keys(checkpoints_uri) if "/" in k}
    for name in sorted(names - done):
        m = re.fullmatch(r"step-(\d+)", name)
        if m and int(m.group(1)) < newest:
            log.info("deleting the unfinished upload %s", name)
            storage.delete_prefix(storage.join(checkpoints_uri, name))


# ------------------------------------------------------------------------------- resume


def read_manifest(step_uri: str) -> dict[str, Any]:
    """The COMMITTED manifest of a checkpoint ({} for a marker without one)."""
    text = storage.read_text(storage.join(step_uri, COMMIT_MARKER))
    try:
        body = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def changed_objects(step_uri: str, manifest: dict[str, Any]) -> list[str]:
    """Files whose object in the store is not the one committed (missing, or another size or
    checksum). Manifests from before checksums were recorded are checked by size."""
    files, sums = manifest.get("files") or {}, manifest.get("checksums") or {}
    listed = storage.list_info(step_uri)
    return sorted(rel for rel, size in files.items()
                  if rel not in listed or listed[rel].size != size
                  or (rel in sums and listed[rel].etag != sums[rel]))


def resume_files(manifest: dict[str, Any], rank: int, world_size: int) -> list[str] | None:
    """The files rank `rank` needs: the common ones and its own when the world size is the
    checkpoint's; every file otherwise; None when the manifest lists no files (download all)."""
    files = [rel for rel in manifest.get("files") or {} if not rel.startswith(PARTS + "/")]
    if not files:
        return None
    if manifest.get("world_size") != world_size:
        return files
    return [rel for rel in files if owner_rank(rel) in (None, rank)]


def download(step_uri: str, files: list[str] | None, dest: Path) -> None:
    """Download `files` of a checkpoint (all of it for None) into `dest`, several at a time."""
    if files is None:
        storage.get_dir(step_uri, dest)
        return
    targets = [(rel, safe_dest(dest, rel, step_uri)) for rel in files]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda t: storage.get(storage.join(step_uri, t[0]), t[1]), targets))
