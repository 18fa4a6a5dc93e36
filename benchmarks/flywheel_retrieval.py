"""Retrieval engine benchmark: IVF_PQ (the flywheel's index settings) against exact search on
synthetic 768-d CLIP-like embeddings (clustered, L2-normalised) with caption-like text.

    python benchmarks/flywheel_retrieval.py                  # 1M rows (the issue's size)
    python benchmarks/flywheel_retrieval.py --n 200000       # a quick run

Reports the build time of the IVF_PQ and full-text indices, vector-search q/s and recall@10 of
IVF_PQ against exact (brute-force) neighbours, exact-search q/s through LanceDB (flat scan, same
queries), and hybrid (IVF_PQ + BM25, RRF) q/s. Queries run one at a time from one thread. The last
line is `retrieval recall@10: X.XX`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.config import IndexConfig  # noqa: E402
from flywheel.index import _fts_query, vector_index  # noqa: E402

WORDS = np.array("zebra bus cat dog tower river bridge street night red blue green old new small big city field "
                 "mountain lake portrait poster chart diagram logo sign market boat train car flower tree".split())


def batches(n: int, dim: int, centres: np.ndarray, seed: int, size: int = 50_000):
    rng = np.random.default_rng(seed)
    for start in range(0, n, size):
        m = min(size, n - start)
        c = rng.integers(0, len(centres), m)
        v = centres[c] + rng.normal(scale=0.6 / np.sqrt(dim), size=(m, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        words = WORDS[(c[:, None] * 7 + rng.integers(0, 5, (m, 4))) % len(WORDS)]
        text = [" ".join(w) + f" item {start + i}" for i, w in enumerate(words)]
        yield pa.table({"id": pa.array([f"r{start + i}" for i in range(m)]), "text": text,
                        "text_vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), dim)}), v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--nprobes", type=int, default=IndexConfig.nprobes)
    ap.add_argument("--refine-factor", type=int, default=IndexConfig.refine_factor)
    ap.add_argument("--dir", help="where to write the table (default: a temp dir, removed)")
    args = ap.parse_args()
    import lancedb
    from lancedb.index import FTS
    from lancedb.rerankers import RRFReranker

    cfg = IndexConfig(nprobes=args.nprobes, refine_factor=args.refine_factor)
    root = Path(args.dir or tempfile.mkdtemp(prefix="fw_bench_"))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    db = lancedb.connect(str(root / "db"))
    t0 = time.perf_counter()
    tbl, vecs = None, []
    for t, v in batches(args.n, args.dim, centres, seed=1):
        if tbl is None:
            tbl = db.create_table("bench", t)
        else:
            tbl.add(t)
        vecs.append(v.astype(np.float16))  # ground truth in half precision keeps 1M x 768 at 1.5 GB
    data = np.concatenate(vecs)
    print(f"wrote {args.n:,} rows x {args.dim} d in {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    vector_index(tbl, "text_vector", cfg, args.n)
    t_ivf = time.perf_counter() - t0
    t0 = time.perf_counter()
    tbl.create_index("text", config=FTS(with_position=False, remove_stop_words=True, stem=True))
    t_fts = time.perf_counter() - t0
    print(f"index build: IVF_PQ {t_ivf:.1f}s ({max(1, args.n // cfg.rows_per_partition)} partitions, "
          f"nprobes {cfg.nprobes}, refine {cfg.refine_factor}), FTS {t_fts:.1f}s", flush=True)

    qs, _ = next(batches(args.queries, args.dim, centres, seed=2, size=args.queries))
    qv = np.stack(qs["text_vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    qtext = [_fts_query(" ".join(t.split()[:3])) for t in qs["text"].to_pylist()]
    truth = []
    for q in qv:  # exact neighbours by brute force (chunked: half-precision storage, float32 math)
        sims = np.concatenate([data[i:i + 200_000].astype(np.float32) @ q for i in range(0, len(data), 200_000)])
        truth.append(set(np.argpartition(-sims, 10)[:10].tolist()))

    def timed(fn):
        fn(0)  # warm the index cache
        t = time.perf_counter()
        out = [fn(i) for i in range(len(qv))]
        return out, len(qv) / (time.perf_counter() - t)

    def ann(i):
        r = tbl.search(qv[i], vector_column_name="text_vector").distance_type("cosine").nprobes(cfg.nprobes)
        return r.refine_factor(cfg.refine_factor).limit(10).select(["id"]).to_arrow()["id"].to_pylist()

    def exact(i):
        r = tbl.search(qv[i], vector_column_name="text_vector").distance_type("cosine").bypass_vector_index()
        return r.limit(10).select(["id"]).to_arrow()["id"].to_pylist()

    def hybrid(i):
        r = tbl.search(query_type="hybrid", vector_column_name="text_vector").vector(qv[i]).text(qtext[i])
        r = r.distance_type("cosine").nprobes(cfg.nprobes).refine_factor(cfg.refine_factor)
        return r.rerank(RRFReranker()).limit(10).select(["id"]).to_arrow()["id"].to_pylist()

    got, ann_qps = timed(ann)
    recall = float(np.mean([len({int(x[1:]) for x in g} & t) / 10 for g, t in zip(got, truth, strict=True)]))
    n_exact = min(len(qv), 20)
    qv_all = qv
    qv = qv_all[:n_exact]
    ex, exact_qps = timed(exact)
    exact_recall = float(np.mean([len({int(x[1:]) for x in g} & t) / 10 for g, t in zip(ex, truth, strict=False)]))
    qv = qv_all
    _, hybrid_qps = timed(hybrid)
    print(f"IVF_PQ vector search: {ann_qps:.0f} q/s, recall@10 {recall:.3f} (vs brute force)")
    print(f"exact search (LanceDB flat scan, {n_exact} queries): {exact_qps:.1f} q/s, recall@10 {exact_recall:.3f}")
    print(f"hybrid search (IVF_PQ + BM25, RRF): {hybrid_qps:.0f} q/s")
    print(f"speed-up of IVF_PQ over exact search: {ann_qps / exact_qps:.1f}x")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(f"retrieval recall@10: {recall:.2f}")


if __name__ == "__main__":
    main()
