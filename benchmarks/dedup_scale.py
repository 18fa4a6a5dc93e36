"""Global near-duplicate dedup at scale: recall against planted groups, time and peak memory.

    python benchmarks/dedup_scale.py [--sizes 1M,4M,16M] [--d 6] [--baseline-size 1M]

Each size runs in a fresh process (so peak memory is that size's own): ``n`` random 64-bit pHashes
of which ``--planted`` (default 10 %) sit in near-duplicate groups of ``--group`` hashes — a base
and copies 1..d bits from it — and ``curation.dedup.cluster`` (the driver's global dedup, content
hashes included) labels them. Recall = the share of planted copies labelled with their base. Peak
memory is the process's peak RSS above its RSS just before the call (the search's own arrays).
The baseline is the multi-index probing search (the previous default, still used for small inputs)
at ``--baseline-size``. The last line is ``dedup 4x growth: X.XX`` = time at 4M / time at 1M
(or of the first two sizes 4x apart) by the process's CPU time: on a shared machine wall time
measures the other jobs; the wall-time ratio is printed on the line above it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import dedup  # noqa: E402


def size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * mult)


def planted(n: int, d: int, share: float, group: int, seed: int = 0):
    """(hashes, base index per planted copy, copy indices): random hashes, a ``share`` of them in
    groups of ``group``: a base and copies each 1..d random bits away from it."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    groups = int(n * share) // group
    base = rng.choice(n, groups, replace=False)
    copies = np.setdiff1d(np.arange(n), base)[: groups * (group - 1)]
    rng.shuffle(copies)
    base_of = np.repeat(base, group - 1)
    flips = np.zeros(len(copies), np.uint64)
    dist = rng.integers(1, d + 1, len(copies))
    # Distinct bit positions per copy: a bit already flipped is drawn again (O(copies) memory, so
    # the input's own peak stays below the search's).
    for k in range(d):
        todo = np.flatnonzero(dist > k)
        while len(todo):
            bit = np.uint64(1) << rng.integers(0, 64, len(todo)).astype(np.uint64)
            fresh = (flips[todo] & bit) == 0
            flips[todo[fresh]] |= bit[fresh]
            todo = todo[~fresh]
    h[copies] = h[base_of] ^ flips
    return h, base_of, copies


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def one(n: int, d: int, share: float, group: int, how: str | None) -> dict:
    h, base_of, copies = planted(n, d, share, group)
    content = np.arange(n, dtype=np.int64)
    force = (how.split(":")[0], int(how.split(":")[1])) if how else None
    chosen = force or dedup.plan(len(np.unique(h)), d)
    # Peak memory as the process's peak RSS over its RSS before the call: tracemalloc would trace
    # every numpy allocation and add ~35 % to the time measured.
    before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    labels = dedup.cluster(h, content, d, how=force)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    recall = float((labels[copies] == labels[base_of]).mean()) if len(copies) else 1.0
    expected = n - len(copies)  # clusters if only planted groups merged
    return {"n": n, "plan": f"{chosen[0]}:{chosen[1]}", "wall": wall, "cpu": cpu, "recall": recall,
            "peak_mb": peak_mb, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "extra_merges": expected - len(np.unique(labels))}


def run_child(n: int, args, how: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--one", str(n), "--d", str(args.d), "--planted", str(args.planted),
           "--group", str(args.group)] + (["--how", how] if how else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def show(tag: str, r: dict) -> None:
    print(f"{tag:<9} n={r['n']:>10,}  plan {r['plan']:<8} {r['wall']:8.1f} s wall  {r['cpu']:8.1f} s cpu  "
          f"recall {r['recall']:.4f}  peak {r['peak_mb']:7.0f} MiB (in cluster)  "
          f"rss {r['rss_mb']:7.0f} MiB  random merges {r['extra_merges']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,4M,16M")
    ap.add_argument("--d", type=int, default=6, help="max Hamming distance (thresholds.dedup.max_hamming)")
    ap.add_argument("--planted", type=float, default=0.1, help="share of hashes in planted groups")
    ap.add_argument("--group", type=int, default=4, help="hashes per planted group")
    ap.add_argument("--baseline-size", default="1M", help="size for the probing baseline ('0': none)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--how", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.d, args.planted, args.group, args.how)))
        return
    sizes = [size(s) for s in args.sizes.split(",")]
    print(f"{len(sizes)} sizes, d={args.d}, {args.planted:.0%} of hashes in groups of {args.group}; "
          "each size in a fresh process", flush=True)
    res = {}
    for n in sizes:
        res[n] = run_child(n, args)
        show("ours", res[n])
    nb = size(args.baseline_size)
    if nb:
        probe = min(range(3, 9), key=lambda m: dedup._probe_cost(nb, args.d, m))
        base = run_child(nb, args, f"probe:{probe}")
        show("baseline", base)
        ours = res.get(nb) or run_child(nb, args)
        print(f"dedup probing/ours time at {nb:,}: {base['wall'] / ours['wall']:.2f} "
              f"(cpu {base['cpu'] / ours['cpu']:.2f})")
    pair = next(((a, b) for a in sizes for b in sizes if b == 4 * a), None)
    if pair is None:
        print("dedup 4x growth: n/a (no two sizes 4x apart)")
        return
    a, b = res[pair[0]], res[pair[1]]
    print(f"wall-time 4x growth: {b['wall'] / a['wall']:.2f} ({pair[1]:,} / {pair[0]:,} hashes)")
    print(f"dedup 4x growth: {b['cpu'] / a['cpu']:.2f} (CPU time)")


if __name__ == "__main__":
    main()
