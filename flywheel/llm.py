"""Text requests to the served LLM (judge, prompt variants) through the captioning client.

The captioning client (:class:`captioning.client.CaptionClient`) owns the OpenAI-compatible request
loop: structured output per request, bounded retries with back-off, answers validated against the
JSON schema. It calls ``prompts.messages(kind, payload)`` with the per-request bytes it is given;
for these text tasks the payload is the UTF-8 JSON of the template's fields (no image), so the same
retry/validation code serves the flywheel. Templates and schemas live in ``flywheel/prompts``.
"""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

from captioning.client import CaptionClient, ServerGone, ServerUnreachable, check_server
from captioning.config import CaptionConfig
from captioning.prompts import PromptSet
from flywheel.config import LLMConfig

PROMPTS = Path(__file__).resolve().parent / "prompts"
KINDS = ("judge", "variants")


class TextPrompts(PromptSet):
    """A PromptSet whose requests are text only; ``{field}`` placeholders come from the payload."""

    def messages(self, part: str, payload: bytes, mime: str = "") -> list[dict[str, Any]]:
        fields = json.loads(payload.decode())
        text = self.prompts[part]
        for k, v in fields.items():
            text = text.replace("{" + k + "}", str(v))
        return [{"role": "user", "content": text}]


def load_prompts(max_variants: int) -> TextPrompts:
    schemas = {k: json.loads((PROMPTS / f"{k}.json").read_text()) for k in KINDS}
    schemas = copy.deepcopy(schemas)
    # room for the duplicates de-duplication removes; at most max_variants are kept
    schemas["variants"]["properties"]["variants"]["maxItems"] = max(1, 2 * max_variants)
    prompts = {k: (PROMPTS / f"{k}.txt").read_text().strip().replace("{schema}", json.dumps(schemas[k]))
               for k in KINDS}
    return TextPrompts(version="flywheel-v1", system={}, prompts=prompts, schemas=schemas,
                       parts={k: (k,) for k in KINDS})


class LLM:
    """judge / variants requests; `None` answers with an error when the server cannot help."""

    def __init__(self, cfg: LLMConfig, max_variants: int):
        self.cfg = cfg
        self.prompts = load_prompts(max_variants)
        self.ccfg = CaptionConfig(input="-", output="-", model=cfg.model, server=cfg.server,
                                  max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                  max_attempts=cfg.max_attempts, backoff_s=cfg.backoff_s,
                                  read_timeout_s=cfg.request_timeout_s, server_patience_s=cfg.server_patience_s,
                                  concurrency=cfg.concurrency)

    def ask(self, kind: str, requests: list[tuple[str, dict]]) -> tuple[dict[str, Any], dict[str, str]]:
        """(request id, template fields) pairs -> ({id: validated answer}, {id: error}). A server that
        is down answers every id with the same error (the caller records the step as pending)."""
        if not requests:
            return {}, {}
        return asyncio.run(self._ask(kind, requests))

    async def _ask(self, kind: str, requests: list[tuple[str, dict]]):
        try:
            await check_server(self.ccfg)
        except ServerUnreachable as e:
            return {}, {rid: f"llm server: {e}" for rid, _ in requests}
        client = CaptionClient(self.ccfg, self.prompts)
        try:
            outs = await asyncio.gather(*(client.request(kind, json.dumps(f).encode(), rid) for rid, f in requests))
        except ServerGone as e:  # went away mid-run: everything of this step waits for the next run
            return {}, {rid: f"llm server: {e}" for rid, _ in requests}
        finally:
            await client.aclose()
        ok = {rid: o.value for (rid, _), o in zip(requests, outs, strict=True) if o.ok}
        bad = {rid: f"{o.error_kind}: {o.error}" for (rid, _), o in zip(requests, outs, strict=True) if not o.ok}
        return ok, bad
