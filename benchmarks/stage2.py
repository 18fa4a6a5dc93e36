"""Stage-2 (edit pairs) throughput against a bare decode of both images, measured in the same run.

    python benchmarks/stage2.py [--n 2000] [--size 768] [--workdir data/bench]

n = 2000 is the steady-state size: the job's fixed costs (planning, worker start-up and imports,
the decision pass, the last commit; about 5 s on 2 idle cores) are then under a fifth of its time.
Ray start-up is timed apart and left out of the ratio: a cluster (or a long-lived local Ray) is
already running when a stage job starts, as the baseline's pool is cheap to start.

Pairs: the real-photo edit pairs of ``curation.stage2.write_sample_pairs`` (local / global edits,
no-ops, unrelated pairs, JPEG, long side ``--size``), repeated with distinct keys to ``--n``.
(a) baseline: ``Image.open(...).convert("RGB")`` of both images of every pair, read from the same
    Parquet file, with a ``multiprocessing`` pool, one process per core;
(b) ours: the stage-2 model-free filters (broken = decode of both images at the working size,
    both resolutions, no-op: pHash + SSIM + changed cells, unrelated, duplicate pairs; ``--skip``
    NSFW, direction and instruction, which load models or a tokenizer) run by the job through Ray
    Data on the same cores — Lance writes, commits and the decision pass included; Ray start-up
    reported apart.
The last line is ``stage2 pairs/decode ratio: X.XX`` = (b) / (a).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _decode_pair(pair: tuple[bytes, bytes]) -> int:
    from PIL import Image

    return sum(Image.open(io.BytesIO(b)).convert("RGB").size[0] for b in pair)


def _tree_cpu() -> float:
    """CPU seconds of this process and its live descendants (Ray's GCS, raylet and workers)."""
    import psutil

    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


def make_pairs(path: Path, n: int, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.stage2 import write_sample_pairs

    base = path.with_suffix(".base.parquet")
    write_sample_pairs(str(base), size=size, bad=False)
    t = pq.read_table(base)
    reps = -(-n // t.num_rows)
    big = pa.concat_tables([t] * reps).slice(0, n)
    big = big.set_column(big.schema.get_field_index("key"), "key", pa.array([f"{i:07d}" for i in range(n)]))
    pq.write_table(big, path, row_group_size=64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--workdir", default="data/bench")
    a = ap.parse_args()
    import pyarrow.parquet as pq

    cpus = os.cpu_count() or 1
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pairs = work / f"pairs-n{a.n}-{a.size}.parquet"
    if not pairs.exists():
        make_pairs(pairs, a.n, a.size)
    print(f"pairs: {a.n} real-photo edit pairs, long side {a.size} px, {pairs.stat().st_size / 1e6:.0f} MB, {cpus} cores")

    t, c = time.perf_counter(), os.times()
    data = pq.read_table(pairs, columns=["source_image", "target_image"])
    todo = list(zip(data["source_image"].to_pylist(), data["target_image"].to_pylist(), strict=True))
    with Pool(cpus) as pool:
        pool.map(_decode_pair, todo, chunksize=16)
    decode_rate = a.n / (time.perf_counter() - t)
    base_cpu = sum(os.times()[:4]) - sum(c[:4])  # this process + its reaped pool workers
    print(f"(a) bare Pillow full decode of both images, {cpus} processes: {decode_rate:.1f} pairs/s")

    import ray

    from curation.stage2 import load_pair_config, run_pair_stage

    out = work / "out_stage2.lance"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_pair_config(str(Path(__file__).resolve().parents[1] / "configs" / "stage2.yaml"))
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - t:.1f} s (not in the ratio)")
    t, c = time.perf_counter(), _tree_cpu()
    summary = run_pair_stage(str(pairs), str(out), cfg, ("direction", "instruction", "source_nsfw", "target_nsfw"),
                             progress=False, report=False)
    wall = time.perf_counter() - t
    cpu = _tree_cpu() - c
    rate = summary.rows / wall
    ray.shutdown()
    print(f"(b) stage-2 model-free filters via Ray Data + Lance: {rate:.1f} pairs/s {summary.reasons}; "
          f"{wall:.1f} s = scoring + commits {summary.scoring_seconds:.1f} s ({summary.rows / summary.scoring_seconds:.1f}"
          f" pairs/s) + planning and decision pass {wall - summary.scoring_seconds:.1f} s")
    print(f"CPU per pair, all processes: (a) {1e3 * base_cpu / a.n:.1f} ms, (b) {1e3 * cpu / a.n:.1f} ms (driver, Ray "
          f"workers, raylet, GCS): CPU-bound ratio {base_cpu / cpu:.2f}; load average "
          + " / ".join(f"{v:.1f}" for v in os.getloadavg()))
    print(f"stage2 pairs/decode ratio: {rate / decode_rate:.2f}")


if __name__ == "__main__":
    main()
