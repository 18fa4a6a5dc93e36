"""OpenAI-compatible HTTP client for a vLLM server: structured-output requests, bounded retries, and a
circuit breaker that pauses every request while the server is unreachable.

One loop (`CaptionClient.request`) owns every retry: httpx's transport retries are off (retries=0), so
each attempt is counted. 429, 5xx, timeouts and connection errors back off exponentially with jitter
(capped; a `Retry-After` header wins); an answer cut at max_tokens is asked again with twice the
bound (up to `max_tokens_cap`); a schema-invalid answer is asked again with a new seed; other 4xx
fail at once (resending the same body cannot succeed).

A connection error (or a read timeout) is either the request's own (a dropped connection or a slow
answer while the server still answers) or an outage. `Breaker` tells them apart with a health probe (`GET /models`): when the probe fails
too, the breaker opens and every request, in flight or new, waits for it, with no attempt counted, so
no row fails because the server went away. The breaker probes with the same capped backoff and
closes as soon as the server answers; after `server_patience_s` without an answer it raises
`ServerGone` in every waiting request and the job stops (pipeline.py commits what finished).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import zlib
from dataclasses import dataclass
from typing import Any

import httpx

from captioning.config import CaptionConfig
from captioning.prompts import ROUTE, InvalidResponse, PromptSet


class ServerUnreachable(RuntimeError):
    """The server did not answer the preflight check (the job cannot run at all)."""


class ServerGone(RuntimeError):
    """The server stayed unreachable longer than `server_patience_s` during the run."""


@dataclass(frozen=True)
class Outcome:
    """The end of one request's attempts: a validated answer, or the last failure."""

    kind: str
    attempts: int
    text: str | None = None
    """The validated JSON exactly as the model returned it."""
    value: Any = None
    error_kind: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.text is not None


def request_seed(cfg: CaptionConfig, row_id: str, attempt: int) -> int:
    """Reproducible per row and attempt: a retry samples anew, a rerun samples the same."""
    return (cfg.seed + zlib.crc32(row_id.encode()) * 64 + attempt) % 2**31


def chat_body(prompts: PromptSet, cfg: CaptionConfig, kind: str, image: bytes, seed: int,
              mime: str = "image/jpeg", max_tokens: int | None = None) -> dict:
    """The request body for `kind`; the JSON schema travels in `response_format` (vLLM enforces it)."""
    return {
        **cfg.extra_request,
        "model": cfg.model,
        "messages": prompts.messages(kind, image, mime),
        "max_tokens": max_tokens or (cfg.route_max_tokens if kind == ROUTE else cfg.max_tokens),
        "temperature": cfg.temperature,
        "seed": seed,
        "response_format": prompts.response_format(kind),
    }


def backoff(cfg: CaptionConfig, attempt: int) -> float:
    """Exponential delay with jitter, capped: drawn in [d/2, d], d = min(cap, base * 2**attempt)."""
    d = min(cfg.backoff_max_s, cfg.backoff_s * 2**attempt)
    return d * random.uniform(0.5, 1.0)


def retry_after(resp: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/unparsable."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def make_http_client(cfg: CaptionConfig, base_url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    # retries=0: every attempt is counted by CaptionClient's loop, never hidden in the transport.
    transport = httpx.AsyncHTTPTransport(retries=0, limits=limits)
    # pool=None: waiting for one of our own connections is not a server failure.
    timeout = httpx.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=cfg.read_timeout_s, pool=None)
    return httpx.AsyncClient(base_url=base_url, transport=transport, timeout=timeout)


# Transport errors that say nothing reached a server that answers (refused, reset, DNS, connect
# timeout, a connection closed mid-answer when the server died); read timeouts are the request's own.
CONNECTION_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                     httpx.RemoteProtocolError, httpx.CloseError)


class Breaker:
    """Circuit breaker shared by all requests of one client: closed (requests flow) or open (the
    server does not answer its health probe: every request waits, none is counted)."""

    def __init__(self, cfg: CaptionConfig, http: httpx.AsyncClient):
        self.cfg, self.http = cfg, http
        self._closed = asyncio.Event()
        self._closed.set()
        self._lock = asyncio.Lock()
        self.gone: ServerGone | None = None
        self.outages = 0
        self.paused_s = 0.0

    async def probe(self) -> bool:
        try:
            resp = await self.http.get("/models", timeout=httpx.Timeout(self.cfg.connect_timeout_s, pool=None))
            return resp.status_code == 200
        except httpx.HTTPError:
            return False

    async def wait(self) -> None:
        """Return when the server is believed reachable; raise ServerGone once patience ran out."""
        await self._closed.wait()
        if self.gone:
            raise self.gone

    async def connection_failed(self) -> bool:
        """After a connection error: True if the server answers its probe (the error was this
        request's own: count it), False after an outage the caller waited out (do not count it)."""
        async with self._lock:
            if not self._closed.is_set() or self.gone:
                opened = False  # another request already opened it
            elif await self.probe():
                return True
            else:
                opened = True
                self._closed.clear()
        if opened:
            await self._recover()
        await self.wait()
        return False

    async def _recover(self) -> None:
        start = time.monotonic()
        self.outages += 1
        attempt = 0
        try:
            while time.monotonic() - start < self.cfg.server_patience_s:
                await asyncio.sleep(min(backoff(self.cfg, attempt), max(0.0, self.cfg.server_patience_s - (time.monotonic() - start))))
                attempt += 1
                if await self.probe():
                    return
            self.gone = ServerGone(f"--server {self.cfg.server} unreachable for {self.cfg.server_patience_s:g} s "
                                   f"(--server-patience)")
        finally:
            self.paused_s += time.monotonic() - start
            self._closed.set()


