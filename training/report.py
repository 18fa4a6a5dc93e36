"""HTML report of a training run: loss / lr / throughput curves from metrics.jsonl and the smoke
sample, as embedded PNGs (matplotlib)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from common.figures import fig_png


def _png(fig) -> str:
    return fig_png(fig, dpi=110)


def write_report(metrics_jsonl: str | Path, out: str | Path, title: str, sample_png: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    last: dict[int, dict] = {}
    restarts = sorted({r["resumed_from"] for r in rows if r.get("resumed_from")})
    for r in rows:  # after a restart the re-run steps replace the first attempt's
        last[r["step"]] = r
    steps = sorted(last)
    fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
    for key in ("loss", "loss_texture", "loss_semantic"):
        if key in last[steps[0]]:
            ax[0].plot(steps, [last[s][key] for s in steps], label=key)
    for s in restarts:
        ax[0].axvline(s, color="grey", ls=":", lw=1)
    ax[0].set(title="flow-matching loss (all-reduced)", xlabel="step")
    ax[0].legend()
    ax[1].plot(steps, [last[s]["lr"] for s in steps])
    ax[1].set(title="learning rate", xlabel="step")
    ax[2].plot(steps, [last[s]["tokens_per_s"] for s in steps])
    ax[2].set(title="tokens/s (all workers)", xlabel="step")
    plots = _png(fig)
    tail = [last[s]["loss"] for s in steps[-10:]]
    summary = {"steps logged": len(steps), "last step": steps[-1], "loss (mean of last 10 logged)": f"{sum(tail) / len(tail):.4f}",
               "restarts from checkpoint at": ", ".join(map(str, restarts)) or "none",
               "median tokens/s": f"{sorted(last[s]['tokens_per_s'] for s in steps)[len(steps) // 2]:,.0f}",
               "non-embedding params": f"{last[steps[-1]]['non_embedding_params']:,}"}
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    sample = ""
    if sample_png and Path(sample_png).is_file():
        sample = (f"<h2>Smoke sample (Euler, CFG 4)</h2><img style='image-rendering:pixelated;height:192px' "
                  f"src='data:image/png;base64,{base64.b64encode(Path(sample_png).read_bytes()).decode()}'>")
    out = Path(out)
    out.write_text(f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
                   f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1><table>{table}</table>"
                   f"<img src='data:image/png;base64,{plots}'>{sample}</body>")
    return out
