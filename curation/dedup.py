"""Global exact + near-duplicate clustering over the whole dataset's stored hashes.

Near duplicates are 64-bit pHashes within Hamming distance ``d``. Two candidate searches, both
exact (every pair within ``d`` is found), chosen per call by a cost model:

* **Block covering** (large inputs): the hash is 16 blocks of 4 bits; two hashes within ``d``
  differ in at most ``d`` blocks, so they agree exactly on any key made of blocks outside those.
  A greedy covering family of ``s``-block keys (every set of ``d`` blocks misses at least one key)
  turns the search into a few dozen exact-key groupings, keys ``4s`` bits wide, ``s`` chosen from
  ``n`` so that random key collisions (~n²/2^4s) stay below ``n``. The work per hash does not grow
  with n: keys sharing a 2-block prefix are served by one linear radix ordering of the hashes by
  that prefix, after which each key's sort, neighbour scan and pair checks run chunk by chunk in
  cache; a pair is kept only at the first key it shares, so each pair is mapped and merged once.
* **Multi-index probing** (small inputs, large ``d``): ``m`` bands, every flip pattern of up to
  ``d // m`` bits probed in a per-band bucket table; cheap for small ``n``, but random band
  collisions grow as n²/2^(64/m).

Candidates are verified with an exact popcount; verified pairs are merged into components as they
arrive (``scipy.sparse.csgraph``). Identical pHashes collapse first, so a flood of identical blank
images costs one unique value; exact (content-hash) duplicates join as edges among those values.
With ``distributed`` the key groupings run as a Ray Data shuffle (keys hash-partitioned through
``groupby``), for inputs whose per-key work does not fit one node; components are merged in the
driver.
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
_SORT_CHUNK = 1 << 16  # hashes per in-cache sort (512 KiB, a share of the 2 MiB L2)
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


@functools.cache
def placement(key: tuple[int, ...], prefix: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Destination of each of the 16 blocks (block ``b`` holds bits 4b..4b+3): the prefix's blocks
    at the top in its order, the key's other blocks right below, the rest at the bottom. A bit
    permutation, so Hamming distances are unchanged; blocks already inside their region stay put
    (fewer distinct shifts, so fewer passes in ``permute``)."""
    dest = [-1] * BLOCKS
    for i, b in enumerate(prefix):
        dest[b] = BLOCKS - 1 - i
    rest = [b for b in range(BLOCKS) if b not in key]
    for blocks, lo, hi in ((sorted(set(key) - set(prefix)), BLOCKS - len(key), BLOCKS - len(prefix)),
                           (rest, 0, BLOCKS - len(key))):
        stay = [b for b in blocks if lo <= b < hi]
        movers = [b for b in blocks if b not in stay]
        for b in stay:
            dest[b] = b
        for b, q in zip(movers, [q for q in range(lo, hi) if q not in stay], strict=True):
            dest[b] = q
    return tuple(dest)


@functools.cache
def _shifts(dest: tuple[int, ...], inverse: bool) -> tuple[tuple[np.uint64, int, np.uint64], ...]:
    """The placement's block moves merged by shift distance: (source mask, direction, shift)."""
    by: dict[int, int] = {}
    for b, q in enumerate(dest):
        src, dst = (q, b) if inverse else (b, q)
        by[dst - src] = by.get(dst - src, 0) | (((1 << BLOCK_BITS) - 1) << (BLOCK_BITS * src))
    # The blocks that stay first: they go straight into the output, no shift, no or.
    return tuple((np.uint64(m), 1 if k >= 0 else -1, np.uint64(BLOCK_BITS * abs(k)))
                 for k, m in sorted(by.items(), key=lambda km: (km[0] != 0, km[0])))


def permute(h: np.ndarray, dest: tuple[int, ...], inverse: bool = False, out: np.ndarray | None = None
            ) -> np.ndarray:
    """``h`` with its blocks moved as ``dest`` (a ``placement``) says, or back with ``inverse``."""
    moves = _shifts(dest, inverse)
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
            if shift:
                (np.left_shift if direction > 0 else np.right_shift)(shifted, shift, out=shifted)
            if i:
                np.bitwise_or(dst, t, out=dst)
    return out


