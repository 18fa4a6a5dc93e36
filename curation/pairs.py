"""Stage-2 edit-pair scorers (Qwen-Image-2.0 §2.3, TI2I data): pure functions, scores only.

The stage engine wires these in as filters (a score column + a threshold rule); nothing here
decides keep/reject. Image arguments are decoded upright RGB ``PIL.Image`` (curation.decode).

* **No-op edits** (the target is the source, re-encoded, resized or unchanged):
  :func:`phash_distance` (64-bit pHash Hamming distance, 0 = same low-frequency structure) and
  :func:`ssim` (grey structural similarity at a fixed working size, 1 = identical).
* **Unrelated pairs** (the target shares nothing with the source): :func:`ssim` too low and
  :func:`clip_cosine` of the two images' CLIP embeddings too low.
* **Edit direction** (when captions exist): :func:`directional_similarity`, InstructPix2Pix's
  cos(E_img(target) − E_img(source), E_txt(target caption) − E_txt(source caption)).
* **Instruction**: :func:`instruction_language` (en / zh / mixed / other, by script + an English
  function-word check) and :func:`instruction_issue` (empty, too long in the condition encoder's
  tokens, neither English nor Chinese).
* **Duplicate pairs**: :func:`pair_key` (same source image content + same normalised instruction).

Default thresholds (``DEFAULTS``) were calibrated on pairs made from the bundled real photos; the
figures are in ``curation/PAIRS.md`` (``python -m curation.pairs`` reproduces them).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np
from PIL import Image

from .scorers import phash64

SSIM_SIZE = 256  # both images are compared at this size (targets are often re-sized sources)

# Calibrated on the real-photo pairs of PAIRS.md (model-free scores) and InstructPix2Pix's
# published CLIP filters (Brooks et al. 2023, §3.1.2: image-image >= 0.75, directional >= 0.2).
DEFAULTS = {
    "noop_max_phash": 6,          # no-op: pHash distance <= 6 AND ssim >= 0.93 AND changed <= 0.015
    "noop_min_ssim": 0.93,
    "noop_max_changed": 0.015,
    "unrelated_max_ssim": 0.42,   # unrelated: ssim < 0.42 AND pHash distance >= 18
    "unrelated_min_phash": 18,    # AND (no CLIP, or clip_cosine < 0.75)
    "unrelated_min_clip": 0.75,
    "min_directional": 0.20,
}


def _common_size(a: Image.Image, b: Image.Image, size: int) -> int:
    """Compare at ``size``, or at the smaller image's short side if that is less: upsampling a
    resized target would add blur the edit did not make."""
    return max(32, min(size, *a.size, *b.size))


def _rgb(im: Image.Image, size: int) -> np.ndarray:
    """``size`` x ``size`` uint8 RGB: the one resample every structure score reads."""
    return np.asarray((im if im.mode == "RGB" else im.convert("RGB")).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def _grey(im: Image.Image, size: int) -> np.ndarray:
    import cv2

    return cv2.cvtColor(_rgb(im, size), cv2.COLOR_RGB2GRAY)  # ITU-R 601 luma, as Pillow's "L"


def _phash_distance(ga: np.ndarray, gb: np.ndarray) -> int:
    return int(bin(phash64(Image.fromarray(ga)) ^ phash64(Image.fromarray(gb))).count("1"))


def _ssim(ga: np.ndarray, gb: np.ndarray) -> float:
    import cv2

    a, b = ga.astype(np.float32), gb.astype(np.float32)
    # float32: the box means of x^2 (<= 65025) lose ~1e-7 relative, far below SSIM's constants
    box = lambda x: cv2.blur(x, (7, 7), borderType=cv2.BORDER_REFLECT_101)[3:-3, 3:-3]  # noqa: E731
    ua, ub = box(a), box(b)
    cov = 49.0 / 48.0  # sample covariance over the 7x7 window, as scikit-image's default
    va, vb, vab = cov * (box(a * a) - ua * ua), cov * (box(b * b) - ub * ub), cov * (box(a * b) - ua * ub)
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return float(s.mean(dtype=np.float64))


def _changed(ra: np.ndarray, rb: np.ndarray, block: int, tol: float) -> float:
    import cv2

    k = ra.shape[0] // block
    d = cv2.absdiff(ra, rb)[: k * block, : k * block].astype(np.float32)
    cells = cv2.resize(d, (k, k), interpolation=cv2.INTER_AREA).max(-1)  # exact block means
    return float((cells > tol).mean())


def structure_scores(source: Image.Image, target: Image.Image, size: int = SSIM_SIZE, block: int = 16,
                     tol: float = 16.0) -> tuple[int, float, float]:
    """(:func:`phash_distance`, :func:`ssim`, :func:`changed_fraction`) from one resample of each
    image: what the stage-2 worker computes per pair (the three apart cost about twice as much)."""
    import cv2

    size = _common_size(source, target, size)
    ra, rb = _rgb(source, size), _rgb(target, size)
    ga, gb = cv2.cvtColor(ra, cv2.COLOR_RGB2GRAY), cv2.cvtColor(rb, cv2.COLOR_RGB2GRAY)
    return _phash_distance(ga, gb), _ssim(ga, gb), _changed(ra, rb, block, tol)


def phash_distance(source: Image.Image, target: Image.Image, size: int = SSIM_SIZE) -> int:
    """Hamming distance (0..64) between the images' 64-bit pHashes (of the grey images at the
    comparison size): 0-4 for re-encodes/resizes of the same picture, ~32 for unrelated pictures."""
    size = _common_size(source, target, size)
    return _phash_distance(_grey(source, size), _grey(target, size))


def ssim(source: Image.Image, target: Image.Image, size: int = SSIM_SIZE) -> float:
    """Mean structural similarity (Wang et al. 2004; scikit-image's 7x7 window) of the grey images,
    both resized to ``size`` x ``size`` (or the smaller short side): 1 identical, ~0 unrelated.
    Computed with OpenCV box filters in float32: ``skimage.metrics.structural_similarity(a, b,
    data_range=255)`` of the same grey arrays (7x7 uniform window, sample covariance, border of
    3 px cropped) to ~1e-6 (tested), at a fraction of its cost."""
    size = _common_size(source, target, size)
    return _ssim(_grey(source, size), _grey(target, size))


def changed_fraction(source: Image.Image, target: Image.Image, size: int = SSIM_SIZE, block: int = 16,
                     tol: float = 16.0) -> float:
    """Share of ``block`` x ``block`` cells (both images at ``size`` x ``size``, RGB) whose mean
    absolute difference exceeds ``tol`` levels in any channel: 0 for re-encodes and resizes, the
    edited area's share for a local edit, most cells for a global one. It sees colour-only edits
    (greyscale, hue turns) that pHash and grey SSIM are blind to."""
    size = _common_size(source, target, size)
    return _changed(_rgb(source, size), _rgb(target, size), block, tol)


def clip_cosine(source_emb: np.ndarray, target_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of image embeddings (n, D) x (n, D) -> (n,); any D, need not be
    normalised (stored ``clip_embedding`` columns are)."""
    a, b = _unit(source_emb), _unit(target_emb)
    return (a * b).sum(-1)


def directional_similarity(src_img: np.ndarray, tgt_img: np.ndarray, src_txt: np.ndarray,
                           tgt_txt: np.ndarray) -> np.ndarray:
    """InstructPix2Pix directional CLIP similarity per row: does the image change point the way
    the caption change does? cos(tgt_img − src_img, tgt_txt − src_txt); NaN where either change is
    zero (identical images or captions: no direction to compare)."""
    di = _unit(np.asarray(tgt_img, np.float64) - np.asarray(src_img, np.float64))
    dt = _unit(np.asarray(tgt_txt, np.float64) - np.asarray(src_txt, np.float64))
    return (di * dt).sum(-1)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, x / np.where(n > 0, n, 1), np.nan)


