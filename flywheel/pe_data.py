"""Prompt-Enhancer training data by reverse engineering (Qwen-Image-2.0 §3.3).

Per captions-table id: render the fine annotation P_fine from its captions (captioning/schema.py's
`caption_variants`: dense general caption, text, knowledge and structured renderings, in one drawn
language), have the LLM classify it (general / portrait / text / complex_text, strict JSON), draw the
difficulty and the degradation strategies for that category (seeded per id), have the LLM apply them
(P_short plus, per step, what it removed), check that P_short keeps the meaning (its names and quoted
text must be in P_fine; else one more try, then `rejected` with the reason), and write the inverse
steps as the CoT. Edit annotations are summarised into concise editing prompts instead (no random
degradation). One row per input id (flywheel/pe_schema.py:PE_DATA); resumable; outages pause.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lance
import numpy as np

from captioning.client import CaptionClient, Outcome
from captioning.pipeline import CaptionWriter
from captioning.report import CJK, QUOTED
from captioning.schema import ADDED_COLUMNS, TRAINING_COLUMNS, caption_variants
from common.typed_config import ConfigError
from flywheel.pe_config import DIFFICULTIES, LANGUAGE_NAMES, PEConfig
from flywheel.pe_llm import PEPromptSet, RunStats, run_rows
from flywheel.pe_schema import DONE, PE_DATA, REPLACE_IF, STATUS_FAILED, STATUS_OK, STATUS_REJECTED

FINE_KINDS = ("dense", "text", "knowledge", "structured")  # caption variants that make P_fine, in order


# --------------------------------------------------------------------------- seeded draws


@dataclass(frozen=True)
class Draw:
    language: str
    difficulty: str | None = None
    strategies: tuple[str, ...] = ()


def _rng(seed: int, row_id: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little"))


def draw(cfg: PEConfig, row_id: str, category: str | None = None) -> Draw:
    """Language, then (given the category) difficulty and strategies, from one generator seeded by
    (cfg.seed, id): the same id draws the same on every run and machine. Strategies are drawn
    without replacement, weighted by their probability for the category."""
    rng = _rng(cfg.seed, row_id)
    langs = list(cfg.languages)
    language = langs[rng.choice(len(langs), p=np.array([cfg.languages[k] for k in langs]))]
    if category is None:
        return Draw(language)
    difficulty = DIFFICULTIES[rng.choice(len(DIFFICULTIES), p=np.array([cfg.difficulty[d].share for d in DIFFICULTIES]))]
    d = cfg.difficulty[difficulty]
    names = [n for n, s in cfg.strategies.items() if s.probability.get(category, 0) > 0]
    weights = np.array([cfg.strategies[n].probability[category] for n in names])
    k = int(rng.integers(d.min_strategies, d.max_strategies + 1))
    picked = rng.choice(len(names), size=min(k, len(names)), replace=False, p=weights / weights.sum())
    return Draw(language, difficulty, tuple(names[i] for i in picked))


# --------------------------------------------------------------------------- texts and checks


def fine_prompt(row: dict[str, Any], language: str) -> tuple[str, list[str], str] | None:
    """(P_fine, caption kinds used, language) of a captions-table row: its FINE_KINDS variants in
    `language` (else the other language), one paragraph each; None when the row has no ok caption."""
    variants = caption_variants(row)
    for lang in (language, *(x for x in LANGUAGE_NAMES if x != language)):
        parts = [(k, t) for k in FINE_KINDS for kind, vlang, t in variants if kind == k and vlang == lang]
        if parts:
            return "\n\n".join(t for _, t in parts), [k for k, _ in parts], lang
    return None


# A run of capitalised words ("Eiffel Tower", "SALE", "McDonald's"); CJK titles in 《》.
NAME = re.compile(r"[A-Z][\w'’&-]*(?:[ \t]+[A-Z][\w'’&-]*)*")
TITLE = re.compile(r"《([^》]+)》")
SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]|[\"“「『])\s*$")


def names_in(text: str) -> list[str]:
    """Names a prompt commits to: capitalised word runs (a sentence's first word is dropped: its
    capital says nothing) and 《titles》."""
    out = []
    for m in NAME.finditer(text):
        words = m.group().split()
        if SENTENCE_START.search(text[:m.start()]):
            words = words[1:]
        if words:
            out.append(" ".join(words))
    return out + TITLE.findall(text)


def meaning_check(p_short: str, p_fine: str) -> list[str]:
    """Reasons P_short changes the meaning of P_fine (empty = keeps it): every quoted text of P_short
    must appear verbatim in P_fine, every name case-insensitively."""
    reasons = [f"quoted text {q!r} not in P_fine" for q in (m.group()[1:-1] for m in QUOTED.finditer(p_short))
               if q.strip() and q not in p_fine]
    fine = p_fine.lower()
    reasons += [f"name {n!r} not in P_fine" for n in dict.fromkeys(names_in(p_short)) if n.lower() not in fine]
    return reasons


def language_of(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


def build_cot(cfg: PEConfig, strategies: tuple[str, ...], removed: list[str], language: str) -> str:
    """The inverse of the applied steps, last step first: each strategy's inverse, then what it removed."""
    steps = list(zip(strategies, removed, strict=True))[::-1]
    return "\n".join(f"{i}. {cfg.strategies[s].inverse[language]} {r.strip()}".rstrip()
                     for i, (s, r) in enumerate(steps, 1))


