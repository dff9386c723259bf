"""Real storage endpoints on 127.0.0.1 for tests: moto's S3 server, a GCS emulator, a fake
Hub, and a fault-injecting HTTP proxy. Each is a context manager that starts the server at a
free port, yields a handle with `.url` and `.env` (the variables a client or an `sft-job`
subprocess needs), and stops it (by PID or thread) on exit.

    with s3_server(buckets=["data"]) as s3, gcs_server(buckets=["out"]) as gcs:
        env = {**os.environ, **s3.env, **gcs.env}
        subprocess.run(["sft-job", "run", "s3://data/job.yaml"], env=env, check=True)
        s3.client().list_objects_v2(Bucket="data")

    with fault_proxy(s3.url, error_rate=0.2, drop_rate=0.1) as proxy:  # in front of moto
        env = {**s3.env, **proxy.env_for(s3)}                        # clients talk to the proxy

`use_env(monkeypatch, handle.env)` applies an env dict to the current process (it also turns
huggingface_hub's offline switch off when the env says so: the library reads it at import).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BIN = Path(sys.executable).parent
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
        "upgrade", "expect", "content-length"}


class _QuietServer(ThreadingHTTPServer):
    """A threaded HTTP server that does not print a traceback when a client hangs up."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server for {url} did not start in {timeout:.0f}s")


