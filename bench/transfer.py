"""Upload throughput of a checkpoint-like folder: storage.put_dir against a plain put_object loop.

    .venv/bin/python bench/transfer.py                 # 500 MB to moto's S3 server on loopback
    .venv/bin/python bench/transfer.py --size-mb 2000 --endpoint https://minio:9000 --bucket b

Both methods upload the same files to the same server in the same run, alternating, `--repeat`
times each; the table shows the best run of each. `put_dir` is what the job uses: parallel
multipart uploads (s3transfer), ETag verification of every file, then the COMMITTED marker.
The baseline is one `put_object` per file, one after the other, with no verification.
With the default loopback moto server, the server (one Python process) is part of what is
measured and there is no network: say so when quoting the numbers. `--stream-mbps N` puts a
proxy in front of moto that holds every connection to N MB/s, a model of a WAN where one TCP
stream is limited by latency and window size (what parallel multipart uploads are for).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")

MB = 1 << 20


def make_checkpoint(root: Path, size_mb: int, shards: int) -> Path:
    """A folder shaped like a checkpoint: weight/optimizer shards plus small JSON files."""
    root.mkdir(parents=True, exist_ok=True)
    per = size_mb * MB // shards
    block = os.urandom(4 * MB)
    for i in range(shards):
        with open(root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as f:
            left = per
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
            f.write(os.urandom(64))  # no two shards alike
    (root / "config.json").write_text('{"model_type": "llama"}\n')
    (root / "trainer_state.json").write_text('{"global_step": 500}\n')
    (root / "rng_state.pth").write_bytes(os.urandom(15_000))
    return root


def plain_loop(client: object, bucket: str, prefix: str, src: Path) -> None:
    """The baseline: one put_object per file, in sequence."""
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{f.relative_to(src).as_posix()}",
                              Body=fh)


def ours(bucket: str, prefix: str, src: Path) -> None:
    from sft_job import storage

    storage.put_dir(src, f"s3://{bucket}/{prefix}")


def clear(client: object, bucket: str) -> None:
    """Empty the bucket so the server holds one copy at a time."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


@contextlib.contextmanager
def endpoint(args: argparse.Namespace) -> Iterator[str]:
    if args.endpoint:
        yield args.endpoint
        return
    from tests.servers import fault_proxy, s3_server

    with s3_server(buckets=[args.bucket]) as s3:
        os.environ.update(s3.env)
        if not args.stream_mbps:
            yield s3.url
            return
        with fault_proxy(s3.url, stream_mbps=args.stream_mbps) as proxy:
            yield proxy.url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=500)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--endpoint", help="an S3 endpoint to use instead of a loopback moto server")
    p.add_argument("--bucket", default="bench")
    p.add_argument("--stream-mbps", type=float, default=0.0,
                   help="hold each connection to this many MB/s (a modelled WAN stream limit)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp, endpoint(args) as url:
        import boto3

        os.environ["AWS_ENDPOINT_URL_S3"] = url
        src = make_checkpoint(Path(tmp) / "step-0000500", args.size_mb, args.shards)
        total = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        client = boto3.client("s3", endpoint_url=url)
        methods = {"put_object loop (1 stream)": lambda i: plain_loop(client, args.bucket,
                                                                       f"plain/{i}", src),
                   "storage.put_dir (parallel, verified)": lambda i: ours(args.bucket,
                                                                          f"ours/{i}", src)}
        best = dict.fromkeys(methods, float("inf"))
        for i in range(args.repeat):
            for name, run in methods.items():
                clear(client, args.bucket)
                t0 = time.perf_counter()
                run(i)
                best[name] = min(best[name], time.perf_counter() - t0)
        clear(client, args.bucket)

    where = args.endpoint or "moto on loopback" + (
        f", each connection held to {args.stream_mbps:g} MB/s" if args.stream_mbps else "")
    print(f"\nupload of {total / MB:.0f} MiB in {args.shards} shards + 3 small files to {where} "
          f"(best of {args.repeat}, {os.cpu_count()} CPUs)\n")
    print(f"| {'method':<38} | {'seconds':>8} | {'MiB/s':>8} |")
    print(f"|{'-' * 40}|{'-' * 10}|{'-' * 10}|")
    for name, secs in best.items():
        print(f"| {name:<38} | {secs:8.2f} | {total / MB / secs:8.1f} |")
    base, fast = best.values()
    print(f"\nspeed-up of storage.put_dir over the plain loop: {base / fast:.2f}x")


if __name__ == "__main__":
    main()