# --------------------------------------------------------------------------- instructions
# Words nearly every English edit instruction of four or more words contains (verbs of editing and
# function words); Latin-script text with none of them is taken as another language (e.g. French).
_EN_WORDS = frozenset("""a an the to of in on at into onto with from by for and or but make add remove delete
change replace turn put give let set place move convert transform it its this that these those his her their
them him is are be was were as so more less all some no not background image photo picture color colour style
like look into""".split())


def instruction_language(text: str | None) -> str | None:
    """``en``, ``zh``, ``mixed`` (both), ``other`` (any other script or a Latin-script non-English
    text) or None (no letters at all). Japanese kana and Korean hangul make a text ``other`` even
    with Chinese characters in it."""
    if not text:
        return None
    han = latin = other = 0
    for ch in unicodedata.normalize("NFKC", text):
        if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf":
            han += 1
        elif ch.isascii() and ch.isalpha():
            latin += 1
        elif "\u3040" <= ch <= "\u30ff" or "\uac00" <= ch <= "\ud7af" or "\u1100" <= ch <= "\u11ff":
            return "other"  # kana / hangul
        elif ch.isalpha():
            other += 1
    letters = han + latin + other
    if letters == 0:
        return None
    if other > 0.2 * letters:
        return "other"
    is_zh = han >= 2 or (han and han >= 0.3 * letters)
    words = re.findall(r"[A-Za-z']+", text.lower())
    is_en = latin >= 2 and (len(words) < 4 or any(w in _EN_WORDS for w in words))
    if latin > 0.5 * letters and not is_en:
        return "other"
    return "mixed" if is_zh and is_en else "zh" if is_zh else "en" if is_en else "other"


