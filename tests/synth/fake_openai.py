"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for the synth tests.

It stands in for a real endpoint (OpenAI, vLLM, Ollama, LiteLLM...): it speaks the same
`POST /v1/chat/completions` JSON API, checks the bearer key, and answers with whatever a test
scripts, including the messy shapes real models return, 429s with Retry-After, 5xx errors,
refusing JSON mode (400), permanent failure after N answers, and requests that hang.

Answers are scripted per request, keyed by (topic, i): the tests' prompt template carries
`TOPIC=<topic> I=<i>` so the reply does not depend on which request arrives first.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.servers import _QuietServer

TEMPLATE = "TOPIC={topic} I={i} N={n}\nAnswer in JSON."
_KEY_RE = re.compile(r"TOPIC=(.*?) I=(\d+)")


@dataclass
class Reply:
    """One scripted HTTP answer: a chat completion with `content`, or an error status."""

    content: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str = "stop"
    code: str | None = None  # the error code of a non-200 answer


@dataclass
class Seen:
    """One request as the server received it."""

    key: tuple[str, int] | None
    body: dict[str, Any]
    status: int
    at: float  # when answered
    arrived: float  # when received


class FakeOpenAI:
    """Start with `with FakeOpenAI(script) as api:`; `api.url` is the base URL (…/v1).

    script: {(topic, i): content-or-Reply-or-list-of-Reply}; a list is served in order, one item
    per attempt, its last item for every later attempt. `default` answers unscripted keys.
    """

    def __init__(self, script: dict[tuple[str, int], Any] | None = None, key: str = "test-key",
                 json_mode: bool = True, default: Callable[[tuple[str, int] | None], Any] | None = None,
                 fail_after: int | None = None, hang_after: int | None = None) -> None:
        self.script = script or {}
        self.key = key
        self.json_mode = json_mode
        self.default = default
        self.fail_after = fail_after  # answer 503 to everything after this many 200s
        self.hang_after = hang_after  # requests after this many never get an answer (until exit)
        self._release = threading.Event()
        self.seen: list[Seen] = []
        self._attempts: dict[tuple[str, int] | None, int] = {}
        self._received = 0
        self._lock = threading.Lock()
        self._server: _QuietServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ------------------------------------------------------------------ inspection
    def ok_keys(self) -> list[tuple[str, int]]:
        """(topic, i) of every request answered 200, in order."""
        return [s.key for s in self.seen if s.status == 200 and s.key is not None]

    def waiting(self) -> int:
        """Requests received so far (answered or hanging)."""
        with self._lock:
            return self._received

    # ------------------------------------------------------------------ answering
    def answer(self, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, str], bytes]:
        arrived = time.monotonic()
        with self._lock:
            self._received += 1
            hang = self.hang_after is not None and self._received > self.hang_after
        if hang:
            self._release.wait(60)
            return _error(503, "shutting down", None)
        key = None
        user = next((m["content"] for m in body.get("messages", []) if m["role"] == "user"), "")
        m = _KEY_RE.search(user)
        if m:
            key = (m.group(1), int(m.group(2)))
        status, headers, payload = self._decide(body, auth, key)
        with self._lock:
            self.seen.append(Seen(key, body, status, time.monotonic(), arrived))
        return status, headers, payload

    def _decide(self, body: dict[str, Any], auth: str | None, key: tuple[str, int] | None
                ) -> tuple[int, dict[str, str], bytes]:
        if auth != f"Bearer {self.key}":
            return _error(401, "Incorrect API key provided: " + str(auth), "invalid_api_key")
        if "response_format" in body and not self.json_mode:
            return _error(400, "response_format is not supported by this model", None)
        with self._lock:
            ok = sum(1 for s in self.seen if s.status == 200)
            n = self._attempts[key] = self._attempts.get(key, 0) + 1
        if self.fail_after is not None and ok >= self.fail_after:
            return _error(503, "server overloaded", None, {"Retry-After": "0"})
        item = self.script.get(key) if key in self.script else (
            self.default(key) if self.default else None)
        if isinstance(item, list):
            item = item[min(n, len(item)) - 1]
        reply = item if isinstance(item, Reply) else Reply(item)
        if reply.status != 200:
            return _error(reply.status, f"scripted {reply.status}", reply.code, reply.headers)
        return 200, reply.headers, json.dumps({
            "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                         "message": {"role": "assistant", "content": reply.content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()


def _error(status: int, message: str, code: str | None, headers: dict[str, str] | None = None
           ) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return status, headers or {}, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    api: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        raw = self.rfile.read(length)
        if self.path != "/v1/chat/completions":
            status, headers, payload = _error(404, f"no route {self.path}", None)
        else:
            status, headers, payload = self.api.answer(json.loads(raw), self.headers.get("authorization"))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
