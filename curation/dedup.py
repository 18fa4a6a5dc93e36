"""Global exact + near-duplicate clustering over the whole dataset's stored hashes.

Near duplicates are 64-bit pHashes within Hamming distance ``d``. The candidate search is
multi-index hashing (Norouzi et al.): split the hash into ``m`` bands; by the pigeonhole principle
two hashes within ``d`` agree to within ``d // m`` bits on at least one band, so each band is
searched with every flip pattern of up to ``d // m`` bits via sorted arrays and ``searchsorted``
(vectorised numpy, no Python loop per item). Candidates are verified with an exact popcount, and
clusters are the connected components of the verified pairs plus the exact content-hash groups
(``scipy.sparse.csgraph``). Identical pHashes collapse first, so a flood of identical blank images
costs one unique value, not a quadratic bucket.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in c) for c in itertools.combinations(range(bits), r)]
    return np.array(masks, dtype=np.uint64)


# A candidate pair (gather, xor, popcount, filter) costs several times a probe's lookup.
_PAIR_COST = 8.0


def _choose_bands(n: int, d: int) -> int:
    """Bands m minimising lookups + weighted candidate pairs for n uniform hashes: 16-bit bands up
    to ~10^5 hashes, 21-bit bands beyond, so the pair term never turns quadratic."""
    best, best_cost = 1, math.inf
    for m in range(2, min(d + 1, 8) + 1):
        bits = 64 // m
        probes = sum(math.comb(bits, r) for r in range(d // m + 1))
        cost = m * probes * (n + _PAIR_COST * n * n / 2.0**bits)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def near_pairs(hashes: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) of distinct ``hashes`` (uint64) within Hamming distance ``d``."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2 or d <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    m = _choose_bands(n, d)
    bits = 64 // m
    out_i, out_j = [], []
    for k in range(m):
        width = bits if k < m - 1 else 64 - bits * (m - 1)
        key = (h >> np.uint64(k * bits)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        skey = key[order]
        for mask in _flip_masks(width, d // m):
            q = key ^ mask
            lo = np.searchsorted(skey, q, "left")
            cnt = np.searchsorted(skey, q, "right") - lo
            total = int(cnt.sum())
            if total == 0:
                continue
            qi = np.repeat(np.arange(n), cnt)
            starts = np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
            cj = order[starts + np.arange(total)]
            sel = qi < cj
            qi, cj = qi[sel], cj[sel]
            ok = np.bitwise_count(h[qi] ^ h[cj]) <= d
            out_i.append(qi[ok])
            out_j.append(cj[ok])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(out_i), np.concatenate(out_j)], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def _group_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges joining every row to the first row with the same key."""
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rows = np.arange(len(keys))
    return rows, first[inv]


def cluster(phash: np.ndarray, content_hash: np.ndarray, max_hamming: int) -> np.ndarray:
    """Component label per row: rows with equal content hash, or pHashes within ``max_hamming``
    (transitively), share a label. ``phash`` uint64, ``content_hash`` any sortable array."""
    n = len(phash)
    if n == 0:
        return np.zeros(0, np.int64)
    a1, b1 = _group_edges(content_hash)
    uniq, first, inv = np.unique(phash, return_index=True, return_inverse=True)
    a2, b2 = np.arange(n), first[inv]
    ui, uj = near_pairs(uniq, max_hamming)
    a3, b3 = first[ui], first[uj]
    a = np.concatenate([a1, a2, a3])
    b = np.concatenate([b1, b2, b3])
    g = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(g, directed=False)[1]


def survivors(labels: np.ndarray, area: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each row's cluster survivor: the largest image, then the smallest id."""
    order = np.lexsort((ids, -area.astype(np.int64), labels))
    lab_sorted = labels[order]
    head = np.r_[True, lab_sorted[1:] != lab_sorted[:-1]]
    winner = np.empty(int(labels.max()) + 1 if len(labels) else 0, np.int64)
    winner[lab_sorted[head]] = order[head]
    return winner[labels]
