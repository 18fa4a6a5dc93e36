"""Matplotlib figures for the HTML reports every job writes (curation, captioning, PE data, flywheel,
training): rendered off-screen and embedded as base64 PNG, so a report is one self-contained file."""

from __future__ import annotations

import base64
import io


def fig_png(fig, dpi: int = 100) -> str:
    """A finished figure as base64 PNG (tight layout), closed so long runs do not accumulate them."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")
