"""Global exact + near-duplicate clustering over the whole dataset's stored hashes.

Near duplicates are 64-bit pHashes within Hamming distance ``d``. Two candidate searches, both
exact (every pair within ``d`` is found), chosen per call by a cost model:

* **Block covering** (large inputs): the hash is 16 blocks of 4 bits; two hashes within ``d``
  differ in at most ``d`` blocks, so they agree exactly on any key made of blocks outside those.
  A greedy covering family of ``s``-block keys (every set of ``d`` blocks misses at least one key)
  turns the search into a few dozen exact-key groupings — each a packed ``(key, index)`` sort —
  with keys ``4s`` bits wide, ``s`` chosen from ``n`` so that random key collisions (~n²/2^4s)
  stay below ``n``: candidate work grows about linearly with ``n``.
* **Multi-index probing** (small inputs, large ``d``): ``m`` bands, every flip pattern of up to
  ``d // m`` bits probed in a per-band bucket table; cheap for small ``n``, but random band
  collisions grow as n²/2^(64/m).

Candidates are verified with an exact popcount; verified pairs are merged into components as they
arrive (``scipy.sparse.csgraph``), so a pair found by many keys costs no memory. Identical pHashes
collapse first, so a flood of identical blank images costs one unique value. With ``distributed``
the key groupings run as a Ray Data shuffle (keys hash-partitioned through ``groupby``), for inputs
whose per-key work does not fit one node; components are merged in the driver.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BLOCKS, BLOCK_BITS = 16, 4
# Relative costs, measured on 2 shared CPU cores at 1M and 4M hashes: one hash through one covering
# key (permute in cache, SIMD sort, scan) = 1 (~35 ns); one candidate pair (neighbour reads, xor,
# popcount, run bookkeeping) ~ 2.5; one probe of one hash in a bucket table ~ 2; one cell of the
# greedy covering search (once per process) ~ 0.5.
_SORT_COST, _PAIR_COST, _PROBE_COST, _COVER_COST = 1.0, 2.5, 2.0, 0.5
# Candidate pairs materialised at once by the probing search (bounds memory).
_CHUNK_PAIRS = 1 << 22
_CACHE_CHUNK = 1 << 15  # hashes per in-cache chunk (256 KiB)
_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64))
_EMPTY_U = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))


# --------------------------------------------------------------------------- block covering
@functools.cache
def covering(s: int, d: int) -> tuple[tuple[int, ...], ...]:
    """Greedy family of ``s``-block keys such that every set of ``d`` blocks misses one of them
    entirely (so two hashes differing in at most ``d`` blocks agree on that key)."""
    if s + d > BLOCKS:
        raise ValueError(f"no {s}-block key survives {d} dirty blocks out of {BLOCKS}")
    keys = list(itertools.combinations(range(BLOCKS), s))
    key_mask = np.array([sum(1 << b for b in k) for k in keys], np.uint16)
    dirty_mask = np.array([sum(1 << b for b in c) for c in itertools.combinations(range(BLOCKS), d)],
                          np.uint16)
    # survives[D, K]: key K has no block in dirty set D. Rows by dirty set, so the greedy update
    # below reads whole rows.
    survives = np.concatenate([(dirty_mask[a:a + 512, None] & key_mask[None, :]) == 0
                               for a in range(0, len(dirty_mask), 512)])
    gain = survives.sum(0)
    uncovered = np.ones(len(dirty_mask), bool)
    family = []
    while uncovered.any():
        best = int(gain.argmax())
        family.append(keys[best])
        newly = np.flatnonzero(uncovered & survives[:, best])
        uncovered[newly] = False
        gain -= survives[newly].sum(0)
    return tuple(family)


def _runs(blocks) -> list[tuple[int, int]]:
    """Blocks as (first block, length) runs of adjacent blocks: one shift per run, not per block."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return [(a, n) for a, n in runs]