def instruction_issue(text: str | None, token_count: int | None, max_tokens: int) -> str | None:
    """Why an instruction is unusable, or None: ``empty`` (no letters), ``too_long`` (more than
    ``max_tokens`` of the condition encoder's tokens; ``token_count`` None = not counted), or
    ``language`` (neither English nor Chinese)."""
    lang = instruction_language(text)
    if lang is None:
        return "empty"
    if token_count is not None and token_count > max_tokens:
        return "too_long"
    if lang == "other":
        return "language"
    return None


def normalize_instruction(text: str | None) -> str:
    """NFKC, case-folded, whitespace collapsed, trailing punctuation dropped: the duplicate key's text."""
    t = " ".join(unicodedata.normalize("NFKC", text or "").casefold().split())
    return t.rstrip(".!。！ ")


def pair_key(source_content_hash: str, instruction_en: str | None, instruction_zh: str | None = None) -> str:
    """Duplicate-pair key: the same source image (its content hash, so re-uploads match) with the
    same instruction (normalised; en and zh both count) is one pair, whatever the target."""
    text = normalize_instruction(instruction_en) + "\x00" + normalize_instruction(instruction_zh)
    return hashlib.sha1(f"{source_content_hash}\x00{text}".encode()).hexdigest()[:20]


def is_noop(phash_dist: float, ssim_value: float, changed: float, th: dict = DEFAULTS) -> bool:
    """The calibrated no-op rule (the stage config holds the thresholds the engine applies)."""
    return (phash_dist <= th["noop_max_phash"] and ssim_value >= th["noop_min_ssim"]
            and changed <= th["noop_max_changed"])


def is_unrelated(phash_dist: float, ssim_value: float, clip_cos: float | None = None, th: dict = DEFAULTS) -> bool:
    """The calibrated unrelated-pair rule; CLIP, where it ran, must agree."""
    return (ssim_value < th["unrelated_max_ssim"] and phash_dist >= th["unrelated_min_phash"]
            and (clip_cos is None or clip_cos < th["unrelated_min_clip"]))


