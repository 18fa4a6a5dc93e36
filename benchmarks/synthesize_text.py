"""Synthetic-text throughput against a bare Pillow render loop, measured in the same run.

    python benchmarks/synthesize_text.py [--n 2000] [--n-ocr 200] [--workdir data/bench_synth]

(a) baseline: a bare loop — ``Image.new`` + ``ImageDraw.text`` of a sentence in Noto Sans CJK on a
    plain 512 px background + PNG encode — with a multiprocessing pool, one process per core;
(b) ours without OCR read-back (``ocr.engine: none``): the job's renders (templates, wrapping,
    gradients, photo crops, captions validated against the text schema) through Ray Data with Lance
    fragment writes, commits and the decision pass, on the same cores; Ray start-up excluded
    from the render phase, printed apart;
(c) ours with rapidocr read-back (fewer renders: OCR dominates).
The last line is ``synthesize_text renders/bare ratio: X.XX`` = (b) / (a) in renders/s.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import synthetic_text as st  # noqa: E402


def _bare(i: int) -> int:
    rng = np.random.default_rng([0, i])
    text = st.TextMaker(rng).sentence(("en", "zh")[i % 2])
    path, index = st._font_file(st._default_fonts()["noto-sans-sc"].regular)
    font = ImageFont.truetype(path, 28, index=index)
    im = Image.new("RGB", (512, 512), tuple(int(v) for v in rng.integers(170, 256, 3)))
    ImageDraw.Draw(im).text((32, 240), text, font=font, fill=(20, 20, 20))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return len(buf.getvalue())


def bare(n: int, procs: int) -> float:
    t = time.time()
    with mp.get_context("spawn").Pool(procs) as pool:
        sum(pool.imap_unordered(_bare, range(n), chunksize=16))
    return n / (time.time() - t)


def ours(out: Path, n: int, engine: str, cpus: int) -> tuple[float, float]:
    cfg = st.load_config(overrides={"ocr": {"engine": engine}})
    shutil.rmtree(out, ignore_errors=True)
    s = st.run_synthesis(str(out), n, cfg, seed=0, commit_every=max(1, n // 4), progress=False,
                         report=False, num_cpus=cpus)
    return s.rendered_now / s.render_seconds, s.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-ocr", type=int, default=200)
    ap.add_argument("--workdir", default="data/bench_synth")
    args = ap.parse_args()
    cpus = os.cpu_count() or 1
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    a = bare(args.n, cpus)
    print(f"(a) bare PIL loop, {cpus} processes: {a:.1f} renders/s", flush=True)
    t = time.time()
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.time() - t:.1f}s", flush=True)
    b, b_total = ours(work / "no_ocr.lance", args.n, "none", cpus)
    print(f"(b) ours, no OCR: {b:.1f} renders/s in the render phase ({args.n / b_total:.1f}/s with the "
          f"decision pass and set-up)", flush=True)
    c, c_total = ours(work / "ocr.lance", args.n_ocr, "rapidocr", cpus)
    print(f"(c) ours, rapidocr read-back: {c:.2f} renders/s ({args.n_ocr / c_total:.2f}/s overall); "
          f"OCR costs {b / c:.1f}x the render", flush=True)
    print(f"synthesize_text renders+ocr/bare ratio: {c / a:.3f}")
    print(f"synthesize_text renders/bare ratio: {b / a:.2f}")


if __name__ == "__main__":
    main()
