"""Prompt-engineering track: rewrite prompts with a served Prompt Enhancer (any OpenAI-compatible model).

Two ways in, one request path (`captioning.client.CaptionClient`: retries, backoff, outage pause):

* the job (`jobs/enhance_prompts.py` -> :func:`run`): prompts.jsonl -> Lance table ENHANCED
  (flywheel/pe_schema.py), one row per prompt id, committed every `commit_every`, resumable;
* the flywheel (:func:`enhance_texts`): case_id -> prompt in, case_id -> :class:`Rewrite` out, for
  the cases routed to the prompt track (the flywheel stores them in its `prompt_rewrites` table).

A generic instruction model is asked with the `enhance` prompt and a JSON schema (strict, validated);
a PE fine-tuned on our SFT export (`plain`) is asked in its training format and its text after
`</think>` is the rewrite.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from captioning.client import CaptionClient, Outcome, check_server
from captioning.pipeline import CaptionWriter
from common.typed_config import ConfigError
from flywheel.pe_config import EnhanceConfig
from flywheel.pe_llm import PLAIN, PEPromptSet, RunStats, open_output, run_rows
from flywheel.pe_schema import DONE, ENHANCED, REPLACE_IF, STATUS_FAILED, STATUS_OK


@dataclass(frozen=True)
class Rewrite:
    rewrite: str | None
    """The enhanced prompt; None when every attempt failed."""
    model: str
    error: str | None = None
    """'<kind>: <detail>' of the last failure; None when rewritten."""
    attempts: int = 0


async def request(client: CaptionClient, prompts: PEPromptSet, row_id: str, prompt: str, plain: bool) -> Outcome:
    if plain:
        return await client.request(PLAIN, prompt, row_id)
    return await client.request("enhance", prompts.render("enhance", prompt=prompt), row_id)


def enhanced_text(out: Outcome) -> str:
    return out.value if isinstance(out.value, str) else out.value["prompt"]


def prompt_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


def read_prompts(path: str) -> list[tuple[str, str]]:
    """(id, prompt) per line of a JSON-lines file; a bad line stops the job before any work, naming it."""
    out: list[tuple[str, str]] = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError as e:
        raise ConfigError(f"--input {path}: cannot read ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--input {path} line {n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise ConfigError(f"--input {path} line {n}: needs a non-empty string field 'prompt'")
        out.append((str(rec["id"]) if rec.get("id") is not None else prompt_id(rec["prompt"]), rec["prompt"]))
    ids = [i for i, _ in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"--input {path}: id {dup!r} appears more than once")
    return out


def run(cfg: EnhanceConfig) -> RunStats:
    """Enhance every prompt of cfg.input not yet ok in cfg.output."""
    prompts = PEPromptSet.load_pe(cfg.prompt_root, cfg.prompt_version)
    ccfg = cfg.caption_config(cfg.input)
    items = read_prompts(cfg.input)
    stored = open_output(cfg.output, ENHANCED)
    stats = RunStats(skipped=sum(stored.get(i) in DONE for i, _ in items))
    todo = [(i, p) for i, p in items if stored.get(i) not in DONE]
    stats.todo = len(todo)
    version = PLAIN if cfg.plain else prompts.version

    def row(item: tuple[str, str], out: Outcome | None, kind: str | None = None, error: str | None = None) -> dict[str, Any]:
        ok = out is not None and out.ok
        return {"id": item[0], "status": STATUS_OK if ok else STATUS_FAILED,
                "error_kind": None if ok else (kind or out.error_kind), "error": None if ok else (error or out.error),
                "prompt": item[1], "enhanced": enhanced_text(out) if ok else None,
                "attempts": out.attempts if out else 0, "model": cfg.model, "prompt_version": version,
                "enhanced_at": dt.datetime.now(dt.UTC)}

    async def make(client: CaptionClient, item: tuple[str, str]) -> dict[str, Any]:
        return row(item, await request(client, prompts, item[0], item[1], cfg.plain))

    writer = CaptionWriter(ccfg, cfg.input, 0, schema=ENHANCED, replace_if=REPLACE_IF)
    return run_rows(ccfg, prompts, todo, make, lambda item, kind, error: row(item, None, kind, error), writer,
                    stats, "enhance", cfg.progress)


def enhance_texts(texts: dict[str, str], server: str, model: str, *, plain: bool = False,
                  client: dict[str, Any] | None = None, prompt_version: str = "v1") -> dict[str, Rewrite]:
    """The flywheel's call for cases routed to the prompt track: key -> prompt in, key -> Rewrite out.
    Raises captioning.client.ServerUnreachable when the server is down or does not serve `model`
    (the caller leaves the cases awaiting), ServerGone when it goes away for longer than
    `client.server_patience_s`."""
    cfg = EnhanceConfig(server=server, model=model, output="-", input="-", plain=plain, client=client or {},
                        prompt_version=prompt_version)
    prompts = PEPromptSet.load_pe(cfg.prompt_root, cfg.prompt_version)
    ccfg = cfg.caption_config("-")

    async def go() -> dict[str, Rewrite]:
        await check_server(ccfg)
        c = CaptionClient(ccfg, prompts)
        try:
            keys = list(texts)
            outs = await asyncio.gather(*(request(c, prompts, k, texts[k], plain) for k in keys))
        finally:
            await c.aclose()
        return {k: Rewrite(enhanced_text(o), model, None, o.attempts) if o.ok
                else Rewrite(None, model, f"{o.error_kind}: {o.error}", o.attempts) for k, o in zip(keys, outs, strict=True)}

    return asyncio.run(go())


def rewrite_cases(cases: list[dict], server: str, model: str) -> list[str | None]:
    """`flywheel.tracks.Rewriter` for the prompt track: [{case_id, prompt}] -> one rewrite (or None)
    per case, in order: ``tracks.enhance_prompts(db, server, model, rewrite_cases)``."""
    out = enhance_texts({c["case_id"]: c["prompt"] for c in cases}, server, model)
    return [out[c["case_id"]].rewrite for c in cases]
