"""Error attribution: each failing case -> the pre-training, prompt-engineering or RL track.

For a failure's prompt the retrieval engine measures the pool's density around it (relevant hits
of the hybrid search: a full-text match or a caption embedding within ``min_similarity``) and the
count of its category, against the pool's typical values (median density of sampled pool captions
searched the same way; median rows per category):

* **scarce** (density or category count below its ratio of typical) -> ``pretrain``: the model has
  not seen enough such data;
* dense, and the prompt is short / vague / under-specified -> ``prompt``: prompt rules plus an LLM
  judge (the served model, through the captioning client) decide; the judge's answer is stored;
* dense and clear, yet failing -> ``rl``: an alignment / preference problem for the reward side.

Every decision lands in the `routes` table with its evidence. When the LLM server is down, the
judge-dependent cases are stored as ``pending`` and retried on the next run; with no server
configured (``llm.server: null``) the rules alone decide. Decisions already made are kept unless
the attribution config changed (its hash is on every route).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from flywheel.config import FlywheelConfig
from flywheel.index import PoolIndex, TextEmbedder
from flywheel.llm import LLM
from flywheel.schema import ROUTE_PENDING, ROUTES
from flywheel.signals import failed
from flywheel.store import open_table, read, upsert

CASE_COLUMNS = ["case_id", "source", "task", "prompt", "category", "metric", "score", "rating", "complaint"]


@dataclass
class Density:
    hits: pa.Table
    relevant: np.ndarray

    @property
    def count(self) -> int:
        return int(self.relevant.sum())


def density(idx: PoolIndex, prompt: str, vec: np.ndarray, cfg: FlywheelConfig, exclude: str | None = None) -> Density:
    return _density(idx.hybrid(prompt, vec, cfg.attribution.search_k), cfg, exclude)


def _density(hits: pa.Table, cfg: FlywheelConfig, exclude: str | None) -> Density:
    if exclude is not None:
        hits = hits.filter(pa.compute.not_equal(hits["id"], exclude))
    rel = hits["fts_match"].to_numpy(zero_copy_only=False) | \
        (hits["similarity"].to_numpy() >= cfg.attribution.min_similarity)
    return Density(hits, rel)


def typical_density(idx: PoolIndex, emb: TextEmbedder, cfg: FlywheelConfig) -> float:
    """Median density of pool captions searched like a prompt (a deterministic sample, each row
    excluded from its own hits)."""
    t = read(idx.tbl, ["id", "text", "text_hash"])
    order = np.argsort(np.asarray(t["text_hash"].to_pylist()))[: cfg.attribution.density_sample]
    ids, texts = [t["id"][int(i)].as_py() for i in order], [t["text"][int(i)].as_py() for i in order]
    if not ids:
        return 0.0
    vecs = emb.embed(texts)
    hits = idx.hybrid_many(texts, vecs, cfg.attribution.search_k)  # one batched vector query for the sample
    return float(np.median([_density(h, cfg, exclude=i).count for i, h in zip(ids, hits, strict=True)]))


def prompt_rules(prompt: str, cfg: FlywheelConfig) -> list[str]:
    words = re.findall(r"\w+", prompt.lower())
    flags = [f"too_short:{len(words)}<{cfg.attribution.min_prompt_words}"] if len(words) < cfg.attribution.min_prompt_words else []
    flags += [f"vague_word:{w}" for w in sorted(set(words) & cfg.attribution.vague)]
    return flags


@dataclass
class AttributionSummary:
    failing: int = 0
    considered: int = 0
    routed: dict[str, int] = field(default_factory=dict)
    pending: int = 0
    written: int = 0

    def text(self) -> str:
        per = ", ".join(f"{k} {v}" for k, v in sorted(self.routed.items())) or "none"
        return (f"attribution: {self.failing} failing cases, {self.considered} to decide -> {per}; "
                f"{self.pending} pending (LLM judge), {self.written} routes written")


def attribute(cfg: FlywheelConfig, db, emb: TextEmbedder, llm: LLM | None) -> AttributionSummary:
    s = AttributionSummary()
    cases = read(open_table(db, "cases"), CASE_COLUMNS).to_pylist()
    failing = [c for c in cases if failed(c["source"], c["metric"], c["score"], c["rating"], cfg.failure)]
    s.failing = len(failing)
    routes = open_table(db, "routes")
    h = cfg.attribution_hash()
    done = {r["case_id"]: r for r in read(routes, ["case_id", "status", "config_hash"]).to_pylist()}
    todo = [c for c in failing if c["case_id"] not in done or done[c["case_id"]]["status"] == ROUTE_PENDING
            or done[c["case_id"]]["config_hash"] != h]
    s.considered = len(todo)
    if not todo:
        return s
    idx = PoolIndex(db, cfg.index)
    typical = typical_density(idx, emb, cfg)
    cat_counts = idx.category_counts()
    typical_cat = float(np.median(list(cat_counts.values()))) if cat_counts else 0.0
    vecs = emb.embed([c["prompt"] for c in todo])
    # evaluated prompts near a failing one: does the capability exist (they pass)?
    evals = [c for c in cases if c["source"] == "eval"]
    evec = emb.embed([c["prompt"] for c in evals]) if evals else np.zeros((0, vecs.shape[1]), np.float32)
    a = cfg.attribution
    rows, judge_req = [], []
    for c, v in zip(todo, vecs, strict=True):
        d = density(idx, c["prompt"], v, cfg)
        cat = c["category"]
        cnt = cat_counts.get(cat, 0) if cat else None
        scarce = d.count < a.scarce_ratio * typical or (cat is not None and cnt < a.category_scarce_ratio * typical_cat)
        sim = evec @ v if len(evals) else np.zeros(0)
        similar = [e for e, x in zip(evals, sim, strict=True) if x >= a.similar_case_similarity and e["case_id"] != c["case_id"]]
        passes = [not failed("eval", e["metric"], e["score"], None, cfg.failure) for e in similar]
        nb = d.hits.slice(0, a.neighbours)
        row = dict(case_id=c["case_id"], density=d.count, typical_density=typical, category_count=cnt,
                   typical_category_count=typical_cat if cat else None, scarce=scarce,
                   neighbour_ids=nb["id"].to_pylist(), neighbour_scores=nb["similarity"].to_pylist(),
                   similar_case_ids=[e["case_id"] for e in similar][:20],
                   similar_pass_rate=float(np.mean(passes)) if passes else None,
                   rule_flags=prompt_rules(c["prompt"], cfg), config_hash=h, index_version=idx.version)
        evidence = f"density {d.count} vs typical {typical:g}" + (f", category '{cat}' {cnt} vs typical {typical_cat:g}" if cat else "")
        if scarce:
            row.update(status="routed", track="pretrain", reason=f"scarce: {evidence}", actions=ROUTE_PENDING)
        elif llm is None:  # no judge configured: the prompt rules decide alone
            row.update(status="routed", track="prompt" if row["rule_flags"] else "rl",
                       reason=f"dense ({evidence}); rules: {', '.join(row['rule_flags']) or 'none fired'}")
        else:
            row.update(status=ROUTE_PENDING, reason=f"dense ({evidence}); awaiting the LLM judge")
            judge_req.append((c["case_id"], {"prompt": c["prompt"], "task": c["task"],
                                             "complaint": c["complaint"] or (f"{c['metric']} = {c['score']}" if c["score"] is not None else "rating " + str(c["rating"])),
                                             "rule_flags": ", ".join(row["rule_flags"]) or "none"}))
        rows.append(row)
    answers, errors = llm.ask("judge", judge_req) if llm is not None else ({}, {})
    for row in rows:
        cid = row["case_id"]
        if cid in answers:
            ans = answers[cid]
            track = "prompt" if ans["verdict"] == "under_specified" else "rl"
            good = row["similar_pass_rate"]
            row.update(status="routed", track=track, judge_answer=json.dumps(ans, ensure_ascii=False),
                       reason=row["reason"].replace("awaiting the LLM judge", f"judge: {ans['verdict']} ({ans['reason']})")
                       + (f"; similar prompts pass {good:.0%}" if good is not None else ""))
        elif cid in errors:
            row["judge_error"] = errors[cid][:500]
    now = datetime.now(UTC)
    for row in rows:
        row["routed_at"] = now
        if row["status"] == "routed":
            s.routed[row["track"]] = s.routed.get(row["track"], 0) + 1
        else:
            s.pending += 1
    s.written = upsert(routes, pa.Table.from_pylist(rows, schema=ROUTES),
                       compare=("status", "track", "config_hash", "judge_error"))
    return s