# --------------------------------------------------------------------------- rows


class Builder:
    """Makes the PE_DATA row of one input item (("t2i", captions row) or ("edit", (id, annotation)))."""

    def __init__(self, cfg: PEConfig, prompts: PEPromptSet, source_version: int, attempts_per_request: int):
        self.cfg, self.prompts, self.source_version = cfg, prompts, source_version
        self.retry_offset = attempts_per_request  # seed offset of a meaning retry: past the first try's seeds

    def row(self, row_id: str, task: str, status: str = STATUS_OK, **fields: Any) -> dict[str, Any]:
        row = {n: None for n in PE_DATA.names} | fields
        p_fine, p_short = row["p_fine"], row["p_short"]
        row.update(id=row_id, task=task, status=status, attempts=fields.get("attempts", 0),
                   strategies=list(fields.get("strategies") or []),
                   length_ratio=len(p_short) / len(p_fine) if p_fine and p_short is not None else None,
                   model=self.cfg.model, prompt_version=self.prompts.version, source_version=self.source_version,
                   created_at=dt.datetime.now(dt.UTC))
        return row

    def failed(self, item: tuple[str, Any], kind: str, error: str, **fields: Any) -> dict[str, Any]:
        task, payload = item
        row_id = payload["id"] if task == "t2i" else payload[0]
        return self.row(row_id, task, STATUS_FAILED, error_kind=kind, error=error, **fields)

    async def make(self, client: CaptionClient, item: tuple[str, Any]) -> dict[str, Any]:
        return await (self.t2i(client, item) if item[0] == "t2i" else self.edit(client, item))

    async def degrade(self, client: CaptionClient, request: str, payload: str, row_id: str,
                      p_fine: str) -> tuple[Outcome, int, list[str]]:
        """The degradation, asked again (new seeds) while the meaning check rejects it, up to
        meaning_retries times; returns the last outcome, attempts in all and the check's reasons."""
        attempts, reasons = 0, []
        for retry in range(self.cfg.meaning_retries + 1):
            out = await client.request(request, payload, row_id, seed_offset=retry * self.retry_offset)
            attempts += out.attempts
            if not out.ok:
                break
            text = out.value["p_short"] if "p_short" in out.value else out.value["prompt"]
            if not (reasons := meaning_check(text, p_fine)):
                break
        return out, attempts, reasons

    def _finish(self, item, out: Outcome, attempts: int, reasons: list[str], **fields: Any) -> dict[str, Any]:
        if not out.ok:
            return self.failed(item, out.error_kind, f"{out.kind}: {out.error}", attempts=attempts, **fields)
        row_id = item[1]["id"] if item[0] == "t2i" else item[1][0]
        status = STATUS_REJECTED if reasons else STATUS_OK
        return self.row(row_id, item[0], status, attempts=attempts, error_kind="meaning" if reasons else None,
                        error="; ".join(reasons) or None, **fields)

    async def t2i(self, client: CaptionClient, item) -> dict[str, Any]:
        cfg, row = self.cfg, item[1]
        fine = fine_prompt(row, draw(cfg, row["id"]).language)
        if fine is None:
            return self.failed(item, "no_caption", f"captions row is {row.get('caption_status')!r} with no usable caption")
        p_fine, kinds, language = fine
        base = dict(p_fine=p_fine, caption_kinds=kinds, language=language)
        cls = await client.request("classify", self.prompts.render("classify", p_fine=p_fine), row["id"])
        if not cls.ok:
            return self.failed(item, cls.error_kind, f"classify: {cls.error}", attempts=cls.attempts, **base)
        category = cls.value["category"]
        d = draw(cfg, row["id"], category)
        request = f"degrade.{len(d.strategies)}"
        steps = "\n".join(f"{i}. {cfg.strategies[s].instruction}" for i, s in enumerate(d.strategies, 1))
        payload = self.prompts.render("degrade", request, steps=steps, p_fine=p_fine, language=LANGUAGE_NAMES[language],
                                      ratio=f"{round(100 * cfg.difficulty[d.difficulty].target_ratio)}%")
        out, attempts, reasons = await self.degrade(client, request, payload, row["id"], p_fine)
        fields = dict(base, category=category, difficulty=d.difficulty, strategies=d.strategies)
        if out.ok:
            fields.update(p_short=out.value["p_short"], removed=out.value["removed"],
                          cot=build_cot(cfg, d.strategies, out.value["removed"], language))
        return self._finish(item, out, cls.attempts + attempts, reasons, **fields)

    async def edit(self, client: CaptionClient, item) -> dict[str, Any]:
        row_id, annotation = item[1]
        if not annotation or not annotation.strip():
            return self.failed(item, "no_caption", "empty edit annotation")
        payload = self.prompts.render("edit", p_fine=annotation)
        out, attempts, reasons = await self.degrade(client, "edit", payload, row_id, annotation)
        fields = dict(p_fine=annotation, language=language_of(annotation))
        if out.ok:
            fields.update(p_short=out.value["prompt"])
        return self._finish(item, out, attempts, reasons, **fields)


