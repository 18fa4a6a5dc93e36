"""Stage-4 throughput against a bare Pillow decode, measured in the same run.

    python benchmarks/stage4.py [--n 10000] [--workdir data/bench]

n = 10,000 (1.7 GB of JPEGs) measures the steady state a long run sees, as stage1.py's 20,000 does:
a job's fixed costs (Ray Data's stats and autoscaler actors, worker imports, the decision pass:
~10 s on 2 idle cores) are a third of the time at n = 2,000 and they do not grow with the corpus.
(Quiet machine, before the compiled BRISQUE passes and the allocator fix of curation/QUALITY.md:
0.32 at n = 2,000, 0.43 and 0.35 in two runs at 10,000, the baseline moving 236-279 img/s.)

(a) baseline: ``Image.open(f).convert("RGB")`` (a full decode) of every file with a multiprocessing
    pool, one process per core;
(b) ours: the stage-4 chain without CLIP (broken, resolution, BRISQUE image quality, JPEG quality
    factor + blockiness; ``--skip aesthetic``) run by the job through Ray Data on the same files and
    cores — planning, worker start-up and imports, Lance writes of the scores and the stored source
    bytes, commits and the decision pass included. Ray start-up is timed apart and left out of the
    ratio, as in benchmarks/stage2.py: a cluster (or a long-lived local Ray) is already running when
    a stage job starts, as the baseline's pool is cheap to start.
Files: JPEGs whose width and height are each 1024-1536 px (the 1024p bucket). Also printed: the
CPU time per image of each step on one core (load-independent: where the time goes), and their sum
against the full decode, the ratio a long run's scoring phase tends to on an idle machine, before
the engine's own costs (file reads, Lance writes, Ray).
The last line is ``stage4 chain/decode ratio: X.XX`` = (b) / (a).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stage1 import bare_decode, linked_subset, make_corpus  # noqa: E402

from curation.cli import CONFIGS  # noqa: E402
from curation.config import load_config  # noqa: E402


def scorer_costs(paths: list[str], repeat: int = 3) -> dict[str, float]:
    """CPU milliseconds per image of each step on one core (mean over ``paths``, best of ``repeat``):
    CPU time, so the figures hold on a loaded machine."""
    import cv2
    from PIL import Image

    from curation.decode import decode
    from curation.quality import BLOCKINESS_CROP, blockiness, brisque_score, jpeg_quality

    cv2.setNumThreads(1)  # one core, as in a worker (curation.stage sets the same)
    datas = [Path(p).read_bytes() for p in paths]
    # No filter of this chain reads colour: the worker decodes luma only, once, at full scale
    # (curation.run.make_plan -> Plan.grey); the working image and the blockiness crop both come from it.
    ds = [decode(data, 512, 1 << 40, BLOCKINESS_CROP, grey=True) for data in datas]
    steps = {"full decode (a)": lambda k: Image.open(io.BytesIO(datas[k])).convert("RGB"),
             "grey decode + 512 px image + luma crop": lambda k: decode(datas[k], 512, 1 << 40, BLOCKINESS_CROP, grey=True),
             "brisque": lambda k: brisque_score(ds[k].image), "blockiness": lambda k: blockiness(ds[k].grid),
             "jpeg_quality": lambda k: jpeg_quality(datas[k])}
    out = {}
    for name, fn in steps.items():
        total = 0.0
        for k in range(len(datas)):
            best = float("inf")
            for _ in range(repeat):
                t = time.process_time()
                fn(k)
                best = min(best, time.process_time() - t)
            total += best
        out[name] = total / len(datas) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--workdir", default="data/bench")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    work = Path(args.workdir)
    paths = make_corpus(work / "corpus-1024-1536", args.n, 1024, 1536)
    corpus = linked_subset(paths, work / f"corpus4-n{args.n}")
    print(f"corpus: {len(paths)} JPEGs, width and height 1024-1536 px, "
          f"{sum(os.path.getsize(p) for p in paths) / 1e6:.0f} MB, {cpus} cores")
    costs = scorer_costs(paths[:32])  # 32 x 3 passes: ~2 s
    print("CPU ms per image, one core: " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()))
    chain = sum(v for k, v in costs.items() if k not in ("full decode (a)",))
    print(f"chain CPU per image {chain:.1f} ms vs full decode {costs['full decode (a)']:.1f} ms: "
          f"CPU-bound ratio {costs['full decode (a)'] / chain:.2f}")

    decode_rate = bare_decode(paths, cpus)
    print(f"(a) bare Pillow full decode, {cpus} processes: {decode_rate:.1f} img/s")

    import ray

    from curation.run import run_stage

    out = work / "out_stage4.lance"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(CONFIGS / "stage4.yaml")
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - t:.1f} s (not in the ratio)")
    t = time.perf_counter()
    summary = run_stage(str(corpus), str(out), cfg, ("aesthetic",), progress=False, report=False)
    wall = time.perf_counter() - t
    rate = summary.rows / wall
    ray.shutdown()
    print(f"(b) stage-4 chain without CLIP via Ray Data + Lance: {rate:.1f} img/s {summary.reasons}; "
          f"{wall:.1f} s = scoring + commits {summary.scoring_seconds:.1f} s ({summary.rows / summary.scoring_seconds:.1f}"
          f" img/s) + planning and decision pass {wall - summary.scoring_seconds:.1f} s")
    print("load average (1/5/15 min): " + " / ".join(f"{v:.1f}" for v in os.getloadavg()))
    print(f"stage4 chain/decode ratio: {rate / decode_rate:.2f}")


if __name__ == "__main__":
    main()