# --------------------------------------------------------------------------- calibration pairs
def calibration_pairs(photos: list[tuple[str, Image.Image]], seed: int = 0):
    """(kind, edit name, source, target) from real photos: ``noop`` (copy, re-encode, resize,
    tiny brightness), ``local`` (object pasted, region recoloured / blurred / erased, text added),
    ``global`` (grey, sepia, posterise, hue turn, painterly, night) and ``unrelated`` (another photo)."""
    import io

    from PIL import ImageDraw, ImageEnhance, ImageFilter, ImageOps

    rng = np.random.default_rng(seed)

    def jpeg(im, q):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    def box(im, frac):
        w, h = im.size
        bw, bh = int(w * np.sqrt(frac)), int(h * np.sqrt(frac))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        return x, y, x + bw, y + bh

    def paste(im):
        out = im.copy()
        ImageDraw.Draw(out).ellipse(box(im, rng.uniform(0.05, 0.15)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        return out

    def region(im, fn):
        out = im.copy()
        b = box(im, rng.uniform(0.08, 0.2))
        out.paste(fn(im.crop(b)), b[:2])
        return out

    def hue(im, turn):
        h, s, v = im.convert("HSV").split()
        return Image.merge("HSV", (h.point(lambda p: (p + turn) % 256), s, v)).convert("RGB")

    def text(im):
        from .synthetic_text import _default_fonts, _font

        out = im.copy()
        size = max(16, im.height // 12)
        ImageDraw.Draw(out).text((im.width // 10, im.height // 10), "SALE 50%", font=_font(
            _default_fonts()["noto-sans-sc"].bold, size), fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        return out

    noop = {"copy": lambda im: im.copy(), "jpeg_q50": lambda im: jpeg(im, 50),
            "resize_half": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC),
            "resize_jpeg_q75": lambda im: jpeg(im.resize((im.width * 3 // 4, im.height * 3 // 4)), 75),
            "brightness_1.04": lambda im: ImageEnhance.Brightness(im).enhance(1.04)}
    local = {"paste_object": paste, "recolour_region": lambda im: region(im, lambda c: hue(c, 90)),
             "blur_region": lambda im: region(im, lambda c: c.filter(ImageFilter.GaussianBlur(8))),
             "erase_region": lambda im: region(im, lambda c: c.filter(ImageFilter.BoxBlur(40))),
             "add_text": text}
    style = {"greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
             "sepia": lambda im: ImageOps.colorize(ImageOps.grayscale(im), (40, 26, 13), (255, 240, 192)),
             "posterise": lambda im: ImageOps.posterize(im, 2), "hue_turn": lambda im: hue(im, 100),
             "painterly": lambda im: ImageOps.posterize(im.filter(ImageFilter.ModeFilter(9)), 3),
             "night": lambda im: ImageEnhance.Brightness(hue(im, 150)).enhance(0.45)}
    for _, im in photos:
        for kind, edits in (("noop", noop), ("local", local), ("global", style)):
            for edit, fn in edits.items():
                yield kind, edit, im, fn(im)
    for i, (_, im) in enumerate(photos):
        other = photos[(i + 1 + int(rng.integers(len(photos) - 1))) % len(photos)]
        yield "unrelated", other[0], im, other[1]


def calibrate(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """{kind: {score: values}} over :func:`calibration_pairs` of the bundled colour photos (on the
    grey ones, colour edits are identities and would be mislabelled), long side at most 768 px."""
    from .samples import real_photos

    photos = [(n, im if max(im.size) <= 768 else im.resize((im.width * 768 // max(im.size),
                                                            im.height * 768 // max(im.size))))
              for n, im in real_photos() if np.asarray(im).std(axis=2).mean() > 2]
    out: dict[str, dict[str, list]] = {}
    for kind, edit, src, tgt in calibration_pairs(photos, seed):
        d = out.setdefault(kind, {"phash": [], "ssim": [], "changed": [], "edit": []})
        d["edit"].append(edit)
        for k, v in zip(("phash", "ssim", "changed"), structure_scores(src, tgt), strict=True):
            d[k].append(v)
    return {k: {s: np.array(v, object if s == "edit" else float) for s, v in d.items()} for k, d in out.items()}


def calibration_table(res: dict[str, dict[str, np.ndarray]]) -> str:
    """Markdown: per pair kind, the score ranges and how many the default rules flag."""
    lines = ["| pairs | n | pHash distance min / median / max | SSIM min / median / max | "
             "changed fraction min / median / max | flagged no-op | flagged unrelated |", "|---|---|---|---|---|---|---|"]
    for kind, d in res.items():
        noop = [is_noop(p, s, c) for p, s, c in zip(d["phash"], d["ssim"], d["changed"], strict=True)]
        unrel = [is_unrelated(p, s) for p, s in zip(d["phash"], d["ssim"], strict=True)]

        def which(flags, kind=kind, d=d):
            names = sorted({e for e, f in zip(d["edit"], flags, strict=True) if f})
            return f"{sum(flags)}" + (f" ({', '.join(names)})" if names and kind in ("local", "global") else "")

        lines.append(f"| {kind} | {len(d['ssim'])} | " + " | ".join(
            f"{v.min():.3g} / {np.median(v):.3g} / {v.max():.3g}" for v in (d["phash"], d["ssim"], d["changed"]))
            + f" | {which(noop)} | {which(unrel)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(calibration_table(calibrate()))