@functools.cache
def _layout(key: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """(source bit, width, destination bit) moves putting the key's blocks at the top of the word
    and the other blocks below them: a bit permutation, so Hamming distances are unchanged."""
    moves, top = [], 64
    rest = [b for b in range(BLOCKS) if b not in key]
    for a, n in _runs(key) + _runs(rest):
        top -= n * BLOCK_BITS
        moves.append((a * BLOCK_BITS, n * BLOCK_BITS, top))
    return tuple(moves)


@functools.cache
def _shifts(key: tuple[int, ...], inverse: bool) -> tuple[tuple[np.uint64, int, np.uint64], ...]:
    """The layout's moves merged by shift distance: (source mask, direction, shift) per distance."""
    by: dict[int, int] = {}
    for s, w, d in _layout(key):
        s, d = (d, s) if inverse else (s, d)
        by[d - s] = by.get(d - s, 0) | (((1 << w) - 1) << s)
    return tuple((np.uint64(m), 1 if k >= 0 else -1, np.uint64(abs(k))) for k, m in sorted(by.items()))


def permute(h: np.ndarray, key: tuple[int, ...], inverse: bool = False, out: np.ndarray | None = None
            ) -> np.ndarray:
    """``h`` with the key's blocks moved to the top bits (or back, with ``inverse``)."""
    moves = _shifts(key, inverse)
    out = np.empty(len(h), np.uint64) if out is None else out[: len(h)]
    tmp = np.empty(min(len(h), _CACHE_CHUNK), np.uint64)
    # Chunks that stay in cache, ops in place: on millions of hashes, one pass per move over whole
    # arrays (and fresh temporaries) is memory-bound, ~3x slower.
    for a in range(0, len(h), _CACHE_CHUNK):
        src, dst = h[a:a + _CACHE_CHUNK], out[a:a + _CACHE_CHUNK]
        t = tmp[: len(src)]
        for i, (mask, direction, shift) in enumerate(moves):
            np.bitwise_and(src, mask, out=dst if i == 0 else t)
            shifted = dst if i == 0 else t
            (np.left_shift if direction > 0 else np.right_shift)(shifted, shift, out=shifted)
            if i:
                np.bitwise_or(dst, t, out=dst)
    return out


def _dirty_blocks(x: np.ndarray) -> np.ndarray:
    """16-bit mask of the nonzero 4-bit blocks of each uint64 (of a xor: the blocks two hashes
    differ in), by folding each block's bits into its lowest and packing those 16 bits together."""
    y = x | (x >> np.uint64(1))
    y |= y >> np.uint64(2)
    y &= np.uint64(0x1111111111111111)
    for shift, mask in ((3, 0x0303030303030303), (6, 0x000F000F000F000F), (12, 0x000000FF000000FF),
                        (24, 0xFFFF)):
        y |= y >> np.uint64(shift)
        y &= np.uint64(mask)
    return y.astype(np.intp)


@functools.cache
def first_key_tables(s: int, d: int) -> np.ndarray:
    """``[t, m]``: True where covering key ``t`` is the first key whose blocks all lie outside the
    dirty-block mask ``m`` (``m`` in key ``t``'s permuted layout). A pair within ``d`` shares every
    key that avoids its dirty blocks (dozens of them); keeping it only at the first reports it once,
    so the index mapping and component merging downstream see each pair once, not once per key."""
    keys = covering(s, d)
    m = np.arange(1 << BLOCKS)
    first = np.full(1 << BLOCKS, len(keys), np.int64)
    for t in range(len(keys) - 1, -1, -1):
        first[(m & sum(1 << b for b in keys[t])) == 0] = t
    out = np.empty((len(keys), 1 << BLOCKS), bool)
    for t, key in enumerate(keys):
        orig = np.zeros(1 << BLOCKS, np.int64)  # permuted-layout mask -> original block mask
        for src, width, dst in _layout(key):
            for i in range(width // BLOCK_BITS):
                orig |= ((m >> (dst // BLOCK_BITS + i)) & 1) << (src // BLOCK_BITS + i)
        out[t] = first[orig] == t
    return out


def sorted_pairs(v: np.ndarray, key_bits: int, d: int, buf: np.ndarray | None = None,
                 first: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Verified value pairs among permuted hashes ``v`` sharing their top ``key_bits`` bits; ``v``
    is sorted in place (``buf``: an optional uint64 scratch array at least as long; ``first``: a
    row of ``first_key_tables``, to keep only the pairs this key finds first).

    One SIMD sort of the values (~10x faster than an argsort) puts each key's hashes next to each
    other, with all their bits, so the popcount check reads neighbours instead of gathering at
    random. Pairs are every (p, p + k) in one run, by increasing k over the runs still long enough."""
    n = len(v)
    if n < 2:
        return _EMPTY_U
    v.sort()
    # Neighbours share the key iff their xor is below the key's lowest bit.
    x = np.bitwise_xor(v[1:], v[:-1], out=None if buf is None else buf[: n - 1])
    p = np.flatnonzero(x < np.uint64(1 << (64 - key_bits))) if key_bits else np.arange(n - 1)
    if not len(p):
        return _EMPTY_U
    # rest[q]: neighbours left in q's run after q + 1, so (q, q + k) pairs exist while rest >= k - 1.
    # Runs are counted only at their positions (few: about n / 2^(key_bits - log2 n) of them).
    start = np.r_[True, p[1:] != p[:-1] + 1]
    run_id = np.cumsum(start) - 1
    run_end = p[np.r_[np.flatnonzero(start)[1:] - 1, len(p) - 1]]
    rest = run_end[run_id] - p
    out_x, out_y, k = [], [], 1
    while len(p):
        a, b = v[p], v[p + k]
        x = a ^ b
        ok = np.bitwise_count(x) <= d
        if first is not None:
            ok[ok] = first[_dirty_blocks(x[ok])]
        out_x.append(a[ok])
        out_y.append(b[ok])
        more = rest >= k
        p, rest, k = p[more], rest[more], k + 1
    return np.concatenate(out_x), np.concatenate(out_y)


def _covering_pairs(h: np.ndarray, d: int, s: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs as indices into ``h`` (sorted, distinct). Two scratch arrays serve every key: fresh
    n-sized arrays per key cost page faults that grow with n."""
    v, buf = np.empty(len(h), np.uint64), np.empty(len(h), np.uint64)
    firsts = first_key_tables(s, d)
    for key, first in zip(covering(s, d), firsts, strict=True):
        x, y = sorted_pairs(permute(h, key, out=v), BLOCK_BITS * s, d, buf, first)
        if len(x):
            ij = _index_of(h, np.concatenate([permute(x, key, True), permute(y, key, True)]))
            yield _ordered(ij[: len(x)], ij[len(x):])


def _index_of(h: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Positions of ``values`` in sorted ``h``. The queries are sorted first: binary searches in
    increasing order reuse the cache, random ones miss on every level once ``h`` outgrows it."""
    u, inv = np.unique(values, return_inverse=True)
    return np.searchsorted(h, u)[inv]


def _ordered(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.minimum(i, j), np.maximum(i, j)


# --------------------------------------------------------------------------- multi-index probing
def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in c) for c in itertools.combinations(range(bits), r)]
    return np.array(masks, dtype=np.uint64)


def _probe_cost(n: int, d: int, m: int) -> float:
    bits = 64 // m
    probes = sum(math.comb(bits, r) for r in range(d // m + 1))
    return m * probes * (_PROBE_COST * n + _PAIR_COST * n * n / 2.0**bits)


def _chunks(cnt: np.ndarray):
    """Consecutive query ranges [a, b) holding about _CHUNK_PAIRS candidates each."""
    cum = np.cumsum(cnt)
    cuts = np.searchsorted(cum, np.arange(1, int(cum[-1]) // _CHUNK_PAIRS + 1) * _CHUNK_PAIRS, "left")
    edges = np.unique(np.r_[0, cuts + 1, len(cnt)].clip(0, len(cnt)))
    return zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True)


def _probing_pairs(h: np.ndarray, d: int, m: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Multi-index hashing: by pigeonhole a match agrees within d // m bits on some band; each
    band is bucketed by a counting sort, so a probe is two table lookups per hash."""
    bits = 64 // m
    for k in range(m):
        width = bits if k < m - 1 else 64 - bits * (m - 1)
        key = ((h >> np.uint64(k * bits)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(key, kind="stable")
        start = np.zeros((1 << width) + 1, np.int64)
        np.cumsum(np.bincount(key, minlength=1 << width), out=start[1:])
        for mask in _flip_masks(width, d // m).astype(np.int64):
            q = key ^ mask
            lo = start[q]
            cnt = start[q + 1] - lo
            for a, b in _chunks(cnt):
                c = cnt[a:b]
                total = int(c.sum())
                if total == 0:
                    continue
                qi = np.repeat(np.arange(a, b), c)
                cj = order[np.repeat(lo[a:b] - (np.cumsum(c) - c), c) + np.arange(total)]
                sel = qi < cj
                qi, cj = qi[sel], cj[sel]
                ok = np.bitwise_count(h[qi] ^ h[cj]) <= d
                yield qi[ok], cj[ok]


# --------------------------------------------------------------------------- plan + drivers
def _min_keys(s: int, d: int) -> int:
    """Schönheim's lower bound on a covering family's size (complements: (16-s)-sets covering
    every d-set), to skip computing families that cannot win."""
    v, k, bound = BLOCKS - d, BLOCKS - s - d, 1
    for _ in range(d):
        v, k = v + 1, k + 1
        bound = math.ceil(v / k * bound)
    return bound


def plan(n: int, d: int) -> tuple[str, int]:
    """Cheapest exact search for n distinct hashes at distance d by the cost model:
    ("cover", s) — s-block keys — or ("probe", m) — m bands with 22-bit tables at most.

    Key widths compare by their work on the hashes only: a covering family is built once per
    process (< 1 s) and reused by every call, so its one-time cost must not tip the width, which
    would make the width flip back and forth between calls; it still counts against probing."""
    probe = min((_probe_cost(n, d, m), ("probe", m)) for m in range(3, 9))
    around = int(math.log2(max(n, 2))) // BLOCK_BITS  # keys near log2(n) bits: the only contenders
    best = None
    for s in range(max(0, around - 1), min(BLOCKS - d, around + 2) + 1):
        per_key = _SORT_COST * n + _PAIR_COST * n * n / 2.0 ** (BLOCK_BITS * s + 1)
        setup = _COVER_COST * math.comb(BLOCKS, s) * math.comb(BLOCKS, d)
        if (math.comb(BLOCKS, s) * math.comb(BLOCKS, d) > 1.5e8  # the covering search itself too big
                or _min_keys(s, d) * per_key >= min(probe[0], best[0] if best else math.inf)):
            continue
        work = len(covering(s, d)) * per_key
        if best is None or work < best[0]:
            best = (work, ("cover", s), setup)
    if best is None or best[0] + best[2] >= probe[0]:
        return probe[1]
    return best[1]


def candidate_pairs(h: np.ndarray, d: int, how: tuple[str, int] | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Verified pairs (i < j) of distinct ``h`` within ``d``, in batches; a pair may repeat."""
    h = np.ascontiguousarray(h, dtype=np.uint64)
    if len(h) < 2 or d <= 0:
        return
    kind, p = how or plan(len(h), d)
    if kind == "probe":
        yield from _probing_pairs(h, d, p)
        return
    order = None if bool((h[1:] > h[:-1]).all()) else np.argsort(h)
    for i, j in _covering_pairs(h if order is None else h[order], d, p):
        yield (i, j) if order is None else _ordered(order[i], order[j])


def near_pairs(hashes: np.ndarray, d: int, how: tuple[str, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) of distinct ``hashes`` (uint64) within Hamming distance ``d``."""
    batches = list(candidate_pairs(hashes, d, how))
    if not batches:
        return _EMPTY
    pairs = np.unique(np.stack([np.concatenate([b[0] for b in batches]),
                                np.concatenate([b[1] for b in batches])], 1), axis=0)
    return pairs[:, 0], pairs[:, 1]


class Components:
    """Connected components of n nodes fed edge batches: edges inside a known component are
    dropped on arrival and pending edges are merged when they pile up, so memory stays O(n) however
    often the search repeats a pair."""

    def __init__(self, n: int):
        self.label = np.arange(n, dtype=np.int64)
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self._pending = 0
        self._limit = max(1 << 20, n // 8)

    def add(self, i: np.ndarray, j: np.ndarray) -> None:
        li, lj = self.label[i], self.label[j]
        new = li != lj
        if new.any():
            self._a.append(li[new])
            self._b.append(lj[new])
            self._pending += int(new.sum())
            if self._pending >= self._limit:
                self.merge()

    def merge(self) -> np.ndarray:
        """Fold pending edges in; returns the label array (each component's smallest node)."""
        if self._pending:
            a, b = np.concatenate(self._a), np.concatenate(self._b)
            nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
            m = len(nodes)
            g = coo_matrix((np.ones(len(a), np.int8), (inv[: len(a)], inv[len(a):])), shape=(m, m))
            comp = connected_components(g, directed=False)[1]
            root = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
            np.minimum.at(root, comp, nodes)  # the smallest old label of each merged group
            remap = np.arange(len(self.label), dtype=np.int64)
            remap[nodes] = root[comp]
            self.label = remap[self.label]
            self._a, self._b, self._pending = [], [], 0
        return self.label


def near_components(hashes: np.ndarray, d: int, how: tuple[str, int] | None = None,
                    distributed: bool = False, partitions: int | None = None) -> np.ndarray:
    """Component label per distinct hash (pairs within ``d``, transitively)."""
    comps = Components(len(hashes))
    pairs = (distributed_pairs(hashes, d, how, partitions) if distributed
             else candidate_pairs(hashes, d, how))
    for i, j in pairs:
        comps.add(i, j)
    return comps.merge()


# --------------------------------------------------------------------------- distributed (Ray Data)
def _emit_keys(batch: dict, keys: tuple[tuple[int, ...], ...], key_bits: int, parts: int) -> dict:
    """Every hash once per covering key: (partition, key id, permuted hash)."""
    h = batch["h"]
    v = np.concatenate([permute(h, k) for k in keys])
    t = np.repeat(np.arange(len(keys), dtype=np.uint64), len(h))
    bucket = (v >> np.uint64(64 - key_bits)) ^ (t * np.uint64(0x9E3779B97F4A7C15))
    part = ((bucket * np.uint64(0xBF58476D1CE4E5B9)) >> np.uint64(40)) % np.uint64(parts)
    return {"part": part, "t": t, "v": v}


def _partition_pairs(group: dict, key_sets: tuple[tuple[int, ...], ...], key_bits: int, d: int) -> dict:
    """One partition's buckets paired locally; pairs go back as original hash values, each pair
    from its first key only."""
    xs, ys = [_EMPTY_U[0]], [_EMPTY_U[1]]
    firsts = first_key_tables(key_bits // BLOCK_BITS, d)
    for t in np.unique(group["t"]).tolist():
        x, y = sorted_pairs(group["v"][group["t"] == t], key_bits, d, first=firsts[t])
        xs.append(permute(x, key_sets[t], True))
        ys.append(permute(y, key_sets[t], True))
    return {"x": np.concatenate(xs), "y": np.concatenate(ys)}


def distributed_pairs(hashes: np.ndarray, d: int, how: tuple[str, int] | None = None,
                      partitions: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The covering search as a Ray Data shuffle, for inputs whose per-key sorts do not fit one
    node: each block emits every hash once per key, (key id, key value) buckets are hash-partitioned
    through ``groupby`` and each partition pairs its buckets locally. Only verified pairs come back
    to the driver, as indices into ``hashes`` (sorted, distinct, as ``cluster`` passes them)."""
    import pyarrow as pa
    import ray

    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    if len(h) < 2 or d <= 0:
        return
    kind, s = how or plan(len(h), d)
    if kind != "cover":  # a plan for a small input: keys about log2(n) bits wide
        s = min(BLOCKS - d, math.ceil(math.log2(len(h)) / BLOCK_BITS))
    keys = covering(s, d)
    if not ray.is_initialized():  # a --rethreshold run has no Ray yet; under `ray job submit` this joins the cluster
        ray.init(include_dashboard=False, ignore_reinit_error=True)
    parts = partitions or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    out = (ray.data.from_arrow(pa.table({"h": pa.array(h, pa.uint64())}))
           .map_batches(_emit_keys, batch_format="numpy",
                        fn_kwargs={"keys": keys, "key_bits": BLOCK_BITS * s, "parts": parts})
           .groupby("part")
           .map_groups(_partition_pairs, batch_format="numpy",
                       fn_kwargs={"key_sets": keys, "key_bits": BLOCK_BITS * s, "d": d}))
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["x"]):
            ij = _index_of(h, np.concatenate([batch["x"], batch["y"]]))
            yield _ordered(ij[: len(batch["x"])], ij[len(batch["x"]):])


# --------------------------------------------------------------------------- public API
def _group_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges joining every row to the first row with the same key."""
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rows = np.arange(len(keys))
    return rows, first[inv]


def cluster(phash: np.ndarray, content_hash: np.ndarray, max_hamming: int,
            distributed: bool = False, how: tuple[str, int] | None = None) -> np.ndarray:
    """Component label per row: rows with equal content hash, or pHashes within ``max_hamming``
    (transitively), share a label. ``phash`` uint64, ``content_hash`` any sortable array.
    ``distributed`` runs the near-duplicate key join through Ray Data (needs ``ray.init``);
    ``how`` forces a search (see ``plan``), for benchmarks."""
    n = len(phash)
    if n == 0:
        return np.zeros(0, np.int64)
    a1, b1 = _group_edges(content_hash)
    uniq, first, inv = np.unique(np.asarray(phash, np.uint64), return_index=True, return_inverse=True)
    near = near_components(uniq, max_hamming, how, distributed=distributed)
    # Row -> its pHash's first row (identical pHashes), and that to its near component's first row.
    a2, b2 = np.arange(n), first[near[inv]]
    g = coo_matrix((np.ones(2 * n, np.int8), (np.concatenate([a1, a2]), np.concatenate([b1, b2]))),
                   shape=(n, n))
    return connected_components(g, directed=False)[1]


def survivors(labels: np.ndarray, area: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each row's cluster survivor: the largest image, then the smallest id."""
    order = np.lexsort((ids, -area.astype(np.int64), labels))
    lab_sorted = labels[order]
    head = np.r_[True, lab_sorted[1:] != lab_sorted[:-1]]
    winner = np.empty(int(labels.max()) + 1 if len(labels) else 0, np.int64)
    winner[lab_sorted[head]] = order[head]
    return winner[labels]