# --------------------------------------------------------------------------- inputs


def open_captions(uri: str) -> lance.LanceDataset:
    try:
        ds = lance.dataset(uri)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--captions {uri}: not a readable Lance table ({str(e).splitlines()[0]})") from e
    # columns added to the captions schema later (ocr_flag, ...) may be absent in an older table: null
    missing = [c for c in TRAINING_COLUMNS if c not in ds.schema.names and c not in ADDED_COLUMNS]
    if missing:
        raise ConfigError(f"--captions {uri}: not a captions table (captioning/schema.py); missing {', '.join(missing)}")
    return ds


def read_edits(cfg: PEConfig) -> list[tuple[str, str]]:
    """(edit:<id>, annotation) pairs from cfg.edits (.jsonl / .parquet / Lance)."""
    import polars as pl

    path = cfg.edits
    try:
        if path.endswith((".jsonl", ".ndjson")):
            df = pl.read_ndjson(path)
        elif path.endswith(".parquet"):
            df = pl.read_parquet(path)
        else:
            ds = lance.dataset(path)
            df = pl.from_arrow(ds.to_table(columns=[c for c in (cfg.edits_id_column, *cfg.edits_text_columns)
                                                    if c in ds.schema.names]))
    except Exception as e:  # noqa: BLE001 - any reader error: name the setting
        raise ConfigError(f"edits: cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    for field_name, col in [("edits_id_column", cfg.edits_id_column), *(("edits_text_columns", c) for c in cfg.edits_text_columns)]:
        if col not in df.columns:
            raise ConfigError(f"{field_name}: {path} has no column {col!r} (columns: {', '.join(df.columns)})")
    return [(f"edit:{i}", "\n\n".join(t.strip() for t in texts if t and t.strip()))
            for i, *texts in df.select([cfg.edits_id_column, *cfg.edits_text_columns]).iter_rows()]


def iter_items(ds: lance.LanceDataset, edits: list[tuple[str, str]], stored: dict[str, str],
               stats: RunStats) -> Iterator[tuple[str, Any]]:
    """Input items not yet done: captions rows (only the columns caption_variants reads), then edits."""
    columns = [c for c in TRAINING_COLUMNS if c in ds.schema.names]
    for batch in ds.scanner(columns=columns, batch_size=1024).to_batches():
        for row in batch.to_pylist():
            if stored.get(row["id"]) in DONE:
                stats.skipped += 1
            else:
                stats.todo += 1
                yield "t2i", row
    for pair in edits:
        if stored.get(pair[0]) in DONE:
            stats.skipped += 1
        else:
            stats.todo += 1
            yield "edit", pair


def run(cfg: PEConfig) -> RunStats:
    """Build (or resume) the PE table `cfg.output` from `cfg.captions` (+ `cfg.edits`)."""
    from flywheel.pe_llm import open_output

    prompts = PEPromptSet.load_pe(cfg.prompt_root, cfg.prompt_version)
    ccfg = cfg.caption_config(cfg.captions)
    ds = open_captions(cfg.captions)
    edits = read_edits(cfg) if cfg.edits else []
    stored = open_output(cfg.output, PE_DATA)
    stats = RunStats()
    builder = Builder(cfg, prompts, ds.version, ccfg.max_attempts)
    writer = CaptionWriter(ccfg, cfg.captions, ds.version, schema=PE_DATA, replace_if=REPLACE_IF)
    return run_rows(ccfg, prompts, iter_items(ds, edits, stored, stats), builder.make, builder.failed, writer,
                    stats, "pe data", cfg.progress)


def default_report(cfg: PEConfig) -> str | None:
    if cfg.report:
        return cfg.report
    return None if "://" in cfg.output else str(Path(cfg.output.rstrip("/") + ".report.html"))
