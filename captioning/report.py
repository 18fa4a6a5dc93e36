"""Quality statistics of a captions table and an HTML report with embedded plots.

Language text is found through the schemas' language-named keys: every string under a key `en` or
`zh` (at any depth) belongs to that language. The checks here are statistics, not validity rules:
validity is the JSON schema's job.
"""

from __future__ import annotations

import html
import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from captioning.schema import CAPTION_TYPES, ROUTED_TYPES, STATUS_OK
from common.figures import fig_png

LANGS = ("en", "zh")
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# A quoted span: "...", “...”, 「...」, 『...』 or '...' with at least one character inside.
QUOTED = re.compile(r"\"[^\"]+\"|“[^”]+”|「[^」]+」|『[^』]+』|‘[^’]+’")


def texts_by_language(value: Any, lang: str | None = None) -> dict[str, list[str]]:
    """All strings under `en` / `zh` keys, at any depth, grouped by language."""
    out: dict[str, list[str]] = {k: [] for k in LANGS}
    if isinstance(value, dict):
        for k, v in value.items():
            for lk, texts in texts_by_language(v, k if k in LANGS else lang).items():
                out[lk] += texts
    elif isinstance(value, list):
        for v in value:
            for lk, texts in texts_by_language(v, lang).items():
                out[lk] += texts
    elif isinstance(value, str) and lang is not None:
        out[lang].append(value)
    return out


def compute_stats(table: pa.Table) -> dict[str, Any]:
    rows = table.to_pylist()
    ok = [r for r in rows if r["caption_status"] == STATUS_OK]
    lengths: dict[str, dict[str, list[int]]] = {t: {lang: [] for lang in LANGS} for t in CAPTION_TYPES}
    zh_total, zh_cjk = Counter(), Counter()
    text_total = text_quoted = 0
    for r in rows:
        for t in CAPTION_TYPES:
            raw = r[f"caption_{t}"]
            if raw is None:
                continue
            by_lang = texts_by_language(json.loads(raw))
            for lang in LANGS:
                joined = "\n".join(by_lang[lang])
                lengths[t][lang].append(len(joined))
            zh = "".join(by_lang["zh"])
            if zh.strip():
                zh_total[t] += 1
                zh_cjk[t] += bool(CJK.search(zh))
            if t == "text":
                text_total += 1
                text_quoted += bool(QUOTED.search("\n".join(by_lang["en"] + by_lang["zh"])))
    agreement = [r["ocr_agreement"] for r in rows if r.get("ocr_agreement") is not None]
    routed = [r for r in rows if r["route_json"] is not None]
    routing = {"general": len(routed)}
    routing.update({t: sum(bool(r[f"route_{t}"]) for r in routed) for t in ROUTED_TYPES.values()})
    return {
        "rows": len(rows),
        "ok": len(ok),
        "failed": len(rows) - len(ok),
        "failures": dict(Counter(r["caption_error_kind"] for r in rows if r["caption_status"] != STATUS_OK)),
        "routing": routing,
        "captions": {t: len(lengths[t]["en"]) for t in CAPTION_TYPES},
        "lengths": lengths,
        "length_summary": {t: {lang: _summary(v) for lang, v in d.items()} for t, d in lengths.items()},
        "zh_cjk_share": {t: (zh_cjk[t] / zh_total[t] if zh_total[t] else None) for t in CAPTION_TYPES},
        "text_quoted_share": text_quoted / text_total if text_total else None,
        "attempts_mean": statistics.fmean(r["attempts"] for r in rows) if rows else None,
        "ocr_agreement": agreement,
        "ocr_flagged": sum(bool(r.get("ocr_flag")) for r in rows),
    }


def _summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    s = sorted(values)
    return {"n": len(s), "mean": statistics.fmean(s), "median": statistics.median(s),
            "p95": s[min(len(s) - 1, int(0.95 * len(s)))], "max": s[-1]}


def stat_lines(stats: dict[str, Any]) -> list[str]:
    """The statistics as printable lines (the job's summary)."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [f"rows {stats['rows']}: {stats['ok']} ok, {stats['failed']} failed",
             "routing: " + ", ".join(f"{t}={n}" for t, n in stats["routing"].items())]
    for t in CAPTION_TYPES:
        parts = []
        for lang in LANGS:
            s = stats["length_summary"][t][lang]
            parts.append(f"{lang} median {s['median']:.0f} p95 {s['p95']} chars" if s else f"{lang} -")
        lines.append(f"{t}: {stats['captions'][t]} captions; " + "; ".join(parts)
                     + f"; zh with CJK {pct(stats['zh_cjk_share'][t])}")
    lines.append(f"text captions with quoted text: {pct(stats['text_quoted_share'])}")
    if stats["ocr_agreement"]:
        a = sorted(stats["ocr_agreement"])
        lines.append(f"OCR check of {len(a)} text captions: agreement median {statistics.median(a):.2f}, "
                     f"min {a[0]:.2f}; {stats['ocr_flagged']} flagged (ocr_flag)")
    if stats["failures"]:
        lines.append("failures: " + ", ".join(f"{k}={v}" for k, v in sorted(stats["failures"].items())))
    return lines


def _png(fig) -> str:
    return fig_png(fig, dpi=90)


def write_report(stats: dict[str, Any], path: str | Path, title: str = "captions") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    fig, axes = plt.subplots(len(LANGS), len(CAPTION_TYPES), figsize=(4 * len(CAPTION_TYPES), 5.5), squeeze=False)
    for j, t in enumerate(CAPTION_TYPES):
        for i, lang in enumerate(LANGS):
            ax, values = axes[i][j], stats["lengths"][t][lang]
            ax.hist(values, bins=20, color="tab:blue" if lang == "en" else "tab:red")
            ax.set_title(f"{t} / {lang} (n={len(values)})", fontsize=9)
            ax.set_xlabel("characters", fontsize=8)
    fig.suptitle("caption length per type and language")
    images.append(("Length distribution", _png(fig)))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    routing = stats["routing"]
    axes[0].bar(list(routing), list(routing.values()), color="tab:green")
    axes[0].set_title("routing: rows per caption type")
    failures = stats["failures"] or {"none": 0}
    axes[1].bar(list(failures), list(failures.values()), color="tab:red")
    axes[1].set_title("failed rows by reason")
    axes[1].tick_params(axis="x", rotation=30)
    shares = {f"zh CJK: {t}": v for t, v in stats["zh_cjk_share"].items() if v is not None}
    if stats["text_quoted_share"] is not None:
        shares["text: quoted"] = stats["text_quoted_share"]
    axes[2].barh(list(shares), [100 * v for v in shares.values()], color="tab:purple")
    axes[2].set_xlim(0, 100)
    axes[2].set_title("quality checks (% of captions)")
    images.append(("Routing, failures, quality checks", _png(fig)))

    if stats["ocr_agreement"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.hist(stats["ocr_agreement"], bins=20, range=(0, 1), color="tab:orange")
        ax.set_xlabel("character agreement of the transcription with OCR")
        ax.set_ylabel("text captions")
        ax.set_title(f"OCR agreement (n={len(stats['ocr_agreement'])}, flagged {stats['ocr_flagged']})")
        images.append(("OCR agreement of text captions", _png(fig)))

    body = "".join(f"<li>{html.escape(line)}</li>" for line in stat_lines(stats))
    figs = "".join(f"<h2>{html.escape(h)}</h2><img src='data:image/png;base64,{b64}'/>" for h, b64 in images)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h1>Caption report: {html.escape(title)}</h1>"
            f"<ul>{body}</ul>{figs}</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
