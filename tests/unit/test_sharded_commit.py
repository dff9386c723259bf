"""checkpoint/commit.py and uploader.py: a checkpoint written by two nodes is committed by node 0
only once both parts are in the store, lists every file with size and checksum, and each rank
resumes from its own files; stale parts of an earlier attempt are never taken for this one;
a failed periodic upload is skipped and the run goes on until MAX_FAILURES in a row.

Real uploader processes (one per simulated node, as in a job) on a local store, and on moto's
S3 server behind the fault proxy for the permission failures (403s injected by the proxy)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sft_job import storage
from sft_job.checkpoint import commit
from sft_job.checkpoint.commit import step_name
from sft_job.checkpoint.uploader import MAX_FAILURES, Uploader
from sft_job.errors import EXIT_ACCESS, AccessError

COMMON = ["trainer_state.json", "adapter_model.safetensors", "global_step4/mp_rank_00_model_states.pt",
          "latest"]
RANK = {0: ["rng_state_0.pth", "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt"],
        1: ["rng_state_1.pth", "global_step4/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]}


def _checkpoint(root: Path, step: int) -> Path:
    """A two-rank checkpoint folder as the Trainer and DeepSpeed lay it out."""
    src = root / f"checkpoint-{step}"
    for i, rel in enumerate(COMMON + RANK[0] + RANK[1]):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(f"{rel} {step}".encode() * (i + 1))
    return src


def _stage(src: Path, node: int, root: Path) -> Path:
    from sft_job.checkpoint.sync import link_copy

    dest = root / f"node-{node}" / src.name
    return link_copy(src, dest, commit.part_files(src, {node}, common=node == 0))


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[str, Uploader, Uploader]]:
    uri = str(tmp_path / "bucket" / "checkpoints")
    ups = [Uploader(uri, keep=2, node=n, nodes=2, world_size=2, part_wait_s=4) for n in (0, 1)]
    yield uri, ups[0], ups[1]
    for u in ups:
        u.kill()


def test_owner_rank_and_part_files(tmp_path: Path) -> None:
    assert [commit.owner_rank(r) for r in RANK[1]] == [1, 1]
    assert [commit.owner_rank(r) for r in COMMON] == [None] * len(COMMON)
    assert commit.owner_rank("offloaded_tensors/rank3/x.tensor.swp") == 3
    src = _checkpoint(tmp_path, 4)
    assert commit.part_files(src, {0}, common=True) == sorted(COMMON + RANK[0])
    assert commit.part_files(src, {1}, common=False) == sorted(RANK[1])


def test_commit_waits_for_every_node_and_lists_every_file(nodes, tmp_path: Path) -> None:
    uri, n0, n1 = nodes
    src = _checkpoint(tmp_path / "trainer", 4)
    n0.submit(4, _stage(src, 0, tmp_path / "staging"), token="attempt-1")
    assert not n0.wait(timeout=2)  # node 1's part is not there: nothing committed
    assert storage.latest_committed(uri) is None
    n1.submit(4, _stage(src, 1, tmp_path / "staging"), token="attempt-1")
    assert n1.wait(timeout=60) and n1.status[4] == "uploaded"
    assert n0.wait(timeout=60) and n0.status[4] == "committed"

    step_uri = storage.join(uri, step_name(4))
    manifest = commit.read_manifest(step_uri)
    files = sorted(COMMON + RANK[0] + RANK[1] + ["_parts/node-001.json"])
    assert sorted(manifest["files"]) == sorted(manifest["checksums"]) == files
    assert (manifest["world_size"], manifest["nodes"], manifest["step"]) == (2, 2, 4)
    for rel in COMMON + RANK[1]:
        assert manifest["files"][rel] == (src / rel).stat().st_size
    assert commit.changed_objects(step_uri, manifest) == []
    assert sorted(commit.resume_files(manifest, 1, 2)) == sorted(COMMON + RANK[1])
    assert sorted(commit.resume_files(manifest, 0, 2)) == sorted(COMMON + RANK[0])
    assert len(commit.resume_files(manifest, 0, 4)) == len(files) - 1  # another world: all

    dest = tmp_path / "resume-rank1"
    commit.download(step_uri, commit.resume_files(manifest, 1, 2), dest)
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == sorted(COMMON + RANK[1])
    assert (dest / RANK[1][1]).read_bytes() == (src / RANK[1][1]).read_bytes()

    # an object replaced after the commit: the checkpoint no longer matches its manifest
    Path(step_uri, RANK[1][0]).write_bytes(b"tampered")
    assert commit.changed_objects(step_uri, manifest) == [RANK[1][0]]


def test_an_earlier_attempts_part_is_not_this_ones(nodes, tmp_path: Path) -> None:
    """A preempted attempt left step 4 half done (node 1's marker, a file of a rank 3 that
    this attempt does not have): the new attempt commits only with its own node-1 part, and
    without the leftover file."""
    uri, n0, n1 = nodes
    src = _checkpoint(tmp_path / "trainer", 4)
    (src / "rng_state_3.pth").write_bytes(b"old")
    old = _stage(src, 1, tmp_path / "old")
    (old / "rng_state_3.pth").write_bytes(b"old")
    n1.submit(4, old, token="attempt-1")
    assert n1.wait(timeout=60) and n1.status[4] == "uploaded"
    (src / "rng_state_3.pth").unlink()

    n0.submit(4, _stage(src, 0, tmp_path / "staging"), token="attempt-2")
    assert not n0.wait(timeout=2) and storage.latest_committed(uri) is None
    n1.submit(4, _stage(src, 1, tmp_path / "staging"), token="attempt-2")
    assert n1.wait(timeout=60) and n0.wait(timeout=60) and n0.status[4] == "committed"
    manifest = commit.read_manifest(storage.join(uri, step_name(4)))
    assert "rng_state_3.pth" not in manifest["files"]
    assert not Path(uri, step_name(4), "rng_state_3.pth").exists()


def test_a_part_that_never_comes_fails_that_checkpoint_only(nodes, tmp_path: Path) -> None:
    uri, n0, n1 = nodes
    n0.submit(4, _stage(_checkpoint(tmp_path / "t4", 4), 0, tmp_path / "s"), token="a")
    assert n0.wait(timeout=60) and n0.status[4] == "failed"  # part_wait_s=4 passed
    assert n0.fatal is None and storage.latest_committed(uri) is None
    src = _checkpoint(tmp_path / "t6", 6)
    for n, up in ((0, n0), (1, n1)):
        up.submit(6, _stage(src, n, tmp_path / "s"), token="a")
    assert n1.wait(timeout=60) and n0.wait(timeout=60) and n0.status[6] == "committed"
    assert storage.latest_committed(uri).endswith(step_name(6))
    assert not Path(uri, step_name(4)).exists()  # the unfinished older step is cleaned up


# --------------------------------------------------------------- permission failures


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    from tests.servers import s3_server

    with s3_server(buckets=["ckpt"]) as server:
        yield server


def test_failed_periodic_uploads_are_skipped_until_they_persist(
        s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One 403 on one checkpoint: that one is not committed, later ones are, and the partial
    upload is deleted. MAX_FAILURES checkpoints denied in a row: an AccessError (exit 3)."""
    from tests.servers import fault_proxy, use_env

    uri = "s3://ckpt/run/checkpoints"
    with fault_proxy(s3.url) as proxy:
        use_env(monkeypatch, proxy.env_for(s3))
        up = Uploader(uri, keep=2)
        try:
            def save(step: int) -> str:
                src = _checkpoint(tmp_path / "trainer", step)
                up.submit(step, _stage(src, 0, tmp_path / "staging"), token="t")
                assert up.wait(timeout=120)
                return up.status[step]

            proxy.match = r"^PUT /ckpt/run/checkpoints/step-000002/global_step4/"
            proxy.fail_next(1, "deny")
            assert save(2) == "failed" and up.failure_code() == 0
            assert save(4) == "committed"
            assert not [k for k in storage.list_keys(uri) if k.startswith(step_name(2))]
            proxy.match = r"^PUT /ckpt/run/checkpoints/step-0000(06|08|10)/"
            proxy.fail_next(100, "deny")
            for i, step in enumerate((6, 8, 10), 1):
                assert save(step) == "failed"
                assert up.failure_code() == (EXIT_ACCESS if i == MAX_FAILURES else 0)
            assert isinstance(up.fatal, AccessError)
            assert re.search(r"step-000010: .*access denied", str(up.fatal))
            assert storage.latest_committed(uri).endswith(step_name(4))
            manifest = json.loads(storage.read_text(storage.join(uri, step_name(4), "COMMITTED")))
            assert set(manifest["files"]) == set(COMMON + RANK[0])
            assert all(re.fullmatch(r"[0-9a-f]{32}", e) for e in manifest["checksums"].values())
        finally:
            up.kill()
