"""Retrieval engine benchmark: the flywheel's pool index (flywheel/index.py) at N rows.

Builds a real `pool_index` table (flywheel/schema.py) of N rows, indexes it exactly as the engine
does (`_maintain_indices`: FTS + the configured vector index — IVF_HNSW_SQ by default, or IVF_PQ with
`--set vector_index=IVF_PQ` — on text_vector and image_vector, parameters chosen from the row count by
`index_params`) and queries it through `PoolIndex`, the calls attribution and the tracks make:

* vector-only (`PoolIndex.nearest`, k=10): q/s and recall@10 against exact neighbours (brute force
  in numpy over the same vectors);
* hybrid (`PoolIndex.hybrid`: vector index + BM25, RRF) at k=10 and at attribution's search_k, one
  query at a time (single stream), and with 2 queries in flight (2 client threads on one PoolIndex:
  how a retrieval server answers concurrent requests);
* batched (`PoolIndex.hybrid_many`: one batched vector query + concurrent full-text queries, `--batch`
  queries per call: how attribution's density sample runs), single stream and 2 batches in flight;
* the baseline in the same run: LanceDB exact search (flat scan) on a subset of the queries.

q/s are wall-clock on this machine (2 cores: at most 2 queries run at once); CPU ms/query counts all
threads, the load-independent figure (2 cores / CPU ms = the q/s ceiling).

The data: uniform random 768-d vectors have no neighbourhood structure (every point is about equally
far from every other), so ANN recall on them says nothing about CLIP embeddings. CLIP embeddings are
clustered and anisotropic, so the vectors here are a mixture of Gaussians on the unit sphere: N/500
cluster centres (uniform on the sphere), each point = centre + a Gaussian offset in a shared
128-d subspace with a power-law spectrum (variance of direction i ~ 1/i, norm 0.8) + a small
isotropic part (norm 0.1), L2-normalised. Queries are data points perturbed within the same subspace
(half the spread: a prompt near existing captions). image_vector is the text vector with its own offset.
Captions are 4 words drawn from the cluster's 5-word vocabulary + a row number (for BM25).

Last line: `retrieval recall@10: X.XX`.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("LANCEDB_LOG", "error")  # hybrid queries warn per query about _score/_distance projection

from flywheel.config import AttributionConfig, IndexConfig  # noqa: E402
from flywheel.index import INDEX_TYPES, TABLE, PoolIndex, _maintain_indices, index_params  # noqa: E402
from flywheel.schema import pool_index_schema  # noqa: E402
from flywheel.store import open_table  # noqa: E402

WORDS = np.array("zebra bus cat dog tower river bridge street night red blue green old new small big city field "
                 "mountain lake portrait poster chart diagram logo sign market boat train car flower tree".split())
RANK = 128  # dimensions of the within-cluster subspace


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Mixture:
    """Clustered, anisotropic unit vectors (see the module docstring)."""

    def __init__(self, n: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.k = dim, max(20, n // 500)
        c = rng.normal(size=(self.k, dim)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        self.basis = np.linalg.qr(rng.normal(size=(dim, RANK)))[0].T.astype(np.float32)
        sig = np.arange(1, RANK + 1, dtype=np.float32) ** -0.5
        self.sig = 0.8 * sig / np.linalg.norm(sig)

    def offset(self, rng, m: int, scale: float = 1.0, iso: float = 0.1) -> np.ndarray:
        z = rng.normal(size=(m, RANK)).astype(np.float32) * self.sig * scale
        return z @ self.basis + rng.normal(scale=iso / np.sqrt(self.dim), size=(m, self.dim)).astype(np.float32)

    def sample(self, rng, m: int) -> tuple[np.ndarray, np.ndarray]:
        c = rng.integers(0, self.k, m)
        return c, _unit(self.centres[c] + self.offset(rng, m))


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _fixed(v: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])


def write_pool(db, mix: Mixture, n: int, size: int = 50_000) -> tuple:
    """The pool_index table with n rows; returns it, the text vectors (float16) and cluster ids."""
    schema = pool_index_schema(mix.dim)
    tbl = open_table(db, TABLE, schema)
    rng = np.random.default_rng(1)
    vecs, clusters = [], []
    for start in range(0, n, size):
        m = min(size, n - start)
        c, v = mix.sample(rng, m)
        img = _unit(v + mix.offset(rng, m, 0.5))
        words = WORDS[(c[:, None] * 7 + rng.integers(0, 5, (m, 4))) % len(WORDS)]
        ids = [f"r{start + i}" for i in range(m)]
        tbl.add(pa.table({
            "id": ids, "pool": ["main"] * m, "pool_version": pa.array([1] * m, pa.int64()),
            "stage": ["stage1"] * m, "keep": [True] * m, "reject_reason": pa.nulls(m, pa.string()),
            "kind": ["image"] * m, "base_id": pa.nulls(m, pa.string()),
            "text": [" ".join(w) + f" item {start + i}" for i, w in enumerate(words)],
            "categories": [[str(w[0])] for w in words], "text_vector": _fixed(v), "image_vector": _fixed(img),
            "has_image_vector": [True] * m, "text_hash": ids,
            "indexed_at": pa.array([0] * m, pa.timestamp("us", tz="UTC")),
        }, schema=schema))
        vecs.append(v.astype(np.float16))  # ground truth in half precision: 1M x 768 = 1.5 GB
        clusters.append(c)
        print(f"  wrote {start + m:,} / {n:,} rows", flush=True)
    return tbl, np.concatenate(vecs), np.concatenate(clusters)


def reused(db, n: int) -> tuple:
    """The table an earlier run left in --dir and its text vectors (float16, row order = id order)."""
    tbl = db.open_table(TABLE)
    if tbl.count_rows() != n:
        raise SystemExit(f"--reuse: {TABLE} has {tbl.count_rows():,} rows, not --n {n:,}")
    if not {"text", "text_vector"} <= {i.columns[0] for i in tbl.list_indices()}:
        raise SystemExit(f"--reuse: {TABLE} lacks its FTS / IVF_PQ index: run once without --reuse")
    data, ids = [], []
    for b in tbl.to_lance().to_batches(columns=["id", "text_vector"], batch_size=50_000):
        data.append(np.asarray(b["text_vector"].flatten().to_numpy(), np.float16).reshape(b.num_rows, -1))
        ids.append(np.array([int(x[1:]) for x in b["id"].to_pylist()]))
    data, ids = np.concatenate(data), np.concatenate(ids)
    out = np.empty_like(data)
    out[ids] = data
    return tbl, out


def exact_top(data: np.ndarray, q: np.ndarray, k: int = 10) -> np.ndarray:
    """Brute-force top-k ids per query (float32 math over chunks of the half-precision data)."""
    sims = np.concatenate([q @ data[i:i + 100_000].astype(np.float32).T for i in range(0, len(data), 100_000)], 1)
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    return top


def timed(fn, n: int, step: int = 1, threads: int = 1) -> tuple[list, float, float]:
    """fn(i) for i in range(0, n, step) (each call answers `step` queries), `threads` calls in flight;
    returns the answers, queries/s and CPU ms per query."""
    from concurrent.futures import ThreadPoolExecutor

    fn(0)  # warm the index cache
    t, c = time.perf_counter(), cpu()
    if threads == 1:
        out = [fn(i) for i in range(0, n, step)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            out = list(pool.map(fn, range(0, n, step)))
    return out, n / (time.perf_counter() - t), (cpu() - c) / n * 1000


def recall(got: list[list[str]], truth: np.ndarray) -> float:
    return float(np.mean([len({int(x[1:]) for x in g} & set(t.tolist())) / truth.shape[1]
                          for g, t in zip(got, truth, strict=False)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--exact-queries", type=int, default=10, help="queries for the flat-scan baseline")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="IndexConfig overrides, e.g. refine_candidates=100 (default: the engine's defaults)")
    ap.add_argument("--dir", help="where to write the database (default: a temp dir, removed)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --dir: query the pool_index table and indices already there (written by an earlier "
                         "run with the same --n / --dim) instead of writing and indexing again; no build time")
    ap.add_argument("--batch", type=int, default=50, help="queries per PoolIndex.hybrid_many call")
    args = ap.parse_args()
    import lancedb

    over = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (s.split("=", 1) for s in args.set)}
    cfg = IndexConfig(**over)
    t_all = time.perf_counter()
    root = Path(args.dir or tempfile.mkdtemp(prefix="fw_bench_"))
    db = lancedb.connect(str(root / "db"))
    mix = Mixture(args.n, args.dim)
    t0 = time.perf_counter()
    p = index_params(args.n, args.dim, cfg)
    if args.reuse:
        if not args.dir:
            ap.error("--reuse needs --dir")
        tbl, data = reused(db, args.n)
        t_build = c_build = float("nan")
        print(f"REUSED the table and indices in {root / 'db'} (no write, no build; build time not measured): "
              f"{', '.join(i.index_type + ' on ' + i.columns[0] for i in tbl.list_indices())}", flush=True)
    else:
        tbl, data, _ = write_pool(db, mix, args.n)
        print(f"wrote {args.n:,} rows x 2 vectors x {args.dim} d in {time.perf_counter() - t0:.1f}s", flush=True)
        t0, c0 = time.perf_counter(), cpu()
        _maintain_indices(tbl, cfg, args.n, changed=True)
        t_build, c_build = time.perf_counter() - t0, cpu() - c0
        print(f"index build (FTS + {cfg.vector_index} on 2 vector columns): {t_build:.1f}s wall, {c_build:.1f}s CPU; "
              f"{p}", flush=True)
    kind = {v: k for k, v in INDEX_TYPES.items()}.get(PoolIndex(db, cfg).indexed.get("text_vector"), "exact")
    print(f"search: {kind} (the built index), " + (f"nprobes {cfg.hnsw_nprobes}, ef {cfg.hnsw_ef or 'default'}"
          if kind == "IVF_HNSW_SQ" else f"nprobes {cfg.nprobes}") + f", refine_candidates {cfg.refine_candidates}, "
          f"query_threads {cfg.query_threads}", flush=True)

    rng = np.random.default_rng(2)
    qi = rng.integers(0, args.n, args.queries)
    qv = _unit(data[qi].astype(np.float32) + mix.offset(rng, args.queries, 0.5, iso=0.0))
    qtext = [" ".join(WORDS[rng.integers(0, len(WORDS), 2)]) for _ in qi]
    t0 = time.perf_counter()
    truth = exact_top(data, qv)
    print(f"exact neighbours (numpy brute force): {time.perf_counter() - t0:.1f}s", flush=True)

    idx = PoolIndex(db, cfg)
    got, ann_qps, ann_ms = timed(lambda i: idx.nearest(qv[i], 10, columns=("id",))["id"].to_pylist(), len(qv))
    rec = recall(got, truth)
    _, h10_qps, h10_ms = timed(lambda i: idx.hybrid(qtext[i], qv[i], 10), len(qv))
    _, h2_qps, h2_ms = timed(lambda i: idx.hybrid(qtext[i], qv[i], 10), len(qv), threads=2)
    sk = AttributionConfig().search_k
    _, h50_qps, h50_ms = timed(lambda i: idx.hybrid(qtext[i], qv[i], sk), len(qv))
    bs = max(1, args.batch)

    def many(k):
        return lambda i: idx.hybrid_many(qtext[i:i + bs], qv[i:i + bs], k)

    _, hb10_qps, hb10_ms = timed(many(10), len(qv), bs)
    _, hb2_qps, hb2_ms = timed(many(10), len(qv), bs, threads=2)
    _, hb_qps, hb_ms = timed(many(sk), len(qv), bs)
    ne = min(args.exact_queries, len(qv))

    def flat(i):
        r = tbl.search(qv[i], vector_column_name="text_vector").distance_type("cosine").bypass_vector_index()
        return r.limit(10).select(["id", "_distance"]).to_arrow()["id"].to_pylist()

    ex, ex_qps, ex_ms = timed(flat, ne)
    print(f"rows {args.n:,}, {len(qv)} queries; CPU ms/query counts all threads")
    print(f"{kind} vector search (PoolIndex.nearest, k=10, single stream): {ann_qps:.0f} q/s, "
          f"{ann_ms:.1f} CPU ms/query, recall@10 {rec:.3f} vs exact")
    print(f"hybrid search (PoolIndex.hybrid, k=10, single stream): {h10_qps:.0f} q/s, {h10_ms:.1f} CPU ms/query")
    print(f"hybrid search, 2 queries in flight (PoolIndex.hybrid from 2 threads, k=10): {h2_qps:.0f} q/s, "
          f"{h2_ms:.1f} CPU ms/query")
    print(f"hybrid search (PoolIndex.hybrid, k={sk} = attribution.search_k, single stream): {h50_qps:.0f} q/s, "
          f"{h50_ms:.1f} CPU ms/query")
    print(f"hybrid search batched (PoolIndex.hybrid_many, {bs} queries per call, k=10, single stream): "
          f"{hb10_qps:.0f} q/s, {hb10_ms:.1f} CPU ms/query")
    print(f"hybrid search batched, 2 calls in flight (PoolIndex.hybrid_many from 2 threads, {bs} queries per "
          f"call, k=10): {hb2_qps:.0f} q/s, {hb2_ms:.1f} CPU ms/query")
    print(f"hybrid search batched (PoolIndex.hybrid_many, {bs} queries per call, k={sk}, single stream): "
          f"{hb_qps:.0f} q/s, {hb_ms:.1f} CPU ms/query")
    print(f"exact search (LanceDB flat scan, {ne} queries): {ex_qps:.2f} q/s, {ex_ms:.0f} CPU ms/query, "
          f"recall@10 {recall(ex, truth):.3f}")
    built = "not measured (--reuse)" if args.reuse else f"{t_build:.1f}s wall, {c_build:.1f}s CPU"
    print(f"index build: {built}; whole run {time.perf_counter() - t_all:.0f}s")
    print(f"speed-up of {kind} over exact search: {ann_qps / ex_qps:.1f}x")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(f"retrieval recall@10: {rec:.2f}")


if __name__ == "__main__":
    main()
