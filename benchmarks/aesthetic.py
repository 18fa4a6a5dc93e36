"""Aesthetic head throughput on stored embeddings, against the predictor's reference usage.

    python benchmarks/aesthetic.py [--rows 100000] [--workdir data/bench_aesthetic]

(a) baseline: improved-aesthetic-predictor's own loop (its ``simple_inference.py``): one embedding
    at a time through the MLP (normalised in numpy, ``model(torch.from_numpy(x).float())``);
(b) ours: the ``clip_embedding`` column read from a Lance table in the curated schema (float16)
    and scored by ``curation.aesthetic.AestheticHead`` in batches — read time included.
Real LAION weights (../shared/models/laion-aesthetic-v2). The last line is
``aesthetic head rows/s ours/baseline ratio: X.XX``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHTS = ROOT.parent / "shared/models/laion-aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth"


def write_table(path: Path, n: int, d: int = 768) -> None:
    import lance
    import pyarrow as pa

    from curation.schema import EMBEDDING, scoring_schema

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    schema = scoring_schema(d)
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols["id"] = pa.array([f"{i:09d}" for i in range(n)])
    cols[EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), d)
    lance.write_dataset(pa.table(cols, schema=schema), str(path), mode="overwrite")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--baseline-rows", type=int, default=5_000, help="rows the one-at-a-time loop scores")
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--workdir", default=str(ROOT / "data/bench_aesthetic"))
    args = ap.parse_args()
    import lance
    import torch

    from curation.aesthetic import AestheticHead
    from curation.schema import EMBEDDING

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    table = work / "embeddings.lance"
    write_table(table, args.rows)
    head = AestheticHead(args.weights)
    head.setup()

    # (a) the reference loop, one row at a time, on embeddings already in memory.
    ds = lance.dataset(str(table))
    first = ds.to_table(columns=[EMBEDDING], limit=args.baseline_rows).column(EMBEDDING).combine_chunks()
    emb = first.flatten().to_numpy().reshape(-1, first.type.list_size).astype(np.float32)
    t = time.perf_counter()
    base = []
    with torch.inference_mode():
        for row in emb:
            v = row / np.linalg.norm(row)
            base.append(float(head.model(torch.from_numpy(v[None]).float())[0]))
    base_rate = len(emb) / (time.perf_counter() - t)

    # (b) ours: scan the stored column, score in batches.
    t = time.perf_counter()
    n, ours = 0, []
    for batch in ds.scanner(columns=[EMBEDDING], batch_size=65536).to_batches():
        col = batch.column(EMBEDDING)
        x = col.flatten().to_numpy().reshape(-1, col.type.list_size)
        ours.append(head(x))
        n += len(x)
    our_rate = n / (time.perf_counter() - t)
    agree = np.abs(np.concatenate(ours)[: len(base)] - np.array(base)).max()
    print(f"rows {n}, dim {emb.shape[1]}, torch threads {torch.get_num_threads()}")
    print(f"baseline (one row at a time, in memory): {base_rate:,.0f} rows/s on {len(base)} rows")
    print(f"ours (Lance scan + batched head):        {our_rate:,.0f} rows/s; max |diff| vs baseline {agree:.2e}")
    shutil.rmtree(table, ignore_errors=True)
    print(f"aesthetic head rows/s ours/baseline ratio: {our_rate / base_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
