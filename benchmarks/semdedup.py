"""Semantic dedup time and memory at 1x, 2x, 4x rows: growth must stay close to linear.

    python benchmarks/semdedup.py [--rows 250000] [--dim 512] [--num-cpus 2]

Synthetic embeddings shaped like CLIP's (rows around 2,000 topic directions, float16, as stored)
with 1% planted near copies (cosine ~0.99). Each size runs ``curation.semdedup.run`` on local Ray
(default cluster size 1,000 rows) and reports the time, the recall of the planted copies, and the
peak memory: the driver's RSS growth during the run and the peak summed RSS of the Ray worker
processes (sampled; shared object-store pages count in both). The last line is ``semdedup time growth 4x/1x: X.XX
(linear = 4.00)``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float16 embeddings, copy rows, their source rows); made in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(2000, d)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    out = np.empty((n, d), np.float16)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        x = topics[rng.integers(0, len(topics), m)] + rng.normal(size=(m, d)).astype(np.float32) * (1.0 / np.sqrt(d))
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    n_copies = n // 100
    copies = rng.choice(n, n_copies, replace=False)
    sources = rng.choice(np.setdiff1d(np.arange(n), copies), n_copies, replace=False)
    x = out[sources].astype(np.float32) + rng.normal(size=(n_copies, d)).astype(np.float32) * (0.1 / np.sqrt(d))
    out[copies] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, copies, sources


class PeakMemory(threading.Thread):
    """Samples (every 0.2 s) the driver's RSS above what it held at the start, and the summed RSS of
    this session's Ray worker processes (descendants of the driver named ``ray::``)."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.me = psutil.Process(os.getpid())
        self.base = self.me.memory_info().rss
        self.driver = self.workers = 0
        self.stop = False

    def run(self) -> None:
        import psutil

        while not self.stop:
            total = 0
            for p in self.me.children(recursive=True):
                try:
                    if "ray::" in " ".join(p.cmdline()[:1]):
                        total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.workers = max(self.workers, total)
            self.driver = max(self.driver, self.me.memory_info().rss - self.base)
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=250_000, help="the 1x size")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()
    import ray

    from curation import semdedup

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    warm, _, _ = make(5000, args.dim)  # start the workers and import faiss there before timing
    semdedup.run(np.arange(5000).astype(str), warm, [], args.eps)
    times = {}
    for mult in (1, 2, 4):
        n = args.rows * mult
        emb, copies, sources = make(n, args.dim)
        ids = np.array([f"{i:09d}" for i in range(n)], dtype=object)
        mon = PeakMemory()
        mon.start()
        t = time.perf_counter()
        r = semdedup.run(ids, emb, [], args.eps)
        times[mult] = time.perf_counter() - t
        mon.stop = True
        mon.join()
        recall = float((~r.keep[copies] | ~r.keep[sources]).mean())
        print(f"{mult}x: {n:>9,} rows x {args.dim}: {times[mult]:7.1f}s ({n / times[mult]:,.0f} rows/s), "
              f"{r.n_clusters} clusters, {int((~r.keep).sum()):,} rejected, planted recall {recall:.4f}, "
              f"driver peak RSS +{mon.driver / 2**30:.2f} GiB, workers peak RSS {mon.workers / 2**30:.2f} GiB "
              f"(embeddings {emb.nbytes / 2**30:.2f} GiB)", flush=True)
        del emb, r
    ray.shutdown()
    print(f"semdedup time growth 2x/1x: {times[2] / times[1]:.2f} (linear = 2.00)")
    print(f"semdedup time growth 4x/1x: {times[4] / times[1]:.2f} (linear = 4.00)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