@contextlib.contextmanager
def _process(args: list[str], probe_path: str, cwd: str | None = None,
             env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a server process on a free port ({port} in args), wait for it, stop it by PID."""
    for attempt in range(3):
        port = free_port()
        proc = subprocess.Popen([a.replace("{port}", str(port)) for a in args], cwd=cwd,
                                env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_http(url + probe_path, proc)
            break
        except RuntimeError:
            proc.kill()
            proc.wait()
            if attempt == 2:
                raise
    try:
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- S3


@dataclass
class S3Server:
    url: str
    env: dict[str, str]
    pid: int

    def client(self, endpoint_url: str | None = None) -> Any:
        """A plain boto3 S3 client for this server (to set up and check tests)."""
        import boto3

        return boto3.client("s3", endpoint_url=endpoint_url or self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")

    def reset(self) -> None:
        """Drop every bucket and object (moto's reset API)."""
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()


@contextlib.contextmanager
def s3_server(buckets: Iterable[str] = ()) -> Iterator[S3Server]:
    """moto's S3 server (`python -m moto.server`) as a separate process."""
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"]
    with _process(args, "/moto-api/") as (url, proc):
        env = {"AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
        server = S3Server(url, env, proc.pid)
        for b in buckets:
            server.client().create_bucket(Bucket=b)
        yield server


# --------------------------------------------------------------------------- GCS


@dataclass
class GCSServer:
    url: str
    env: dict[str, str]
    pid: int
    root: Path  # where the emulator keeps object bytes: <root>/<bucket>/<name>

    def client(self) -> Any:
        """A plain google-cloud-storage client for this emulator."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def object_path(self, bucket: str, name: str) -> Path:
        """The file holding an object's bytes (corrupt it to simulate server-side rot)."""
        return self.root / bucket / name


@contextlib.contextmanager
def gcs_server(buckets: Iterable[str] = ()) -> Iterator[GCSServer]:
    """gcp-storage-emulator as a separate process, keeping objects on disk in a temp folder."""
    tmp = tempfile.mkdtemp(prefix="gcs-emulator-")
    args = [str(BIN / "gcp-storage-emulator"), "start", "-H", "127.0.0.1", "--port", "{port}",
            "-q"]
    try:
        with _process(args, "/storage/v1/b", cwd=tmp, env={"STORAGE_BASE": tmp}) as (url, proc):
            env = {"STORAGE_EMULATOR_HOST": url, "GOOGLE_CLOUD_PROJECT": "test"}
            server = GCSServer(url, env, proc.pid, Path(tmp) / ".cloudstorage")
            for b in buckets:
                server.client().create_bucket(b)
            yield server
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- Hub


@contextlib.contextmanager
def hub_server(token: str = "hf_fake_write_token", role: str = "write") -> Iterator[Any]:
    """The fake Hub (tests/fake_hub.py) on a thread; `.env` sets HF_ENDPOINT, HF_TOKEN and
    HF_HUB_OFFLINE=0 (CI sets it to 1 for everything else)."""
    from tests.fake_hub import FakeHub

    hub = FakeHub(token=token, role=role).start()
    hub.env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    try:
        yield hub
    finally:
        hub.stop()


def use_env(monkeypatch: Any, env: dict[str, str | None]) -> None:
    """Apply `env` to this process for one test (None unsets a variable)."""
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    if "HF_HUB_OFFLINE" in env:
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", env["HF_HUB_OFFLINE"] in ("1", "true"))


# ------------------------------------------------------------------- fault proxy


@dataclass
class FaultProxy:
    """An HTTP proxy in front of `upstream` that fails a share of the requests it forwards.

    Faults, decided per request (seeded RNG, so runs repeat): `error_rate` answers 503 SlowDown
    without forwarding, `drop_rate` closes the connection without an answer, `corrupt_rate`
    flips one byte of a successful GET's response body or of a PUT's request body.
    `stream_mbps` caps each connection's upload rate (a model of a per-stream WAN limit).
    `sse_kms` makes an S3 server look like a bucket with default SSE-KMS encryption, which moto
    does not emulate: every ETag it reports (headers and listings) is replaced by a value that
    is not the object's MD5, and object answers say `x-amz-server-side-encryption: aws:kms`;
    requests that name an ETag (If-Match, the parts of CompleteMultipartUpload) get the
    server's own back.
    `fail_next(n, kind)` forces the next n matching requests to fail. Only requests whose
    "METHOD path" matches `match` (a regex) are touched. Attributes may be changed while it
    runs; `stats` counts what happened.
    """

    upstream: str
    error_rate: float = 0.0
    drop_rate: float = 0.0
    corrupt_rate: float = 0.0
    stream_mbps: float = 0.0  # > 0: cap each connection's request body at this many MB/s
    sse_kms: bool = False
    match: str = ".*"
    seed: int = 0
    url: str = ""
    stats: dict[str, int] = field(default_factory=lambda: {
        "requests": 0, "error": 0, "drop": 0, "lose": 0, "corrupt": 0, "deny": 0})
    _forced: list[str] = field(default_factory=list)
    _etags: dict[str, str] = field(default_factory=dict)  # reported (sse_kms) -> the server's
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rng: random.Random = field(default_factory=random.Random)

    def fail_next(self, n: int, kind: str = "error") -> None:
        """Make the next `n` matching requests fail with `kind`: error (503) | drop (hang up
        before forwarding) | lose (forward, then hang up: the answer is lost) | corrupt |
        deny (403 AccessDenied)."""
        with self._lock:
            self._forced.extend([kind] * n)

    def env_for(self, server: Any) -> dict[str, str]:
        """`server.env` with its endpoint replaced by this proxy's URL."""
        return {k: (self.url if v == server.url else v) for k, v in server.env.items()}

    def kms_etag(self, match: re.Match[str]) -> str:
        """The ETag S3 would report under SSE-KMS for the server's `match` (not an MD5)."""
        real = match.group(1)
        fake = hashlib.md5(b"kms:" + real.encode(), usedforsecurity=False).hexdigest()
        fake += real[32:]  # a multipart ETag keeps its "-<parts>"
        with self._lock:
            self._etags[fake] = real
        return fake

    def server_etag(self, value: str) -> str:
        with self._lock:
            return _ETAG.sub(lambda m: self._etags.get(m.group(1), m.group(1)), value)

    def decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.stats["requests"] += 1
            if not re.search(self.match, f"{method} {path}"):
                return None
            if self._forced:
                kind: str | None = self._forced.pop(0)
            else:
                r = self._rng.random()
                kind = ("error" if r < self.error_rate else
                        "drop" if r < self.error_rate + self.drop_rate else
                        "corrupt" if r < self.error_rate + self.drop_rate + self.corrupt_rate
                        else None)
            if kind == "corrupt" and method not in ("GET", "PUT"):
                kind = None
            if kind:
                self.stats[kind] += 1
            return kind


@contextlib.contextmanager
def fault_proxy(upstream: str, **faults: Any) -> Iterator[FaultProxy]:
    """Start a FaultProxy (see its docstring) on a free port in a thread; stop it after."""
    proxy = FaultProxy(upstream, **faults)
    proxy._rng.seed(proxy.seed)
    handler = type("Handler", (_ProxyHandler,), {"proxy": proxy})
    server = _QuietServer(("127.0.0.1", 0), handler)
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        if not self.proxy.stream_mbps:
            return self.rfile.read(n) if n else b""
        out, t0 = bytearray(), time.monotonic()
        while len(out) < n:  # hold each connection to stream_mbps, like one TCP stream on a WAN
            out += self.rfile.read(min(256 << 10, n - len(out)))
            ahead = len(out) / (self.proxy.stream_mbps * 1e6) - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        return bytes(out)

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.proxy.decide(self.command, self.path)
        headers = list(self.headers.items())
        if self.proxy.sse_kms:
            headers = [(k, self.proxy.server_etag(v) if k.lower() in _IF_ETAG else v)
                       for k, v in headers]
            if b"<ETag>" in body:  # CompleteMultipartUpload names its parts by their ETags
                body = self.proxy.server_etag(body.decode()).encode()
        if fault == "corrupt" and self.command == "PUT" and body:
            body = _flip(body)
        if fault == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in ("error", "deny"):
            status, code = (503, "SlowDown") if fault == "error" else (403, "AccessDenied")
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>injected by FaultProxy</Message></Error>").encode()
            self._reply(status, [("Content-Type", "application/xml")], payload, len(payload))
            return
        status, out, data, length = _forward(self.proxy.upstream, self.command, self.path,
                                             headers, body)
        if self.proxy.sse_kms:
            out, data = _as_kms(self.proxy, out, data)
        if fault == "lose":  # the server did the work, the client never hears of it
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault == "corrupt" and self.command == "GET" and data and 200 <= status < 300:
            data = _flip(data)
        self._reply(status, out, data, length)

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes,
               length: int) -> None:
        self.send_response_only(status)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() not in ("server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle


_ETAG = re.compile(r"([0-9a-f]{32}(?:-\d+)?)")
_IF_ETAG = ("if-match", "if-none-match", "x-amz-copy-source-if-match")


def _as_kms(proxy: FaultProxy, headers: list[tuple[str, str]],
            data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """An answer as S3 gives it for an SSE-KMS object: other ETags, same lengths."""
    out = [(k, _ETAG.sub(proxy.kms_etag, v) if k.lower() == "etag" else v) for k, v in headers]
    if any(k.lower() == "etag" for k, _ in headers):
        out.append(("x-amz-server-side-encryption", "aws:kms"))
    if b"<ETag>" in data:  # a listing, or CompleteMultipartUpload's answer
        data = re.sub(rb"<ETag>(&#34;|&quot;|\")?([0-9a-f]{32}(?:-\d+)?)",
                      lambda m: b"<ETag>" + (m.group(1) or b"") + proxy.kms_etag(
                          _ETAG.search(m.group(2).decode())).encode(), data)
    return out, data


def _flip(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    return bytes(bad)


def _forward(upstream: str, method: str, path: str, headers: Iterable[tuple[str, str]],
             body: bytes) -> tuple[int, list[tuple[str, str]], bytes, int]:
    u = urlsplit(upstream)
    conn = HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        out = [(k, v) for k, v in headers if k.lower() not in _HOP]
        if body or method in ("PUT", "POST", "PATCH"):
            out.append(("Content-Length", str(len(body))))
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in out:
            conn.putheader(k, v)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        length = int(resp.getheader("Content-Length") or len(data)) if method == "HEAD" \
            else len(data)
        return resp.status, resp.getheaders(), data, length
    finally:
        conn.close()


def run_quiet(cmd: list[str], env: dict[str, str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command with `env` added to this process's environment, capturing output."""
    return subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, **kw)

