"""Optional VLM judge of stage-2 edit pairs, through an OpenAI-compatible chat server (the vLLM
server the captioning job talks to): per pair, the source and target images and the instruction
go in; two integer scores 0..10 come back as JSON (``response_format`` JSON schema, enforced by
vLLM's guided decoding) — instruction following and consistency of the unedited part.

Requests go through the captioning client (``captioning.client.CaptionClient``): the same bounded
retries with jittered backoff, ``Retry-After``, re-asks of invalid JSON with a new seed, and the
circuit breaker that pauses every request of a batch while the server is down. A pair whose
attempts all fail, or a server gone longer than ``scoring.judge.patience_s``, is the row's
``judge_error``; the judge never stops the stage."""

from __future__ import annotations

import asyncio
import base64
import io
import json

from captioning.prompts import InvalidResponse

KIND = "edit-judge"
PROMPT = ("The first image is the original, the second the result of editing it with this instruction:\n"
          "{instruction}\n\nScore from 0 to 10: instruction_following (does the edit do what the instruction "
          "says) and consistency (is everything the instruction did not ask to change unchanged). "
          "Answer with JSON only.")
SCHEMA = {"type": "object", "properties": {"instruction_following": {"type": "integer", "minimum": 0, "maximum": 10},
                                           "consistency": {"type": "integer", "minimum": 0, "maximum": 10}},
          "required": ["instruction_following", "consistency"]}


def _data_uri(im, max_side: int) -> str:
    im = im.copy()
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(cfg, src, tgt, instruction: str) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": _data_uri(src, cfg.max_side)}},
               {"type": "image_url", "image_url": {"url": _data_uri(tgt, cfg.max_side)}},
               {"type": "text", "text": PROMPT.format(instruction=instruction)}]
    return [{"role": "user", "content": content}]


def parse(text: str) -> tuple[float, float]:
    d = json.loads(text)
    a, b = float(d["instruction_following"]), float(d["consistency"])
    if not (0 <= a <= 10 and 0 <= b <= 10):
        raise ValueError(f"scores out of 0..10: {a}, {b}")
    return a, b


class JudgePrompts:
    """The prompt-set side of ``CaptionClient`` for the judge's one request kind. The client hands
    ``messages`` its ``image`` argument unchanged: here that is the pair's chat messages (two
    images + the instruction), built before the request."""

    def messages(self, kind: str, payload: list[dict], mime: str = "") -> list[dict]:
        return payload

    def response_format(self, kind: str) -> dict:
        return {"type": "json_schema", "json_schema": {"name": f"{KIND}_v1", "schema": SCHEMA, "strict": True}}

    def validate(self, kind: str, text: str) -> tuple[float, float]:
        try:
            return parse(text)
        except json.JSONDecodeError as e:
            raise InvalidResponse("invalid_json", str(e)) from None
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidResponse("schema", f"{type(e).__name__}: {e}") from None


def client_config(cfg):
    """The captioning client's config for the judge settings (``scoring.judge``)."""
    from captioning.config import CaptionConfig

    return CaptionConfig(input="-", output="-", model=cfg.model, server=cfg.url, max_tokens=48, max_tokens_cap=96,
                         temperature=0.0, max_attempts=cfg.max_attempts, backoff_s=cfg.backoff_s,
                         read_timeout_s=cfg.timeout_s, connect_timeout_s=min(10.0, cfg.timeout_s),
                         server_patience_s=cfg.patience_s, concurrency=cfg.concurrency)


async def _judge(cfg, ids, sources, targets, instructions):
    from captioning.client import CaptionClient, ServerGone

    client = CaptionClient(client_config(cfg), JudgePrompts())
    try:
        async def one(pid, src, tgt, ins):
            try:
                o = await client.request(KIND, messages(cfg, src, tgt, ins or ""), pid)
            except ServerGone as e:
                return None, None, f"server_gone: {e}"
            if o.ok:
                return (*o.value, None)
            return None, None, f"{o.error_kind} after {o.attempts} attempts: {(o.error or '')[:200]}"

        return await asyncio.gather(*(one(*a) for a in zip(ids, sources, targets, instructions, strict=True)))
    finally:
        await client.aclose()


def judge_pairs(cfg, ids: list[str], sources: list, targets: list, instructions: list[str | None]
                ) -> list[tuple[float | None, float | None, str | None]]:
    """(instruction following, consistency, error) per pair; up to ``cfg.concurrency`` requests in
    flight, every failure recorded in its row."""
    return list(asyncio.run(_judge(cfg, ids, sources, targets, instructions)))
