"""Optional VLM judge of stage-2 edit pairs, through an OpenAI-compatible chat server (the vLLM
server the captioning job talks to): per pair, the source and target images and the instruction
go in; two integer scores 0..10 come back as JSON (``response_format`` JSON schema, enforced by
vLLM's guided decoding) — instruction following and consistency of the unedited part. Any failure
(server down, timeout, bad JSON) is the row's ``judge_error``; it never stops the stage."""

from __future__ import annotations

import base64
import io
import json

import httpx

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


def request_body(cfg, src, tgt, instruction: str) -> dict:
    content = [{"type": "image_url", "image_url": {"url": _data_uri(src, cfg.max_side)}},
               {"type": "image_url", "image_url": {"url": _data_uri(tgt, cfg.max_side)}},
               {"type": "text", "text": PROMPT.format(instruction=instruction)}]
    return {"model": cfg.model, "messages": [{"role": "user", "content": content}], "max_tokens": 48,
            "temperature": 0.0, "seed": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "edit_judge", "schema": SCHEMA}}}


def parse(text: str) -> tuple[float, float]:
    d = json.loads(text)
    a, b = float(d["instruction_following"]), float(d["consistency"])
    if not (0 <= a <= 10 and 0 <= b <= 10):
        raise ValueError(f"scores out of 0..10: {a}, {b}")
    return a, b


def judge_pairs(cfg, sources: list, targets: list, instructions: list[str | None]
                ) -> list[tuple[float | None, float | None, str | None]]:
    """(instruction following, consistency, error) per pair; one request per pair."""
    out = []
    with httpx.Client(base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_s) as http:
        for src, tgt, ins in zip(sources, targets, instructions, strict=True):
            try:
                r = http.post("/chat/completions", json=request_body(cfg, src, tgt, ins or ""))
                r.raise_for_status()
                out.append((*parse(r.json()["choices"][0]["message"]["content"]), None))
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                out.append((None, None, f"{type(e).__name__}: {str(e)[:200]}"))
    return out
