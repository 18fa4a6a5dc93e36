"""The nightly rebuild: ingest -> refresh the index -> attribute -> run the tracks -> queue for
review -> merge approved items into the next training-mixture version -> HTML report.

Every step writes only what is new (flywheel.store.upsert), one commit per table and step, so a
second run on the same inputs writes nothing (no new Lance version anywhere), and a run killed at any
point, started again, finishes the missing writes and ends where an uninterrupted run would. A
`runs` row is written only by a night that changed something.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

from common.figures import fig_png
from flywheel.attribution import attribute
from flywheel.config import FlywheelConfig
from flywheel.index import TABLE as INDEX_TABLE
from flywheel.index import PoolIndex, TextEmbedder, build_index
from flywheel.llm import LLM
from flywheel.schema import MIXTURE, RUNS, TABLES
from flywheel.signals import ingest
from flywheel.store import connect, delete_keys, existing, open_table, read, sha1, upsert
from flywheel.tracks import enhance_prompts, preferences, pretrain, prompt_cases


def versions(db) -> dict[str, int]:
    names = set(db.list_tables().tables)
    return {n: db.open_table(n).version for n in [*TABLES, INDEX_TABLE] if n in names}


def latest_reviews(db) -> dict[str, dict]:
    return {r["item_id"]: r for r in read(open_table(db, "reviews")).to_pylist()}


def merge_mixture(cfg: FlywheelConfig, db, run_id: str) -> tuple[int, int]:
    """Approved queue items not yet in the mixture are added with their lineage (pool table and
    version, case, reviewer); items whose decision turned to reject are removed. One commit each."""
    reviews = latest_reviews(db)
    mix = open_table(db, "mixture")
    approved = [i for i, r in reviews.items() if r["decision"] == "approve"]
    have = set(existing(mix, "item_id", approved)["item_id"].to_pylist())
    new = [i for i in approved if i not in have]
    rows = []
    if new:
        for q in existing(open_table(db, "queue"), "item_id", new,
                          ("case_id", "kind", "pool", "pool_id", "base_id", "text", "provenance")).to_pylist():
            r, prov = reviews[q["item_id"]], json.loads(q["provenance"] or "{}")
            pool = cfg.pools.get(q["pool"] or "")
            rows.append(dict(q, pool_uri=pool.curated if pool else None, pool_version=prov.get("pool_version"),
                             reviewer=r["reviewer"], reviewed_at=r["reviewed_at"], run_id=run_id))
    added = upsert(mix, pa.Table.from_pylist(rows, schema=MIXTURE))
    removed = delete_keys(mix, [i for i, r in reviews.items() if r["decision"] == "reject"])
    return added, removed


def run_enhancer(cfg: FlywheelConfig, db) -> str:
    """The served prompt enhancer rewrites the cases awaiting it (flywheel/enhance.py). An outage
    leaves them awaiting for the next night rather than failing the run."""
    from captioning.client import ServerGone, ServerUnreachable
    from flywheel.enhance import rewrite_cases

    pe = cfg.prompt_enhancer
    try:
        n = enhance_prompts(db, pe.server, pe.model, rewrite_cases)
    except (ServerUnreachable, ServerGone) as e:
        return f"prompt enhancer: unreachable, cases stay awaiting ({e})"
    return f"prompt enhancer: {n} rewrites recorded"


@dataclass
class NightlySummary:
    lines: list[str] = field(default_factory=list)
    changed: dict[str, int] = field(default_factory=dict)
    run_id: str = ""
    seconds: float = 0.0

    def text(self) -> str:
        what = ", ".join(f"{k} +{v}" for k, v in self.changed.items()) or "nothing changed (a quiet night)"
        return "\n".join(self.lines + [f"nightly {self.run_id}: {what} in {self.seconds:.1f}s"])


def run_nightly(cfg: FlywheelConfig, progress: bool = False, step_log=print) -> NightlySummary:
    t0 = time.monotonic()
    db = connect(cfg.workdir)
    before = versions(db)
    s = NightlySummary(run_id=sha1(before, cfg.attribution_hash(), n=12))

    def step(name, fn):
        step_log(f"[{time.monotonic() - t0:6.1f}s] {name} ...")
        out = fn()
        text = out.text() if hasattr(out, "text") else str(out)
        s.lines.append(text)
        step_log(f"[{time.monotonic() - t0:6.1f}s] {text}")
        return out

    emb = TextEmbedder(cfg.index.clip)
    llm = LLM(cfg.llm, cfg.pretrain.max_variants) if cfg.llm.server else None
    step("ingest signals", lambda: ingest(db, cfg.signals))
    step("refresh the pool index", lambda: build_index(cfg, db, progress))
    step("attribute failures", lambda: attribute(cfg, db, emb, llm))
    step("pre-training track", lambda: pretrain(cfg, db, emb, llm))
    step("RL track", lambda: f"RL track: {preferences(db)} new preference records")
    step("prompt track", lambda: f"prompt track: {prompt_cases(db)} cases newly await the prompt enhancer")
    if cfg.prompt_enhancer.server:
        step("prompt enhancer", lambda: run_enhancer(cfg, db))
    added, removed = step("merge approved items", lambda: merge_mixture(cfg, db, s.run_id))
    s.lines[-1] = f"mixture: {added} approved items merged, {removed} withdrawn"
    after = versions(db)
    s.changed = {n: after[n] - before.get(n, 0) for n in after if after[n] != before.get(n)}
    if s.changed:
        counts = {n: db.open_table(n).count_rows() for n in after}
        upsert(open_table(db, "runs"), pa.Table.from_pylist([dict(
            run_id=s.run_id, started_at=datetime.now(UTC), counts=json.dumps(counts), versions=json.dumps(versions(db)))],
            schema=RUNS))
    s.seconds = time.monotonic() - t0
    write_report(cfg, db, s)
    return s


# --------------------------------------------------------------------------- report
def _png(fig) -> str:
    return "<img src='data:image/png;base64," + fig_png(fig) + "'>"


def _bar(title: str, data: dict[str, float], line: float | None = None, label: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 2.9), dpi=90)
    keys = list(data)[:30]
    ax.bar(range(len(keys)), [data[k] for k in keys], color="#3b82f6")
    ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
    if line is not None:
        ax.axhline(line, color="black", ls="--", lw=1)
        ax.text(0, line, f" {label} {line:g}", fontsize=8, va="bottom")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def write_report(cfg: FlywheelConfig, db, s: NightlySummary) -> str:
    routes = read(open_table(db, "routes"), ["track", "status", "scarce", "density", "typical_density"]).to_pylist()
    per_track: dict[str, int] = {}
    for r in routes:
        k = r["track"] if r["status"] == "routed" else "pending"
        per_track[k] = per_track.get(k, 0) + 1
    charts = [_bar("routes per track", per_track)]
    if INDEX_TABLE in db.list_tables().tables:
        cats = dict(sorted(PoolIndex(db, cfg.index).category_counts().items(), key=lambda kv: kv[1]))
        if cats:
            median = sorted(cats.values())[len(cats) // 2]
            charts.append(_bar("pool rows per category (scarcest first)", cats,
                               cfg.attribution.category_scarce_ratio * median, "scarce below"))
    queue = read(open_table(db, "queue"), ["item_id", "kind"]).to_pylist()
    reviews = latest_reviews(db)
    thr = {"queued": len(queue), "reviewed": len(reviews),
           "approved": sum(r["decision"] == "approve" for r in reviews.values()),
           "rejected": sum(r["decision"] == "reject" for r in reviews.values()),
           "in mixture": open_table(db, "mixture").count_rows()}
    charts.append(_bar("review queue and throughput", thr))
    runs = sorted(read(open_table(db, "runs")).to_pylist(), key=lambda r: r["started_at"])[-10:]
    hist = "".join(f"<tr><td>{html.escape(r['run_id'])}</td><td>{r['started_at']:%Y-%m-%d %H:%M}</td>"
                   f"<td>{html.escape(r['counts'])}</td></tr>" for r in reversed(runs))
    changed = "".join(f"<li>{html.escape(k)}: {v} new version(s)</li>" for k, v in s.changed.items()) or \
        "<li>nothing changed since the last run</li>"
    doc = (f"<!doctype html><meta charset='utf-8'><title>flywheel nightly</title>"
           "<style>body{font:14px sans-serif;margin:2em} img{margin:4px} td{padding:2px 8px}</style>"
           f"<h1>Data flywheel: nightly run {html.escape(s.run_id)}</h1>"
           f"<pre>{html.escape(s.text())}</pre><h2>What changed since the last run</h2><ul>{changed}</ul>"
           f"<h2>Charts</h2>{''.join(charts)}<h2>Recent runs</h2><table>{hist}</table>")
    path = cfg.report_path
    if "://" not in path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return path
