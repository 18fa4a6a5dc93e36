"""What each track does with its routed cases.

* pre-training: retrieve the relevant pool items around the failed prompt (rows rejected only by
  quota / balancing included, edit pairs with their base image id) and ask the served LLM for
  diverse prompt variants of the same concept (bounded by ``pretrain.max_variants``, de-duplicated);
  all of it goes to the review `queue` with its provenance. While the LLM is down the route's
  ``actions`` stays ``pending`` and the variants are asked for again next run.
* RL: a `preferences` record per case (prompt, the bad image as the rejected side, the reason).
* prompt engineering: the cases wait in `prompt_rewrites` for the prompt enhancer;
  :func:`enhance_prompts` is the call point (issue 15 connects jobs/enhance_prompts.py to it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from flywheel.config import FlywheelConfig
from flywheel.index import PoolIndex, TextEmbedder
from flywheel.llm import LLM
from flywheel.schema import PREFERENCES, PROMPT_REWRITES, QUEUE, ROUTE_PENDING, ROUTES
from flywheel.store import existing, open_table, read, sha1, upsert


@dataclass
class TrackSummary:
    queued_items: int = 0
    variants: int = 0
    pending_cases: int = 0
    preferences: int = 0
    prompt_cases: int = 0

    def text(self) -> str:
        return (f"tracks: {self.queued_items} items queued for review ({self.variants} prompt variants), "
                f"{self.pending_cases} pre-training cases wait for the LLM; {self.preferences} preference "
                f"records; {self.prompt_cases} cases await the prompt enhancer")


def _routed(db, track: str, where: str = "") -> list[dict]:
    return read(open_table(db, "routes"), None, f"status = 'routed' AND track = '{track}'{where}").to_pylist()


def _cases(db, ids: list[str], columns: list[str]) -> dict[str, dict]:
    t = existing(open_table(db, "cases"), "case_id", ids, tuple(c for c in columns if c != "case_id"))
    return {r["case_id"]: r for r in t.to_pylist()}


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


def retrieve(idx: PoolIndex, prompt: str, vec: np.ndarray, cfg: FlywheelConfig) -> pa.Table:
    """Relevant pool items: hybrid hits (full-text match or caption cosine >= min_similarity) and
    image-embedding hits (cosine >= min_similarity); full-text matches first, then by similarity."""
    k = cfg.pretrain.neighbours
    h = idx.hybrid(prompt, vec, max(k, cfg.attribution.search_k))
    keep = h["fts_match"].to_numpy(zero_copy_only=False) | (h["similarity"].to_numpy() >= cfg.attribution.min_similarity)
    rows = {r["id"]: r for r in h.filter(pa.array(keep)).to_pylist()}
    if idx.count("has_image_vector = true"):
        for r in idx.images(vec, k).to_pylist():
            if r["similarity"] >= cfg.attribution.min_similarity and r["id"] not in rows:
                rows[r["id"]] = {**r, "fts_match": False}
    ranked = sorted(rows.values(), key=lambda r: (not r["fts_match"], -r["similarity"], r["id"]))[:k]
    return pa.Table.from_pylist(ranked) if ranked else pa.table({"id": pa.array([], pa.string())})


def pretrain(cfg: FlywheelConfig, db, emb: TextEmbedder, llm: LLM | None) -> TrackSummary:
    s = TrackSummary()
    routes = _routed(db, "pretrain", f" AND actions = '{ROUTE_PENDING}'")
    if not routes:
        return s
    cases = _cases(db, [r["case_id"] for r in routes], ["case_id", "prompt", "category"])
    idx = PoolIndex(db, cfg.index)
    vecs = emb.embed([cases[r["case_id"]]["prompt"] for r in routes])
    now = datetime.now(UTC)
    items = []
    for r, v in zip(routes, vecs, strict=True):
        c = cases[r["case_id"]]
        for rank, n in enumerate(retrieve(idx, c["prompt"], v, cfg).to_pylist()):
            prov = {"query": c["prompt"], "rank": rank, "fts_match": n["fts_match"], "index_version": idx.version,
                    "pool_version": n["pool_version"]}
            items.append(dict(item_id=sha1(c["case_id"], n["kind"], n["id"]), case_id=c["case_id"],
                              kind="edit_pair" if n["kind"] == "edit_pair" else "pool_item", pool=n["pool"],
                              pool_id=n["id"], base_id=n["base_id"], text=n["text"], category=c["category"],
                              source=f"retrieval:{n['pool']}", similarity=n["similarity"], keep=n["keep"],
                              reject_reason=n["reject_reason"], provenance=json.dumps(prov), created_at=now))
    answers, errors = ({}, {}) if llm is None or cfg.pretrain.max_variants == 0 else llm.ask(
        "variants", [(r["case_id"], {"prompt": cases[r["case_id"]]["prompt"], "max_variants": cfg.pretrain.max_variants,
                                     "category": cases[r["case_id"]]["category"] or "unknown"}) for r in routes])
    done = []
    for r in routes:
        c = cases[r["case_id"]]
        seen = {normalise(c["prompt"])}
        for text in answers.get(c["case_id"], {}).get("variants", []):
            key = normalise(text)
            if not key or key in seen or len(seen) > cfg.pretrain.max_variants:
                continue
            seen.add(key)
            prov = {"from_prompt": c["prompt"], "model": cfg.llm.model, "server": cfg.llm.server,
                    "template": "flywheel/prompts/variants.txt"}
            items.append(dict(item_id=sha1(c["case_id"], "prompt_variant", key), case_id=c["case_id"],
                              kind="prompt_variant", text=text.strip(), category=c["category"],
                              source=f"llm:{cfg.llm.model}", provenance=json.dumps(prov), created_at=now))
            s.variants += 1
        if c["case_id"] in answers or llm is None or cfg.pretrain.max_variants == 0:
            done.append({**r, "actions": "done"})
        else:
            s.pending_cases += 1
            if c["case_id"] in errors:
                done.append({**r, "judge_error": errors[c["case_id"]][:500]})  # why variants wait
    s.queued_items = upsert(open_table(db, "queue"), pa.Table.from_pylist(items, schema=QUEUE))
    # the route says "done" only after its items are committed: a kill in between redoes the case
    upsert(open_table(db, "routes"), pa.Table.from_pylist(done, schema=ROUTES), compare=("actions", "judge_error"))
    return s


def preferences(db) -> int:
    """RL track: one preference record per routed case (the bad image is the rejected side)."""
    routes = _routed(db, "rl")
    have = set(existing(open_table(db, "preferences"), "case_id", [r["case_id"] for r in routes])["case_id"].to_pylist())
    ids = [r["case_id"] for r in routes if r["case_id"] not in have]
    if not ids:
        return 0
    cases_tbl = open_table(db, "cases")
    ds = cases_tbl.to_lance()
    t = ds.to_table(columns=["case_id", "prompt", "task", "complaint", "metric", "score", "rating", "checkpoint"],
                    filter="case_id IN (" + ", ".join(f"'{i}'" for i in ids) + ")", with_row_id=True)
    blobs = {col: dict(ds.read_blobs(col, ids=t["_rowid"].to_pylist())) for col in ("generated_image", "source_image")}
    now = datetime.now(UTC)
    rows = [dict(case_id=r["case_id"], prompt=r["prompt"], task=r["task"],
                 rejected_image=blobs["generated_image"].get(r["_rowid"]) or None,
                 source_image=blobs["source_image"].get(r["_rowid"]) or None,
                 reason=r["complaint"] or (f"{r['metric']} = {r['score']}" if r["score"] is not None else f"rating {r['rating']}"),
                 checkpoint=r["checkpoint"], created_at=now) for r in t.to_pylist()]
    return upsert(open_table(db, "preferences"), pa.Table.from_pylist(rows, schema=PREFERENCES))


def prompt_cases(db) -> int:
    """Prompt track: routed cases wait in `prompt_rewrites` (status awaiting_enhancer)."""
    routes = _routed(db, "prompt")
    cases = _cases(db, [r["case_id"] for r in routes], ["case_id", "prompt"])
    now = datetime.now(UTC)
    rows = [dict(case_id=i, prompt=c["prompt"], status="awaiting_enhancer", updated_at=now) for i, c in cases.items()]
    return upsert(open_table(db, "prompt_rewrites"), pa.Table.from_pylist(rows, schema=PROMPT_REWRITES))


Rewriter = Callable[[list[dict], str, str], list[str | None]]
"""(cases [{case_id, prompt}], server URL, model) -> one rewritten prompt (or None) per case."""


def enhance_prompts(db, server: str, model: str, rewrite: Rewriter) -> int:
    """The prompt-engineering track's call point: hand the cases awaiting a rewrite to the prompt
    enhancer (issue 15's, through an OpenAI-compatible `server` serving `model`) and record each
    rewrite (or its failure). Returns rows written."""
    waiting = read(open_table(db, "prompt_rewrites"), ["case_id", "prompt"], "status = 'awaiting_enhancer'").to_pylist()
    if not waiting:
        return 0
    out = rewrite(waiting, server, model)
    now = datetime.now(UTC)
    rows = [dict(case_id=c["case_id"], prompt=c["prompt"], status="rewritten" if r else "failed", rewrite=r or None,
                 model=model, error=None if r else "the enhancer returned nothing", updated_at=now)
            for c, r in zip(waiting, out, strict=True)]
    return upsert(open_table(db, "prompt_rewrites"), pa.Table.from_pylist(rows, schema=PROMPT_REWRITES),
                  compare=("status", "rewrite"))
