"""HTML report of a curation run, the same for every stage: rows per reject reason, a histogram
per score with the stage's thresholds drawn on it (so a threshold can be judged by eye before
``--rethreshold``), and example thumbnails (see :func:`_examples`)."""

from __future__ import annotations

import base64
import html
import io
import os

import lance
import numpy as np
import pyarrow as pa

from common.figures import fig_png

from .config import StageConfig
from .filters import FILTERS


def score_plots(cfg: StageConfig) -> dict[str, list[tuple[str, str]]]:
    """Numeric score column of the stage's filters -> [(threshold path, label)] drawn on it."""
    out: dict[str, list[tuple[str, str]]] = {}
    for name in cfg.filters:
        f = FILTERS[name]
        for c in f.columns:
            if c not in ("error", "category") and c != "phash":
                out.setdefault(c, [])
        for col, attr, label in f.plots:
            out[col].append((f"{f.th(name)}.{attr}", label))
    return out


def _get(obj, dotted: str):
    for p in dotted.split("."):
        obj = getattr(obj, p)
    return obj


def _png(fig) -> str:
    """A finished matplotlib figure (with its legend) as base64 PNG, closed."""
    fig.axes[0].legend(fontsize=8)
    return fig_png(fig)


def _hist_png(name: str, values: np.ndarray, kept: np.ndarray, cfg: StageConfig, lines) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 2.8), dpi=90)
    bins = np.histogram_bin_edges(values, bins=40)
    ax.hist(values[kept], bins=bins, color="#3b82f6", alpha=0.8, label="kept")
    ax.hist(values[~kept], bins=bins, color="#ef4444", alpha=0.6, label="rejected")
    for path, label in lines:
        x = float(_get(cfg.thresholds, path))
        ax.axvline(x, color="black", ls="--", lw=1.2)
        ax.text(x, ax.get_ylim()[1] * 0.92, f" {label} {x:g}", fontsize=8)
    ax.set_title(f"{name}  (n={len(values)})", fontsize=10)
    return _png(fig)


def _category_png(t, cfg: StageConfig) -> str | None:
    """Bars of the category distribution of the rows that reached the balance filter (before) and of
    the kept rows (after)."""
    if "balance" not in cfg.filters or "category" not in t.column_names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cat = np.array(t.column("category").to_pylist(), dtype=object)
    reason = np.array(t.column("reject_reason").to_pylist(), dtype=object)
    before = (reason == None) | (reason == "balance") | (reason == "semdedup")  # noqa: E711
    before &= cat != None  # noqa: E711
    after = (reason == None) & (cat != None)  # noqa: E711
    names = sorted(set(cat[before].tolist()))
    if not names:
        return None
    b = [int((cat[before] == n).sum()) for n in names]
    a = [int((cat[after] == n).sum()) for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=90)
    x = np.arange(len(names))
    ax.bar(x - 0.2, b, 0.4, label="before balance", color="#9ca3af")
    ax.bar(x + 0.2, a, 0.4, label="kept", color="#3b82f6")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_title("category distribution before / after", fontsize=10)
    return _png(fig)


# Thumbnails: examples per reject reason, kept rows nearest each threshold, duplicate clusters.
_PER_REASON, _PER_SCORE, _CLUSTERS, _PER_CLUSTER, _THUMB = 8, 6, 4, 5, 112


def _thumb(data: bytes | None, rotate: int) -> str | None:
    """A small JPEG (base64) of stored image bytes, upright; None when there are none."""
    if data is None:
        return None
    from .table import load_image

    try:
        im = load_image(data, rotate or 0, short_side=_THUMB)
    except ValueError:
        return None
    # A fresh RGB image, not the decoder's ImageFile: Pillow's save() of an ImageFile resolves the
    # current directory, which a `ray job submit` driver may no longer have (its working_dir package
    # can be collected by another node's agent on the same machine) — seen in tests/cluster.
    im = im.convert("RGB")
    im.thumbnail((_THUMB, _THUMB))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else html.escape(str(v))


