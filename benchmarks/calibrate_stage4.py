"""Calibrate the stage-4 quality defaults on real photos and degraded copies made from them.

    python benchmarks/calibrate_stage4.py

Clean: the photos bundled in scikit-image / scikit-learn (JPEG q92, as a camera or a site would
serve them), bokeh versions of them (sharp centre subject, background blurred hard) and smooth
synthetic illustrations (gradients, flat-colour shapes; PNG and JPEG q92). Degraded: Gaussian blur,
Gaussian noise, low-resolution upscales, low-quality JPEG (q <= 20), q10 re-saved at q95, and a q10
JPEG stored as PNG. Prints each score's distribution per class, then the defaults in
``curation/quality.py`` with the precision/recall they reach (positive = degraded = rejected).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import quality  # noqa: E402
from curation.decode import decode  # noqa: E402
from curation.samples import jpeg, png, real_photos  # noqa: E402

# Photos of natural scenes (the bundled set also holds micrographs, a star field and a colour wheel:
# not what a photo quality model was trained on, scored apart as "other").
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "camera", "coins", "china", "flower")
CLEAN = ("clean", "bokeh", "illustration")


def bokeh(im: Image.Image) -> Image.Image:
    """Shallow depth of field: the central ellipse stays sharp, the rest is blurred hard."""
    w, h = im.size
    mask = Image.new("L", im.size, 0)
    ImageDraw.Draw(mask).ellipse((w * 0.28, h * 0.22, w * 0.72, h * 0.78), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(min(w, h) / 40))
    return Image.composite(im, im.filter(ImageFilter.GaussianBlur(min(w, h) / 50)), mask)


def illustrations(size: int = 768) -> list[tuple[str, Image.Image]]:
    """Smooth synthetic pictures: gradients, flat-colour shapes, a line drawing."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    lin = np.stack([255 * x, 120 + 100 * y, 255 * (1 - x * y)], -1)
    out.append(("gradient", Image.fromarray(lin.astype(np.uint8))))
    r = np.hypot(x - 0.5, y - 0.4)
    rad = np.stack([250 - 200 * r, 180 - 150 * r, 90 + 160 * r], -1).clip(0, 255)
    out.append(("radial", Image.fromarray(rad.astype(np.uint8))))
    rng = np.random.default_rng(1)
    for k in range(3):
        im = Image.fromarray(lin.astype(np.uint8)) if k == 2 else Image.new("RGB", (size, size), (245, 240, 225))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x0, y0 = rng.integers(0, size - 200, 2)
            w, h = rng.integers(60, 200, 2)
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x0 + w, y0 + h), fill=c,
                                                                 outline=(20, 20, 20), width=int(k + 2))
        for _ in range(6):
            d.line(tuple(int(v) for v in rng.integers(0, size, 4)), fill=(30, 30, 60), width=3)
        # Drawings are anti-aliased when rendered large and shown smaller.
        im = im.resize((size * 2, size * 2), Image.Resampling.NEAREST).resize((size, size), Image.Resampling.LANCZOS)
        out.append((f"flat{k}", im))
    return out


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def calibration_set(names: tuple[str, ...] = PHOTOS, n_illustrations: int = 5) -> list[tuple[str, str, bytes]]:
    """(class, name, file bytes): the images the defaults are calibrated (and tested) on."""
    rng = np.random.default_rng(0)
    photos = [(n, im) for n, im in real_photos() if n in names]
    out: list[tuple[str, str, bytes]] = []
    for name, im in photos:
        w, h = im.size
        a = np.asarray(im, np.float32)
        out.append(("clean", name, jpeg(im, 92)))
        out.append(("bokeh", name, jpeg(bokeh(im), 92)))
        for s in (2.0, 3.0):
            out.append(("blur", f"{name}_s{s:g}", jpeg(im.filter(ImageFilter.GaussianBlur(s)), 92)))
        for s in (15, 30):
            noisy = (a + rng.normal(0, s, a.shape)).clip(0, 255).astype(np.uint8)
            out.append(("noise", f"{name}_s{s}", jpeg(Image.fromarray(noisy), 92)))
        for f in (3, 4):
            small = im.resize((w // f, h // f), Image.Resampling.BILINEAR)
            out.append(("upscale", f"{name}_x{f}", jpeg(small.resize((w, h), Image.Resampling.BICUBIC), 92)))
        for q in (10, 20):
            out.append(("low_jpeg", f"{name}_q{q}", jpeg(im, q)))
        q10 = _decode(jpeg(im, 10))
        out.append(("resaved", f"{name}_q10_q95", jpeg(q10, 95)))
        out.append(("resaved", f"{name}_q10_png", png(q10)))
    for name, im in illustrations()[:n_illustrations]:
        out.append(("illustration", f"{name}_png", png(im)))
        out.append(("illustration", f"{name}_q92", jpeg(im, 92)))
    return out


def scores(data: bytes, grey: bool = True, working_size: int = 512) -> dict[str, float | None]:
    """The scores as a stage-4 worker computes them: one decode (``grey``: luma only, as a stage
    without CLIP decodes; else RGB, as with CLIP), BRISQUE on its working image, blockiness on its
    full-scale luma crop."""
    d = decode(data, working_size, 1 << 40, quality.BLOCKINESS_CROP, grey)
    return {"brisque": quality.brisque_score(d.image), "jpeg_quality": quality.jpeg_quality(data),
            "blockiness": quality.blockiness(d.grid)}


def rejected(s: dict[str, float | None]) -> list[str]:
    """The stage-4 quality rules with the defaults (a null score passes its rule)."""
    out = []
    if s["brisque"] is not None and s["brisque"] > quality.DEFAULT_MAX_BRISQUE:
        out.append("brisque")
    if s["jpeg_quality"] is not None and s["jpeg_quality"] < quality.DEFAULT_MIN_JPEG_QUALITY:
        out.append("jpeg_quality")
    if s["blockiness"] > quality.DEFAULT_MAX_BLOCKINESS:
        out.append("blockiness")
    return out


def main() -> int:
    data = calibration_set()
    rows = [(c, n, scores(d)) for c, n, d in data]
    rgb = [scores(d, grey=False) for _, _, d in data]
    diff = {k: max(abs(s[k] - r[k]) for (_, _, s), r in zip(rows, rgb, strict=True) if s[k] is not None)
            for k in ("brisque", "blockiness")}
    changed = [n for (_, n, s), r in zip(rows, rgb, strict=True) if bool(rejected(s)) != bool(rejected(r))]
    print(f"grey decode (a stage without CLIP) vs RGB decode: max |difference| brisque {diff['brisque']:.2f}, "
          f"blockiness {diff['blockiness']:.4f}; decisions that differ: {changed or 'none'}. "
          "Figures below: grey decode.")
    classes = list(dict.fromkeys(c for c, _, _ in rows))
    print(f"{len(rows)} images. Score distribution per class: min / median / max")
    for key in ("brisque", "jpeg_quality", "blockiness"):
        print(f"\n{key}")
        for c in classes:
            v = np.array([s[key] for cc, _, s in rows if cc == c and s[key] is not None], np.float64)
            txt = f"{v.min():7.2f} {np.median(v):7.2f} {v.max():7.2f}" if len(v) else "   (all null)"
            print(f"  {c:<13} n={len(v):<3} {txt}")
    print(f"\ndefaults: max brisque {quality.DEFAULT_MAX_BRISQUE}, min jpeg_quality "
          f"{quality.DEFAULT_MIN_JPEG_QUALITY}, max blockiness {quality.DEFAULT_MAX_BLOCKINESS}")
    print("per class: rejected / n (by which rule)")
    for c in classes:
        rej = [(n, rejected(s)) for cc, n, s in rows if cc == c]
        hit = [(n, r) for n, r in rej if r]
        by = {k: sum(k in r for _, r in hit) for k in ("brisque", "jpeg_quality", "blockiness")}
        print(f"  {c:<13} {len(hit):>2} / {len(rej):<2}  {by}" + (
            f"  kept: {[n for n, r in rej if not r]}" if c not in CLEAN and len(hit) < len(rej) else "") + (
            f"  rejected: {[n for n, _ in hit]}" if c in CLEAN and hit else ""))
    # Precision / recall of each rule for the degradations it targets, and of the whole chain.
    targets = {"brisque": ("blur", "noise", "upscale"), "jpeg_quality": ("low_jpeg",),
               "blockiness": ("low_jpeg", "resaved")}
    print("\nrule          targets                      precision  recall")
    for rule, tgt in [*targets.items(), ("chain", tuple(c for c in classes if c not in CLEAN))]:
        sel = [(c, rejected(s)) for c, _, s in rows if c in tgt or c in CLEAN]
        fired = [(c, bool(r if rule == "chain" else rule in r)) for c, r in sel]
        tp = sum(f and c in tgt for c, f in fired)
        fp = sum(f and c in CLEAN for c, f in fired)
        pos = sum(c in tgt for c, _ in fired)
        print(f"  {rule:<12} {','.join(tgt):<28} {tp / max(tp + fp, 1):9.3f} {tp / max(pos, 1):7.3f}")
    clean_rej = sum(bool(rejected(s)) for c, _, s in rows if c in CLEAN)
    print(f"clean images rejected by the defaults: {clean_rej} / {sum(c in CLEAN for c, _, _ in rows)}")
    time_brisque()
    return 0


def time_brisque(n: int = 3) -> None:
    """Seconds per 1024 px image (short side): ours vs the ``brisque`` package's own ``score``
    (needs libsvm: pip libsvm-official; without it the package's feature code alone is timed)."""
    import importlib
    import time
    import types

    try:
        import libsvm.svmutil  # noqa: F401
        full = True
    except ImportError:
        stub = types.ModuleType("libsvm")
        stub.svmutil = types.ModuleType("libsvm.svmutil")
        sys.modules.update({"libsvm": stub, "libsvm.svmutil": stub.svmutil})
        full = False
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    cls = importlib.import_module("brisque.brisque").BRISQUE
    ref = cls(url=False) if full else cls.__new__(cls)
    imgs = []
    for name, im in real_photos():
        if name in PHOTOS[:n]:
            s = 1024 / min(im.size)
            imgs.append(im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS))
    quality.brisque_score(imgs[0])  # model parsed once per process
    t, c = time.perf_counter(), time.process_time()
    for im in imgs:
        quality.brisque_score(im)
    ours, ours_cpu = (time.perf_counter() - t) / len(imgs), (time.process_time() - c) / len(imgs)
    t, c = time.perf_counter(), time.process_time()
    for im in imgs:
        a = np.asarray(im)
        if full:
            ref.score(a)
        else:
            grey = np.asarray(im.convert("L"), np.float64) / 255
            ref.calculate_brisque_features(grey)
    theirs, theirs_cpu = (time.perf_counter() - t) / len(imgs), (time.process_time() - c) / len(imgs)
    what = "score()" if full else "feature code only (no libsvm)"
    print(f"brisque per 1024 px image, wall (CPU) seconds: ours {ours:.3f} ({ours_cpu:.3f}) at the "
          f"{quality.BRISQUE_ANALYSIS_SIZE} px analysis size; the package's {what} at full size "
          f"{theirs:.3f} ({theirs_cpu:.3f}); speed-up {theirs / ours:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