class CaptionClient:
    def __init__(self, cfg: CaptionConfig, prompts: PromptSet):
        assert cfg.server is not None
        self.cfg, self.prompts = cfg, prompts
        self.http = make_http_client(cfg, cfg.server.rstrip("/"))
        self.breaker = Breaker(cfg, self.http)
        self._slots = asyncio.Semaphore(cfg.concurrency)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, kind: str, image: bytes, row_id: str, mime: str = "image/jpeg",
                      seed_offset: int = 0) -> Outcome:
        """Ask until a valid answer or `max_attempts` counted attempts; raises ServerGone."""
        cfg = self.cfg
        error_kind, error = "connection", "no attempt made"
        limit = cfg.route_max_tokens if kind == ROUTE else cfg.max_tokens
        attempt = sent = 0
        while attempt < cfg.max_attempts:
            await self.breaker.wait()
            seed = request_seed(cfg, row_id, seed_offset + sent)
            sent += 1
            async with self._slots:
                try:
                    resp = await self.http.post("/chat/completions",
                                                json=chat_body(self.prompts, cfg, kind, image, seed, mime, limit))
                except CONNECTION_ERRORS as e:
                    if not await self.breaker.connection_failed():
                        continue  # an outage, waited out: not this request's failure
                    attempt += 1
                    error_kind, error = "connection", f"{type(e).__name__}: {e}"
                    if attempt < cfg.max_attempts:
                        await asyncio.sleep(backoff(cfg, attempt - 1))
                    continue
                except httpx.TimeoutException as e:
                    # A read/write timeout: a slow server (it answers the probe: count it), or a
                    # connection that died without a reset (host gone, network cut): an outage.
                    if not await self.breaker.connection_failed():
                        continue
                    attempt += 1
                    error_kind, error = "timeout", f"{type(e).__name__}: {e}"
                    if attempt < cfg.max_attempts:
                        await asyncio.sleep(backoff(cfg, attempt - 1))
                    continue
            attempt += 1
            if resp.status_code == 429 or resp.status_code >= 500:
                error_kind = "http_429" if resp.status_code == 429 else "http_5xx"
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if attempt < cfg.max_attempts:
                    wait = retry_after(resp)
                    await asyncio.sleep(min(wait, cfg.server_patience_s) if wait is not None else backoff(cfg, attempt - 1))
                continue
            if resp.status_code >= 400:
                return Outcome(kind, attempt, error_kind="http_4xx", error=f"HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                choice = resp.json()["choices"][0]
                text, finish = choice["message"]["content"] or "", choice.get("finish_reason")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error_kind, error = "bad_response", f"unexpected response body: {e!r}"
                continue
            if finish == "length":
                error_kind = "length"
                error = f"answer cut at max_tokens={limit} ({len(text)} chars; cap max_tokens_cap={cfg.max_tokens_cap})"
                limit = min(cfg.max_tokens_cap, 2 * limit)  # the next attempt may write a longer answer
                continue
            try:
                value = self.prompts.validate(kind, text)
            except InvalidResponse as e:
                error_kind, error = e.kind, e.detail
                continue
            return Outcome(kind, attempt, text=text, value=value)
        return Outcome(kind, attempt, error_kind=error_kind, error=error)


async def check_server(cfg: CaptionConfig) -> list[str]:
    """Fail before any work when the server is down or does not serve `--model`; return served ids."""
    assert cfg.server is not None
    last = ""
    async with make_http_client(cfg, cfg.server.rstrip("/")) as http:
        for attempt in range(cfg.max_attempts):
            try:
                resp = await http.get("/models", timeout=httpx.Timeout(min(cfg.read_timeout_s, 30.0),
                                                                       connect=cfg.connect_timeout_s, pool=None))
                if resp.status_code == 200:
                    served = [m["id"] for m in resp.json().get("data", [])]
                    if cfg.model not in served:
                        raise ServerUnreachable(f"--model {cfg.model!r} is not served by --server {cfg.server} "
                                                f"(it serves: {', '.join(served) or 'nothing'})")
                    return served
                last = f"HTTP {resp.status_code}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
            if attempt + 1 < cfg.max_attempts:
                await asyncio.sleep(backoff(cfg, attempt))
    raise ServerUnreachable(f"--server {cfg.server}: unreachable after {cfg.max_attempts} attempts ({last})")