def _examples(ds, cfg: StageConfig, plots: dict) -> str:
    """Strips of example thumbnails, drawn deterministically (by a hash of the id): per reject
    reason with the failing filter's scores; kept rows at the threshold end of each score (the
    borderline keeps a threshold change would flip first); a few dedup clusters, survivor first."""
    from .balance import draws
    from .table import read_images

    if (ds.schema.metadata or {}).get(b"store_image") == b"none":
        return "<p>No thumbnails: this table stores no images (scoring.store_image: none).</p>"
    names = ds.schema.names
    cols = ["id", "keep", "reject_reason", "rotate"] + [c for c in ("dup_of", "semdup_of", "semdup_similarity")
                                                       if c in names]
    score_cols = sorted({c for n in cfg.filters for c in FILTERS[n].columns if c in names and c != "error"})
    t = ds.to_table(columns=list(dict.fromkeys(cols + score_cols + ["error"])), with_row_id=True)
    if t.num_rows == 0:
        return ""
    d = {c: np.array(t.column(c).to_pylist(), dtype=object) for c in t.column_names}
    order = np.argsort(draws(d["id"], 0), kind="stable")
    strips: list[tuple[str, list[tuple[int, str]]]] = []  # (title, [(row, caption)])
    for reason in sorted({r for r in d["reject_reason"] if r}):
        rows = [i for i in order if d["reject_reason"][i] == reason][:_PER_REASON]
        shown = [c for c in FILTERS[reason].columns if c in d] if reason in FILTERS else []
        shown = {"broken": ["error"], "dedup": ["dup_of"], "semdedup": ["semdup_of", "semdup_similarity"]}.get(
            reason, shown)
        strips.append((f"rejected: {reason}", [(i, " ".join(f"{c} {_fmt(d[c][i])}" for c in shown
                                                            if d[c][i] is not None)) for i in rows]))
    kept = np.flatnonzero(d["keep"] == True)  # noqa: E712 - object array
    for col, lines in plots.items():
        if col not in d or not lines:
            continue
        vals = np.array([np.nan if d[col][i] is None else float(d[col][i]) for i in kept])
        ok = ~np.isnan(vals)
        if not ok.any():
            continue
        high_bad = lines[0][1] == "max"
        idx = kept[ok][np.argsort(-vals[ok] if high_bad else vals[ok], kind="stable")][:_PER_SCORE]
        strips.append((f"kept, {'highest' if high_bad else 'lowest'} {col}", [(i, f"{col} {_fmt(d[col][i])}") for i in idx]))
    for ref, sim, why in (("dup_of", None, "dedup"), ("semdup_of", "semdup_similarity", "semdedup")):
        if ref not in d:
            continue
        groups: dict[str, list[int]] = {}
        for i in order:
            if d[ref][i] is not None and d["reject_reason"][i] == why:
                groups.setdefault(d[ref][i], []).append(int(i))
        by_id = {v: k for k, v in enumerate(d["id"])}
        for head in sorted(groups, key=lambda h: (-len(groups[h]), h))[:_CLUSTERS]:
            members = [(by_id[head], "survivor")] if head in by_id else []
            members += [(i, "copy" + (f" sim {_fmt(d[sim][i])}" if sim else "")) for i in groups[head][:_PER_CLUSTER]]
            strips.append((f"{why} cluster ({len(groups[head])} copies)", members))
    want = sorted({i for _, items in strips for i, _ in items})
    rowids = t.column("_rowid").to_numpy()
    blobs = dict(zip(want, read_images(ds, [int(rowids[i]) for i in want]), strict=True)) if want else {}
    parts = []
    for title, items in strips:
        cells = []
        for i, text in items:
            img = _thumb(blobs.get(i), d["rotate"][i] if d["keep"][i] else 0)
            pic = (f"<img src='data:image/jpeg;base64,{img}' alt='{html.escape(d['id'][i])}'>" if img
                   else "<div class='noimg'>no image</div>")
            cells.append(f"<figure>{pic}<figcaption>{text}<br><span class='id'>{html.escape(d['id'][i][:10])}"
                         "</span></figcaption></figure>")
        parts.append(f"<h4>{html.escape(title)}</h4><div class='strip'>{''.join(cells)}</div>")
    return "".join(parts)


def write_report(uri: str, cfg: StageConfig, summary, storage_options: dict | None = None,
                 path: str | None = None) -> str:
    ds = lance.dataset(uri, storage_options=storage_options)
    plots = score_plots(cfg)
    cols = list(plots)
    extra = [c for c in ("category", "reject_reason") if c in ds.schema.names and c not in cols]
    t = ds.to_table(columns=cols + ["keep"] + extra)
    keep_all = t.column("keep").fill_null(False).to_numpy(zero_copy_only=False)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td><td>{100.0 * v / max(1, summary.rows):.1f}%</td></tr>"
                   for k, v in sorted(summary.reasons.items(), key=lambda kv: -kv[1]))
    figs = []
    for c in cols:
        col = t.column(c)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            continue  # a text score (e.g. a pair's instruction_language): counted by reject reason
        valid = col.is_valid().to_numpy(zero_copy_only=False)
        if not valid.any():
            figs.append(f"<div class='fig'><h4>{c}</h4><p>not computed (skipped or no input)</p></div>")
            continue
        vals = col.to_numpy(zero_copy_only=False)[valid].astype(np.float64)
        png = _hist_png(c, vals, keep_all[valid], cfg, plots[c])
        figs.append(f"<div class='fig'><img src='data:image/png;base64,{png}' alt='{c}'></div>")
    cat_png = _category_png(t, cfg)
    if cat_png:
        figs.append(f"<h3>category distribution</h3><div class='fig'><img src='data:image/png;base64,{cat_png}' "
                    "alt='category distribution'></div>")
    rate = summary.scored_now / summary.scoring_seconds if summary.scoring_seconds else 0.0
    examples = _examples(ds, cfg, plots)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{cfg.stage} report</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}} .fig{{display:inline-block;margin:6px}}
.strip{{display:flex;flex-wrap:wrap;gap:6px}} figure{{margin:0;width:{_THUMB + 8}px;font-size:11px}}
figure img{{max-width:{_THUMB}px;max-height:{_THUMB}px;display:block;border:1px solid #ddd}}
.noimg{{width:{_THUMB}px;height:{_THUMB // 2}px;background:#eee;color:#888;font-size:11px}} .id{{color:#888}}
figcaption{{overflow-wrap:anywhere}}</style>
</head><body><h2>{html.escape(cfg.stage)} — {html.escape(uri)} (version {summary.version})</h2>
<p>{summary.rows} rows; scored {summary.scored_now} this run at {rate:.1f} img/s;
threshold hash {cfg.threshold_hash()}.</p>
<table><tr><th>reason</th><th>rows</th><th>share</th></tr>{rows}</table>
<h3>Scores (blue kept, red rejected; dashed lines: thresholds)</h3>{''.join(figs)}
<h3>Examples (drawn by a hash of the id: the same rows on every run)</h3>{examples}</body></html>"""
    out = path or (uri.rstrip("/") + ".report.html" if "://" not in uri else f"{cfg.stage}.report.html")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(page)
    return out