@functools.cache
def schedule(s: int, d: int, p: int) -> tuple[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]], ...]:
    """The covering keys grouped under shared ``p``-block prefixes, greedily (each prefix takes the
    most keys left): ``((prefix, keys), ...)``. Hashes ordered once by a prefix's value serve all
    its keys: with the prefix on top, each key's sort splits into independent in-cache pieces."""
    left, out = list(covering(s, d)), []
    while left:
        best = max(itertools.combinations(range(BLOCKS), p),
                   key=lambda c: sum(set(c) <= set(k) for k in left))
        out.append((best, tuple(k for k in left if set(best) <= set(k))))
        left = [k for k in left if not set(best) <= set(k)]
    return tuple(out)


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
def first_key_tables(keys: tuple[tuple[int, ...], ...], dests: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """``[t, m]``: True where ``keys[t]`` is the first key whose blocks all lie outside the
    dirty-block mask ``m`` (``m`` in the key's placement ``dests[t]``). A pair within ``d`` shares
    every key that avoids its dirty blocks (dozens of them); keeping it only at the first reports it
    once, so the index mapping and component merging downstream see each pair once, not per key."""
    m = np.arange(1 << BLOCKS)
    first = np.full(1 << BLOCKS, len(keys), np.int64)
    for t in range(len(keys) - 1, -1, -1):
        first[(m & sum(1 << b for b in keys[t])) == 0] = t
    out = np.empty((len(keys), 1 << BLOCKS), bool)
    byte = np.arange(256)
    for t, dest in enumerate(dests):
        # A mask in the placement -> the mask of original blocks, through one table per mask byte.
        lo, hi = np.zeros(256, np.int64), np.zeros(256, np.int64)
        for b, q in enumerate(dest):
            (lo if q < 8 else hi)[:] |= ((byte >> (q % 8)) & 1) << b
        out[t] = first[lo[m & 255] | hi[m >> 8]] == t
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
    # same[q]: v[q] and v[q + 1] share the key (their xor is below the key's lowest bit). Adjacent
    # pairs, nearly all the candidates, are checked on the whole chunk's xor (a few SIMD passes in
    # cache): gathering candidates one by one costs more once random key collisions are common.
    x = np.bitwise_xor(v[1:], v[:-1], out=None if buf is None else buf[: n - 1])
    same = np.zeros(n, bool)  # the padding False ends the last run
    if key_bits:
        np.less(x, np.uint64(1 << (64 - key_bits)), out=same[:-1])
    else:
        same[:-1] = True
    ok = np.flatnonzero(same[:-1] & (np.bitwise_count(x) <= d))
    if first is not None and len(ok):
        ok = ok[first[_dirty_blocks(x[ok])]]
    out_x, out_y = [v[ok]], [v[ok + 1]]
    # Longer runs: (q, q + k + 1) share the key iff (q, q + k) and (q + k, q + k + 1) do.
    q, k = np.flatnonzero(same[:-1] & same[1:]), 2
    while len(q):
        qk = q + k
        y = v[q] ^ v[qk]
        ok = np.flatnonzero(np.bitwise_count(y) <= d)
        if first is not None and len(ok):
            ok = ok[first[_dirty_blocks(y[ok])]]
        out_x.append(v[q[ok]])
        out_y.append(v[qk[ok]])
        q, k = q[same[qk]], k + 1
    return np.concatenate(out_x), np.concatenate(out_y)


def _prefix_blocks(n: int, s: int) -> int:
    """Prefix blocks for n hashes: none while one sort fits in cache, else enough (at least 2, so
    1M-16M share one layout) that each prefix value holds at most a few cache-sized chunks."""
    if n <= 2 * _SORT_CHUNK:
        return 0
    return min(s, 4, max(2, math.ceil(math.log2(n / _SORT_CHUNK) / BLOCK_BITS)))


def _covering_pairs(h: np.ndarray, d: int, s: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pairs as indices into ``h`` (sorted, distinct), each pair once.

    Per prefix group, the hashes are ordered by the prefix's value (a linear radix sort of <= 16-bit
    values). Each key's placement puts that prefix on top, so its sorted order is the prefix order
    with every stretch of equal prefix values sorted on its own: the key's sort, neighbour scan and
    pair checks run chunk by chunk (~_SORT_CHUNK hashes, cut between prefix values) in cache, and
    their cost per hash no longer grows with n. Two scratch arrays serve every key: fresh n-sized
    arrays per key cost page faults that grow with n."""
    n, p = len(h), _prefix_blocks(len(h), s)
    groups = schedule(s, d, p)
    keys = tuple(k for _, ks in groups for k in ks)
    dests = tuple(placement(k, prefix) for prefix, ks in groups for k in ks)
    firsts = first_key_tables(keys, dests)
    v, buf = np.empty(n, np.uint64), np.empty(n, np.uint64)
    t = 0
    for prefix, group in groups:
        if p:
            val = np.zeros(n, np.uint16)
            for i, b in enumerate(prefix):
                val |= (((h >> np.uint64(BLOCK_BITS * b)) & np.uint64(15)).astype(np.uint16)
                        << np.uint16(BLOCK_BITS * (p - 1 - i)))
            hp = h[np.argsort(val, kind="stable")]  # radix sort: linear in n
            ends = np.cumsum(np.bincount(val, minlength=1 << (BLOCK_BITS * p)))
            cuts = ends[np.searchsorted(ends, np.arange(1, n // _SORT_CHUNK + 1) * _SORT_CHUNK)]
            edges = np.unique(np.r_[0, cuts, n]).tolist()
        else:
            hp, edges = h, [0, n]
        for _ in group:
            dest, xs, ys = dests[t], [], []
            for a, b in itertools.pairwise(edges):
                x, y = sorted_pairs(permute(hp[a:b], dest, out=v[a:b]), BLOCK_BITS * s, d, buf, firsts[t])
                if len(x):
                    xs.append(x)
                    ys.append(y)
            t += 1
            if xs:
                x, y = np.concatenate(xs), np.concatenate(ys)
                ij = _index_of(h, np.concatenate([permute(x, dest, True), permute(y, dest, True)]))
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
                    distributed: bool = False, partitions: int | None = None,
                    comps: Components | None = None) -> np.ndarray:
    """Component label per distinct hash (pairs within ``d``, transitively; ``comps``: components
    already holding other edges among these hashes)."""
    comps = comps or Components(len(hashes))
    pairs = (distributed_pairs(hashes, d, how, partitions) if distributed
             else candidate_pairs(hashes, d, how))
    for i, j in pairs:
        comps.add(i, j)
    return comps.merge()


# --------------------------------------------------------------------------- distributed (Ray Data)
def _emit_keys(batch: dict, dests: tuple[tuple[int, ...], ...], key_bits: int, parts: int) -> dict:
    """Every hash once per covering key: (partition, key id, permuted hash)."""
    h = batch["h"]
    v = np.concatenate([permute(h, dest) for dest in dests])
    t = np.repeat(np.arange(len(dests), dtype=np.uint64), len(h))
    bucket = (v >> np.uint64(64 - key_bits)) ^ (t * np.uint64(0x9E3779B97F4A7C15))
    part = ((bucket * np.uint64(0xBF58476D1CE4E5B9)) >> np.uint64(40)) % np.uint64(parts)
    return {"part": part, "t": t, "v": v}


def _partition_pairs(group: dict, key_sets: tuple[tuple[int, ...], ...], dests: tuple[tuple[int, ...], ...],
                     key_bits: int, d: int) -> dict:
    """One partition's buckets paired locally; pairs go back as original hash values, each pair
    from its first key only."""
    xs, ys = [_EMPTY_U[0]], [_EMPTY_U[1]]
    firsts = first_key_tables(key_sets, dests)
    for t in np.unique(group["t"]).tolist():
        x, y = sorted_pairs(group["v"][group["t"] == t], key_bits, d, first=firsts[t])
        xs.append(permute(x, dests[t], True))
        ys.append(permute(y, dests[t], True))
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
    dests = tuple(placement(k) for k in keys)
    if not ray.is_initialized():  # a --rethreshold run has no Ray yet; under `ray job submit` this joins the cluster
        ray.init(include_dashboard=False, ignore_reinit_error=True)
    parts = partitions or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    out = (ray.data.from_arrow(pa.table({"h": pa.array(h, pa.uint64())}))
           .map_batches(_emit_keys, batch_format="numpy",
                        fn_kwargs={"dests": dests, "key_bits": BLOCK_BITS * s, "parts": parts})
           .groupby("part")
           .map_groups(_partition_pairs, batch_format="numpy",
                       fn_kwargs={"key_sets": keys, "dests": dests, "key_bits": BLOCK_BITS * s, "d": d}))
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["x"]):
            ij = _index_of(h, np.concatenate([batch["x"], batch["y"]]))
            yield _ordered(ij[: len(batch["x"])], ij[len(batch["x"]):])


# --------------------------------------------------------------------------- public API
def cluster(phash: np.ndarray, content_hash: np.ndarray, max_hamming: int,
            distributed: bool = False, how: tuple[str, int] | None = None) -> np.ndarray:
    """Component label per row: rows with equal content hash, or pHashes within ``max_hamming``
    (transitively), share a label. ``phash`` uint64, ``content_hash`` any sortable array.
    ``distributed`` runs the near-duplicate key join through Ray Data (needs ``ray.init``);
    ``how`` forces a search (see ``plan``), for benchmarks."""
    n = len(phash)
    if n == 0:
        return np.zeros(0, np.int64)
    # Only inverses: np.unique then sorts with the SIMD argsort, not the stable one first indices need.
    uniq, inv = np.unique(np.asarray(phash, np.uint64), return_inverse=True)
    content = np.unique(content_hash, return_inverse=True)[1]
    # Rows with one content hash join their pHashes: an edge from each row's pHash to the pHash of
    # one row of its content group (self-loops, the usual case, are dropped on arrival). Labels are
    # the components of the distinct pHashes, so no graph over all rows is built.
    rep = np.empty(int(content.max()) + 1, np.int64)
    rep[content] = inv
    comps = Components(len(uniq))
    comps.add(inv, rep[content])
    return near_components(uniq, max_hamming, how, distributed=distributed, comps=comps)[inv]


def survivors(labels: np.ndarray, area: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each row's cluster survivor: the largest image, then the smallest id."""
    order = np.lexsort((ids, -area.astype(np.int64), labels))
    lab_sorted = labels[order]
    head = np.r_[True, lab_sorted[1:] != lab_sorted[:-1]]
    winner = np.empty(int(labels.max()) + 1 if len(labels) else 0, np.int64)
    winner[lab_sorted[head]] = order[head]
    return winner[labels]
