"""Stage-1 throughput against a bare Pillow decode, measured in the same run.

    python benchmarks/stage1.py [--n 20000] [--workdir data/bench]

(a) baseline: ``Image.open(f).convert("RGB")`` of every file with a multiprocessing pool, one
    process per core;
(b) ours: the stage-1 model-free chain (broken, resolution, exact + near dedup, rotation/EXIF,
    entropy, token length) run by the job through Ray Data on the same cores — Ray start-up,
    Lance writes and the decision pass included;
(c) ours with the CLIP (tiny random open_clip) and NSFW (NudeNet's shipped ONNX model) filters on;
(d) global dedup time at 1x..4x the corpus's hashes (must grow about linearly).
The last line is ``stage1 chain/decode ratio: X.XX`` = (b) / (a).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import dedup  # noqa: E402
from curation.config import load_config  # noqa: E402
from curation.samples import CAPTIONS, make_tiny_clip, make_tiny_tokenizer, real_photos  # noqa: E402


def make_corpus(root: Path, n: int, lo: int = 512, hi: int = 1024) -> list[str]:
    """n JPEGs whose width and height are each lo-hi px (uniform, independently): random crops of
    the bundled real photos with that aspect ratio, resized, flipped at random, quality 80-95."""
    root.mkdir(parents=True, exist_ok=True)
    existing = sorted(str(p) for p in root.glob("*.jpg"))
    if len(existing) >= n:
        return existing[:n]
    rng = np.random.default_rng(0)
    photos = [im for _, im in real_photos()]
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        tw, th = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        # The largest region of the photo with the target's aspect ratio, shrunk to 60-100 %.
        cw, ch = (w, w * th / tw) if w * th / tw <= h else (h * tw / th, h)
        f = rng.uniform(0.6, 1.0)
        cw, ch = cw * f, ch * f
        x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        crop = im.resize((tw, th), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        p = root / f"img_{i:06d}.jpg"
        crop.save(p, quality=int(rng.integers(80, 96)))
        p.with_suffix(".txt").write_text(CAPTIONS[i % len(CAPTIONS)])
        paths.append(str(p))
    return paths


def linked_subset(paths: list[str], folder: Path) -> Path:
    """A folder holding exactly ``paths`` and their captions, as hard links."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {q.name: q for p in paths for q in (Path(p), Path(p).with_suffix(".txt"))}
    for f in folder.iterdir():
        if f.name not in want:
            f.unlink()
    for name, q in want.items():
        if not (folder / name).exists():
            os.link(q, folder / name)
    return folder


def _decode(path: str) -> int:
    with Image.open(path) as im:
        return im.convert("RGB").size[0]


def bare_decode(paths: list[str], procs: int) -> float:
    t = time.perf_counter()
    with mp.get_context("fork").Pool(procs) as pool:
        for _ in pool.imap_unordered(_decode, paths, chunksize=16):
            pass
    return len(paths) / (time.perf_counter() - t)


def run_job(corpus: Path, out: Path, overrides: dict, skip: tuple[str, ...], cpus: int):
    """Run the job in a fresh Ray instance; img/s over the whole job (Ray start-up included), the
    start-up seconds and the img/s of the scoring phase alone (what a long run converges to)."""
    import ray

    from curation.run import run_stage

    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, overrides)
    t = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)  # as run_stage would
    startup = time.perf_counter() - t
    summary = run_stage(str(corpus), str(out), cfg, skip, commit_every=10_000, progress=False, report=False)
    elapsed = time.perf_counter() - t
    ray.shutdown()
    return summary.rows / elapsed, summary.reasons, startup, summary.rows / summary.scoring_seconds


def dedup_scaling(base: np.ndarray, max_hamming: int) -> list[tuple[int, float]]:
    """Global clustering time at 1x, 2x, 4x the corpus's hashes. The extra data is new images:
    random 64-bit hashes, a fifth of them near copies (1-3 bits flipped) of an earlier hash, the
    shape of a larger crawl. Best of 5 runs per size."""
    rng = np.random.default_rng(1)
    out = []
    for k in (1, 2, 4):
        extra = rng.integers(0, 2**63, (k - 1) * len(base), dtype=np.int64).astype(np.uint64) << np.uint64(1)
        pool = np.concatenate([base, extra])
        near = rng.random(len(extra)) < 0.2
        src = pool[rng.integers(0, len(base), near.sum())]
        flips = np.zeros(near.sum(), np.uint64)
        for _ in range(3):
            flips |= np.uint64(1) << rng.integers(0, 64, near.sum()).astype(np.uint64)
        extra[near] = src ^ flips
        h = np.concatenate([base, extra])
        content = np.arange(len(h)).astype(str)
        best = min(_timed(dedup.cluster, h, content, max_hamming) for _ in range(5))
        out.append((len(h), best))
    return out


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000, help="corpus size (>= 2000)")
    ap.add_argument("--workdir", default="data/bench")
    ap.add_argument("--model-subset", type=int, default=400, help="images for the CLIP+NSFW run")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    work = Path(args.workdir)
    # Generated once into a pool (the name changed with the generator, so old caches stay out), and
    # the job reads a folder of exactly --n of them (hard links).
    paths = make_corpus(work / "corpus-512-1024", args.n)
    corpus = linked_subset(paths, work / f"corpus-n{args.n}")
    models = work / "models"
    tok = make_tiny_tokenizer(models / "tokenizer")
    name, cfg_json, weights = make_tiny_clip(models / "clip")
    print(f"corpus: {len(paths)} JPEGs, width and height 512-1024 px, {sum(os.path.getsize(p) for p in paths) / 1e6:.0f} MB, {cpus} cores")

    base = {"scoring.tokenizer": tok, "scoring.rotation.detector": "none"}
    decode_rate = bare_decode(paths, cpus)
    print(f"(a) bare Pillow full decode, {cpus} processes: {decode_rate:.1f} img/s")
    chain_rate, reasons, startup, steady = run_job(corpus, work / "out_free.lance", base, ("clip", "nsfw"), cpus)
    print(f"(b) stage-1 model-free chain via Ray Data + Lance: {chain_rate:.1f} img/s  {reasons}\n"
          f"    (ray.init {startup:.1f} s; the Ray Data scoring phase alone: {steady:.1f} img/s, "
          f"{steady / decode_rate:.2f} of (a))")

    sub = linked_subset(paths[: args.model_subset], work / f"corpus-n{args.model_subset}")
    full = dict(base, **{"scoring.clip.model": name, "scoring.clip.model_config": cfg_json,
                         "scoring.clip.weights": weights, "scoring.rotation.detector": "clip"})
    model_rate, *_ = run_job(sub, work / "out_models.lance", full, (), cpus)
    print(f"(c) with CLIP (tiny, + rotation detector) and NudeNet NSFW on {args.model_subset} images: "
          f"{model_rate:.1f} img/s")

    import lance

    h = lance.dataset(str(work / "out_free.lance")).to_table(columns=["phash"]).column("phash").drop_null()
    scaling = dedup_scaling(h.to_numpy(), 6)
    n1, t1 = scaling[0]
    print("(d) global dedup: " + ", ".join(f"{n} hashes {t * 1e3:.0f} ms ({t / t1:.2f}x)" for n, t in scaling)
          + f"; 4x data -> {scaling[-1][1] / t1:.2f}x time")
    print(f"stage1 chain/decode ratio: {chain_rate / decode_rate:.2f}")


if __name__ == "__main__":
    main()
