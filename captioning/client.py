"""OpenAI-compatible HTTP client for a vLLM server: structured-output requests with a bounded retry loop.

The retry bound counts every HTTP attempt: httpx's transport retries are off (retries=0) so the loop
below is the only place that retries. 429 and 5xx back off exponentially; a dropped connection, a
timeout, an answer cut at max_tokens (`finish_reason == "length"`) or an answer that fails the schema
is a failed attempt retried with a new seed. Other 4xx (a bad request) fail at once: resending the
same body cannot succeed. Concurrency is an asyncio semaphore over requests in flight.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass
from typing import Any

import httpx

from captioning.config import CaptionConfig
from captioning.prompts import ROUTE, InvalidResponse, PromptSet


class ServerUnreachable(RuntimeError):
    """The server did not answer within the retry bound (the job cannot run at all)."""


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


def chat_body(prompts: PromptSet, cfg: CaptionConfig, kind: str, image_jpeg: bytes, seed: int) -> dict:
    """The request body for `kind`; the JSON schema travels in `response_format` (vLLM enforces it)."""
    return {
        **cfg.extra_request,
        "model": cfg.model,
        "messages": prompts.messages(kind, image_jpeg),
        "max_tokens": cfg.route_max_tokens if kind == ROUTE else cfg.max_tokens,
        "temperature": cfg.temperature,
        "seed": seed,
        "response_format": prompts.response_format(kind),
    }


def make_http_client(cfg: CaptionConfig, base_url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    # retries=0: every attempt is counted by CaptionClient's loop, never hidden in the transport.
    transport = httpx.AsyncHTTPTransport(retries=0, limits=limits)
    return httpx.AsyncClient(base_url=base_url, transport=transport, timeout=cfg.request_timeout_s)


class CaptionClient:
    def __init__(self, cfg: CaptionConfig, prompts: PromptSet):
        assert cfg.server is not None
        self.cfg, self.prompts = cfg, prompts
        self.http = make_http_client(cfg, cfg.server.rstrip("/"))
        self._slots = asyncio.Semaphore(cfg.concurrency)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, kind: str, image_jpeg: bytes, row_id: str) -> Outcome:
        error_kind, error = "connection", "no attempt made"
        for attempt in range(self.cfg.max_attempts):
            async with self._slots:
                try:
                    resp = await self.http.post("/chat/completions",
                                                json=chat_body(self.prompts, self.cfg, kind, image_jpeg,
                                                               request_seed(self.cfg, row_id, attempt)))
                except httpx.TimeoutException as e:
                    error_kind, error = "timeout", f"{type(e).__name__}: {e}"
                    continue
                except httpx.TransportError as e:  # refused / reset / dropped mid-response
                    error_kind, error = "connection", f"{type(e).__name__}: {e}"
                    continue
            if resp.status_code == 429 or resp.status_code >= 500:
                error_kind = "http_429" if resp.status_code == 429 else "http_5xx"
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if attempt + 1 < self.cfg.max_attempts:
                    await asyncio.sleep(self.cfg.backoff_s * 2**attempt)
                continue
            if resp.status_code >= 400:
                return Outcome(kind, attempt + 1, error_kind="http_4xx",
                               error=f"HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                choice = resp.json()["choices"][0]
                text, finish = choice["message"]["content"] or "", choice.get("finish_reason")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error_kind, error = "bad_response", f"unexpected response body: {e!r}"
                continue
            if finish == "length":
                error_kind, error = "length", f"answer cut at max_tokens ({len(text)} chars)"
                continue
            try:
                value = self.prompts.validate(kind, text)
            except InvalidResponse as e:
                error_kind, error = e.kind, e.detail
                continue
            return Outcome(kind, attempt + 1, text=text, value=value)
        return Outcome(kind, self.cfg.max_attempts, error_kind=error_kind, error=error)


async def check_server(cfg: CaptionConfig) -> list[str]:
    """Fail before any work when the server is down or does not serve `--model`; return served ids."""
    assert cfg.server is not None
    last = ""
    async with make_http_client(cfg, cfg.server.rstrip("/")) as http:
        for attempt in range(cfg.max_attempts):
            try:
                resp = await http.get("/models", timeout=min(cfg.request_timeout_s, 30.0))
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
                await asyncio.sleep(cfg.backoff_s * 2**attempt)
    raise ServerUnreachable(f"--server {cfg.server}: unreachable after {cfg.max_attempts} attempts ({last})")
