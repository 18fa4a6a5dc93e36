"""Difficulty control of the PE data: statistics of a PE_DATA table and an HTML report with embedded
plots (length ratio P_short / P_fine per difficulty, strategies per category, languages, categories,
statuses and reasons)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import lance
import polars as pl

from common.figures import fig_png
from flywheel.pe_config import CATEGORIES, DIFFICULTIES
from flywheel.pe_schema import STATUS_OK


def compute_stats(uri: str) -> dict[str, Any]:
    df = pl.from_arrow(lance.dataset(uri).to_table(columns=[
        "id", "task", "status", "error_kind", "category", "language", "difficulty", "strategies", "length_ratio"]))
    ok = df.filter(pl.col("status") == STATUS_OK)
    t2i = ok.filter(pl.col("task") == "t2i")

    def counts(frame: pl.DataFrame, col: str) -> dict[str, int]:
        return {str(k): int(v) for k, v in frame.group_by(col).len().sort(col, nulls_last=True).iter_rows()}

    ratios = {d: t2i.filter(pl.col("difficulty") == d)["length_ratio"].drop_nulls().to_list() for d in DIFFICULTIES}
    per_cat = (t2i.explode("strategies").group_by("category", "strategies").len()
               .rename({"strategies": "strategy"}).drop_nulls())
    return {
        "rows": df.height, "statuses": counts(df, "status"), "tasks": counts(df, "task"),
        "reasons": counts(df.filter(pl.col("error_kind").is_not_null()), "error_kind"),
        "categories": counts(t2i, "category"), "languages": counts(ok, "language"),
        "difficulties": counts(t2i, "difficulty"), "ratios": ratios,
        "ratio_median": {d: (sorted(v)[len(v) // 2] if v else None) for d, v in ratios.items()},
        "strategies": {(c, s): int(n) for c, s, n in per_cat.iter_rows()},
    }


def stat_lines(stats: dict[str, Any]) -> list[str]:
    fmt = lambda d: ", ".join(f"{k}={v}" for k, v in d.items()) or "none"  # noqa: E731
    med = ", ".join(f"{d} {v:.2f}" for d, v in stats["ratio_median"].items() if v is not None) or "none"
    return [f"rows {stats['rows']}: {fmt(stats['statuses'])} (tasks: {fmt(stats['tasks'])})",
            f"not ok by reason: {fmt(stats['reasons'])}",
            f"categories: {fmt(stats['categories'])}; languages: {fmt(stats['languages'])}",
            f"difficulties: {fmt(stats['difficulties'])}; median length ratio P_short/P_fine: {med}"]


def write_report(stats: dict[str, Any], path: str | Path, title: str = "PE data") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    images = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for d in DIFFICULTIES:
        if stats["ratios"][d]:
            ax.hist(stats["ratios"][d], bins=20, range=(0, 1.2), alpha=0.6, label=f"{d} (n={len(stats['ratios'][d])})")
    ax.set_xlabel("len(P_short) / len(P_fine)")
    ax.legend()
    ax.set_title("length ratio per difficulty")
    images.append(("Length ratio P_short / P_fine", fig_png(fig, dpi=90)))

    names = sorted({s for _, s in stats["strategies"]})
    grid = np.array([[stats["strategies"].get((c, s), 0) for c in CATEGORIES] for s in names]).reshape(len(names), len(CATEGORIES))
    fig, ax = plt.subplots(figsize=(6, 0.35 * max(len(names), 4) + 1))
    ax.imshow(grid, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(CATEGORIES)), CATEGORIES, rotation=20)
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7)
    ax.set_title("strategies applied per category (ok rows)")
    images.append(("Strategies per category", fig_png(fig, dpi=90)))

    panels = [("languages", "language (ok rows)"), ("categories", "category (ok t2i rows)"),
              ("statuses", "status"), ("reasons", "not ok by reason")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        data = stats[key] or {"none": 0}
        ax.bar(list(data), list(data.values()))
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    images.append(("Languages, categories, statuses", fig_png(fig, dpi=90)))

    body = "".join(f"<li>{html.escape(line)}</li>" for line in stat_lines(stats))
    figs = "".join(f"<h2>{html.escape(h)}</h2><img src='data:image/png;base64,{b64}'/>" for h, b64 in images)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
                   f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1><ul>{body}</ul>{figs}</body></html>")
    return out
