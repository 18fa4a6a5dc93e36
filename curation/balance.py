"""Category rebalancing for the SFT distribution filter (stage 6): which candidate rows to keep so
the categories follow a target distribution. Pure numpy; deterministic from hash(id, seed), so a
rerun, a resumed run or another worker count keeps exactly the same rows.

* ``cap`` (MetaCLIP's balancing): keep each row of a category with ``count`` rows with probability
  min(1, cap / count) — rare categories whole, frequent ones thinned to about ``cap``.
* ``proportions``: the largest subset whose category shares equal ``targets``: N = min over
  categories of count / share, each category keeps its floor(N * share) rows with the lowest draws.
"""

from __future__ import annotations

import hashlib

import numpy as np

NO_CATEGORY = "<none>"


def draws(ids, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per id, fixed by (id, seed)."""
    salt = str(seed).encode() + b"\0"
    return np.array([int.from_bytes(hashlib.blake2b(salt + str(i).encode(), digest_size=8).digest()) for i in ids],
                    np.float64) / 2.0**64


def rebalance(ids, categories, rule) -> np.ndarray:
    """Keep mask over the rows (``rule``: :class:`curation.config.BalanceRule`)."""
    cats = np.array([NO_CATEGORY if c is None else str(c) for c in categories], dtype=object)
    n = len(cats)
    if n == 0:
        return np.zeros(0, bool)
    names, inv, counts = np.unique(cats, return_inverse=True, return_counts=True)
    u = draws(ids, rule.seed)
    if rule.mode == "cap":
        return u < np.minimum(1.0, rule.cap / counts)[inv]
    total = sum(rule.targets.values())
    share = np.array([rule.targets.get(c, 0.0) / total for c in names])
    present = share > 0
    if not present.any():
        return np.zeros(n, bool)
    size = np.min(counts[present] / share[present])
    quota = np.floor(size * share + 1e-9).astype(np.int64)
    # Within a category, the rows with the lowest draws are kept.
    order = np.lexsort((u, inv))
    rank = np.empty(n, np.int64)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    return rank < quota[inv]
