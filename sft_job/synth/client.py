"""A small async client for OpenAI-compatible `POST {base_url}/chat/completions` endpoints.

Plain HTTP through httpx (already installed with huggingface_hub) rather than the `openai`
package: one endpoint is used, and owning the request loop lets us honour Retry-After on every
429/5xx, share one pause between all workers after a 429, fall back from JSON mode when a server
refuses it, and map failures to the job's exit codes. It works the same against OpenAI, vLLM,
TGI, Ollama, LiteLLM and other servers that speak this API.

Failures: 401/403 and 429 `insufficient_quota` -> AccessError (exit 3); 404 and other 4xx ->
SpecError (exit 2); 408/409/429/5xx, timeouts and connection errors are retried with jittered
exponential backoff (or the server's Retry-After) and, once the retries are spent,
-> TransientError (exit 75). The API key is never logged and is masked in error messages.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from sft_job.errors import AccessError, SpecError, TransientError

log = logging.getLogger(__name__)

JsonMode = Literal["auto", "on", "off"]
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
_KEY_LIKE = re.compile(r"\b(sk-[A-Za-z0-9_-]{3})[A-Za-z0-9_*-]{6,}")
MAX_RETRY_AFTER = 300.0


@dataclass(frozen=True)
class ClientSettings:
    base_url: str
    model: str
    api_key: str
    temperature: float = 0.9
    max_tokens: int | None = None
    json_mode: JsonMode = "auto"
    timeout: float = 120.0
    max_retries: int = 6  # retries after the first attempt
    rpm: float = 0.0  # requests started per minute, 0 = no limit
    backoff_base: float = 1.0
    backoff_cap: float = 60.0

    def __repr__(self) -> str:  # never show the key
        return f"ClientSettings(base_url={self.base_url!r}, model={self.model!r}, api_key='***')"


@dataclass
class Completion:
    content: str | None
    finish_reason: str | None
    json_mode: bool


class _Limiter:
    """Spaces request starts (rpm) and holds every worker back after a 429 with Retry-After."""

    def __init__(self, rpm: float) -> None:
        self.interval = 60.0 / rpm if rpm > 0 else 0.0
        self.next_at = 0.0
        self.pause_until = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at, self.pause_until)
            self.next_at = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)

    def pause(self, seconds: float) -> None:
        self.pause_until = max(self.pause_until, time.monotonic() + seconds)


class ChatClient:
    """Use as `async with ChatClient(settings) as c: await c.complete(messages)`."""

    def __init__(self, settings: ClientSettings) -> None:
        import httpx

        self.s = settings
        self.json_mode = settings.json_mode != "off"
        self.requests = 0  # HTTP requests sent, retries included
        self._limiter = _Limiter(settings.rpm)
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            headers={"Authorization": f"Bearer {settings.api_key}"},
            timeout=httpx.Timeout(settings.timeout, connect=min(30.0, settings.timeout)),
        )

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        """One chat completion, retried on throttling and server errors."""
        attempt = 0
        while True:
            attempt += 1
            used_json = self.json_mode
            await self._limiter.wait()
            delay, why = await self._try(messages, used_json, attempt)
            if isinstance(delay, Completion):
                return delay
            if delay is None:  # JSON mode refused: retry at once without it
                attempt -= 1
                continue
            if attempt > self.s.max_retries:
                raise TransientError(f"{self._url()}: {why}; gave up after {attempt} attempts "
                                     "(rerun later: finished requests are kept)")
            log.warning("%s: %s (attempt %d/%d), retrying in %.1fs", self._url(), why, attempt,
                        self.s.max_retries + 1, delay)
            await asyncio.sleep(delay)

    async def _try(self, messages: list[dict[str, str]], use_json: bool, attempt: int
                   ) -> tuple[Completion | float | None, str]:
        """A Completion; or (seconds to wait, why) for a retryable failure; or (None, why)
        when JSON mode was refused and switched off. Raises for failures not worth retrying."""
        import httpx

        body: dict[str, Any] = {"model": self.s.model, "messages": messages,
                                "temperature": self.s.temperature}
        if self.s.max_tokens:
            body["max_tokens"] = self.s.max_tokens
        if use_json:
            body["response_format"] = {"type": "json_object"}
        self.requests += 1
        try:
            r = await self._http.post("chat/completions", json=body)
        except httpx.TimeoutException as e:
            return self._backoff(attempt), f"timed out ({type(e).__name__})"
        except httpx.TransportError as e:
            return self._backoff(attempt), (f"cannot connect ({type(e).__name__}: "
                                            f"{self._mask(str(e))}); is --base-url right and "
                                            "the server up?")
        if r.status_code == 200:
            try:
                return self._completion(r.json(), use_json), ""
            except (ValueError, KeyError, IndexError, TypeError):
                return self._backoff(attempt), "HTTP 200 with a body that is not a chat completion"
        msg, code = self._error(r)
        if r.status_code in (400, 422) and use_json and self.s.json_mode == "auto":
            self.json_mode = False
            log.warning("%s refused JSON mode (HTTP %d: %s); asking for JSON in the prompt only",
                        self._url(), r.status_code, msg)
            return None, msg
        if r.status_code == 429 and code == "insufficient_quota":
            raise AccessError(f"{self._url()}: HTTP 429 insufficient_quota: {msg}")
        if r.status_code in _RETRY_STATUS:
            wait = _retry_after(r.headers)
            if wait is None:
                wait = self._backoff(attempt)
            if r.status_code == 429:
                self._limiter.pause(wait)
            return wait, f"HTTP {r.status_code}: {msg}"
        if r.status_code in (401, 403):
            raise AccessError(f"{self._url()}: HTTP {r.status_code}, the endpoint refused the key "
                              f"from the API key variable: {msg}")
        if r.status_code == 404:
            raise SpecError(f"{self._url()}: HTTP 404 ({msg}); check --base-url (it usually ends "
                            f"in /v1) and --model '{self.s.model}'")
        raise SpecError(f"{self._url()}: HTTP {r.status_code}: {msg}")

    def _completion(self, data: dict[str, Any], used_json: bool) -> Completion:
        choice = data["choices"][0]
        message = choice["message"]
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise TypeError("content")
        return Completion(content, choice.get("finish_reason"), used_json)

    def _error(self, r: Any) -> tuple[str, str | None]:
        """The server's error message (masked, one line, short) and error code."""
        code = None
        try:
            doc = r.json()
            err = doc.get("error", doc)
        except (ValueError, AttributeError):
            err = r.text
        if isinstance(err, dict):
            msg = err.get("message") or json.dumps(err)
            code = err.get("code") or err.get("type")
        else:
            msg = str(err)
        msg = " ".join(self._mask(str(msg)).split())[:300] or r.reason_phrase
        return msg, code if isinstance(code, str) else None

    def _mask(self, text: str) -> str:
        if self.s.api_key:
            text = text.replace(self.s.api_key, "***")
        return _KEY_LIKE.sub(r"\1***", text)

    def _backoff(self, attempt: int) -> float:
        """Jittered exponential backoff: about base, 2*base, 4*base... up to the cap."""
        return random.uniform(0.5, 1.0) * min(self.s.backoff_cap,
                                              self.s.backoff_base * 2 ** min(attempt - 1, 16))

    def _url(self) -> str:
        return f"{self.s.base_url.rstrip('/')}/chat/completions"


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), capped."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return min(MAX_RETRY_AFTER, max(0.0, float(ms) / 1000))
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when.timestamp() - time.time()))
