"""Stage-4 image-quality scores: BRISQUE, JPEG quality factor, blockiness. Scores only; the stage
config's rules decide (defaults below, calibrated by ``benchmarks/calibrate_stage4.py``, figures
in ``curation/QUALITY.md``).

* :func:`brisque_score` — no-reference quality (Mittal et al. 2012): 36 natural-scene statistics of
  the MSCN coefficients at 2 scales, scored by the SVR that the ``brisque`` wheel ships. Computed
  at a fixed analysis size so a 512 px and a 2048 px copy of a photo score alike.
* :func:`jpeg_quality` — the IJG quality factor that best reproduces the file's quantisation
  tables (header only, no decode); None for non-JPEG.
* :func:`blockiness` — the 8x8 block-grid edge energy on decoded pixels: catches what the tables
  cannot (a q10 JPEG re-saved at q95, a PNG that once was a bad JPEG).
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from numba import njit
from PIL import Image

from .decode import luma_pixels

# Defaults of the stage-4 rules (calibration: benchmarks/calibrate_stage4.py, curation/QUALITY.md).
DEFAULT_MAX_BRISQUE = 57.0
"""Reject when the BRISQUE score (0 best .. ~100 worst, at the analysis size) is above this."""
DEFAULT_MIN_JPEG_QUALITY = 40.0
"""Reject JPEGs whose estimated IJG quality factor is below this (null for non-JPEG passes)."""
DEFAULT_MAX_BLOCKINESS = 0.35
"""Reject when the 8x8 block-boundary edge excess (0 = none) is above this."""

BRISQUE_ANALYSIS_SIZE = 512
"""Short side, in pixels, every larger image is downscaled to before BRISQUE features are computed."""

# --------------------------------------------------------------------------- JPEG quality factor
# IJG (libjpeg) standard tables, ITU-T T.81 Annex K, natural (row-major) order — the order in which
# Pillow's ``JpegImageFile.quantization`` reports a file's tables.
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.int64)
_IJG_CHROMA = np.array([
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32, np.int64)


@lru_cache(maxsize=1)
def _ijg_tables() -> np.ndarray:
    """(100, 2, 64): libjpeg's ``jpeg_set_quality`` tables for q = 1..100 (baseline-clamped)."""
    q = np.arange(1, 101)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)[:, None, None]
    base = np.stack([_IJG_LUMA, _IJG_CHROMA])[None]
    return np.clip((base * scale + 50) // 100, 1, 255)


def jpeg_quality(data: bytes) -> float | None:
    """Estimated IJG quality factor (1..100) of a JPEG from its quantisation tables, or None when
    ``data`` is not a JPEG (or has no tables). Reads the header only: Pillow parses the DQT
    markers in ``Image.open`` and decodes nothing until ``load()``.

    The estimate is the q whose IJG tables are closest (mean |log ratio|) to the file's: exact for
    files written by libjpeg/Pillow/OpenCV; for an encoder with its own tables (cameras,
    Photoshop) it is the IJG q of equivalent coarseness.
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not an image at all: no JPEG quality either
        return None
    tables = getattr(im, "quantization", None) if im.format in ("JPEG", "MPO") else None
    if not tables:
        return None
    ref = _ijg_tables()
    keys = sorted(tables)[:2]  # 0 = luminance, 1 = chrominance (when present)
    got = np.log(np.array([list(tables[k]) for k in keys], np.float64).clip(1))
    err = np.abs(np.log(ref[:, : len(keys)].astype(np.float64)) - got[None]).mean(axis=(1, 2))
    # Several q can give the same tables near q=100 (everything clamps to 1): take the highest.
    best = np.flatnonzero(err <= err.min() + 1e-12)
    return float(best.max() + 1)


# --------------------------------------------------------------------------- blockiness
BLOCKINESS_CROP = 1024
"""Side of the centre crop blockiness reads (the grid statistic converges long before this)."""
_BLOCKINESS_FLOOR = 1.0  # grey levels added to both means: flat areas must not make a ratio blow up


def _grid_excess(sums: np.ndarray, count: int, block: int) -> float:
    """``sums``: per column (or row) sums of |neighbour differences| over ``count`` lines. Mean per
    phase (position mod block); the strongest phase over the mean of the others, minus 1 — the
    strongest phase so that an image cropped off the 8-pixel grid still scores."""
    n = sums.size // block * block
    if n < 2 * block:
        return 0.0
    per_phase = sums[:n].reshape(-1, block).sum(0) / (count * (n // block))
    k = int(per_phase.argmax())
    others = np.delete(per_phase, k).mean()
    return float((per_phase[k] + _BLOCKINESS_FLOOR) / (others + _BLOCKINESS_FLOOR) - 1.0)


def blockiness(img: Image.Image | np.ndarray, block: int = 8) -> float:
    """Blocking-artefact score of decoded pixels: how much stronger luma edges are on one phase of
    a ``block``-pixel grid than elsewhere, mean of the horizontal and vertical excess. ~0 for
    natural or smooth images, 0.1-0.2 for a q75 JPEG, ~0.3-0.4 for q50, > 1 for q10 — and it stays there when the
    file is re-saved at q95 or as PNG (the tables then say "high quality").

    ``img``: an image, or its 8-bit luma as an array (``decode(..., grid_crop=...).grid``). Give it
    pixels on the file's own grid at full resolution (the defaults are calibrated there):
    resampling destroys the grid, and a JPEG decoded at DCT scale 1/2 (``block=4``) keeps it but
    separates worse (clean <= 0.07 but q10 re-saved only >= 0.12, smooth illustrations and
    upscales up to 0.16). Reads a <= ``BLOCKINESS_CROP`` px centre crop.
    """
    g = img if isinstance(img, np.ndarray) else luma_pixels(img)
    h, w = g.shape
    # Centre crop aligned to the block grid (a crop at a multiple of `block` keeps the phases).
    ch, cw = min(h, BLOCKINESS_CROP), min(w, BLOCKINESS_CROP)
    y0, x0 = (h - ch) // 2 // block * block, (w - cw) // 2 // block * block
    g = np.ascontiguousarray(g[y0:y0 + ch, x0:x0 + cw], np.uint8)
    if ch < 2 or cw < 2:
        return 0.0
    # |differences| in 8 bits, summed per column (horizontal) and per row (vertical) in int32.
    dx = cv2.reduce(cv2.absdiff(g[:, 1:], g[:, :-1]), 0, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    dy = cv2.reduce(cv2.absdiff(g[1:], g[:-1]), 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S).ravel()
    return max(0.0, 0.5 * (_grid_excess(dx.astype(np.float64), ch, block)
                           + _grid_excess(dy.astype(np.float64), cw, block)))


# --------------------------------------------------------------------------- BRISQUE
# Constants of the ``brisque`` package (0.2.0) whose SVR we use: features must be computed exactly
# as its training code did (grey in [0, 1], 7x7 Gaussian with sigma 7/6 and zero padding,
# C = 1/255, cubic half-scale), or its scaling and support vectors mean nothing. Grey is Rec. 601
# luma, as in its trainer (brisque/trainer.py) and the original BRISQUE (MATLAB rgb2gray) — and
# JPEG's own Y, so a luma-only decode (curation.decode, grey=True) scores the same pixels. (Its
# score() uses skimage's Rec. 709 weights: up to ~7 higher on saturated flat-colour drawings.)
_C = 1.0 / 255.0


def _gauss_kernel_1d(n: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    x = np.arange(n, dtype=np.float64) - n // 2
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    return (k / k.sum())[:, None]


# The package's normalised 7x7 kernel exp(-(x^2+y^2)/2s^2)/sum is the outer product of this 1-D
# kernel with itself: two 7-tap passes instead of one 49-tap pass.
_KERNEL_1D = _gauss_kernel_1d()


# MSCN coefficients and the AGGD moments of the five distributions BRISQUE fits (the coefficients
# and their products with the right, lower, lower-right and lower-left neighbour) in two compiled
# passes over the image, where numpy needed ~25 (each temporary of a 512 px image is a pass over
# 1 MB: they were most of the cost). numba caches the machine code next to this file.
@njit(cache=True, nogil=True, error_model="numpy")  # numpy's: a float division that cannot raise vectorises
def _mscn_mask(g, mu, e2, activity, c):
    """MSCN coefficients (float32, exactly numpy's float32 arithmetic) and the pixels the fits use
    (activity <= 0: all; else local std > activity, 3-pixel frame out), zero elsewhere."""
    h, w = g.shape
    m, k = np.empty((h, w), np.float32), np.empty((h, w), np.uint8)
    floor = activity if activity > 0 else np.float32(-1.0)
    for y in range(h):
        for x in range(w):  # branch-free: the loop vectorises
            sd = np.sqrt(np.abs(e2[y, x] - mu[y, x] * mu[y, x]))
            ok = sd > floor
            k[y, x] = ok
            m[y, x] = (g[y, x] - mu[y, x]) / (sd + c) * np.float32(ok)
    if activity > 0:  # the frame: zero padding fakes contrast there
        k[:3], k[-3:], k[:, :3], k[:, -3:] = 0, 0, 0, 0
        m[:3], m[-3:], m[:, :3], m[:, -3:] = 0, 0, 0, 0
    return m, k


@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})  # reassoc: vectorised sums
def _pair_moments(st, a, b, ka, kb):
    """Adds to ``st`` the moments of a * b over the pairs where ka and kb are set: count, negative
    count, sum of squares of the negatives, sum of squares, sum of |.| (float64 sums)."""
    n, neg, sq_neg, sq, ab = 0, 0, 0.0, 0.0, 0.0
    for i in range(a.size):
        v = np.float64(a[i] * b[i])  # the float32 product, as numpy's
        q = min(v, 0.0)
        n += ka[i] & kb[i]
        neg += v < 0
        sq_neg += q * q
        sq += v * v
        ab += abs(v)
    st[0] += n
    st[1] += neg
    st[2] += sq_neg
    st[3] += sq
    st[4] += ab


@njit(cache=True, nogil=True)
def _moments(m, k):
    """(5, 5) moments (see _pair_moments) of m (masked-out pixels are 0 in m and k), then of its
    products with the right, lower, lower-right and lower-left neighbour."""
    h, w = m.shape
    st = np.zeros((5, 5))
    one = np.ones(w, np.float32)
    for y in range(h):
        _pair_moments(st[0], m[y], one, k[y], k[y])
        _pair_moments(st[1], m[y, :-1], m[y, 1:], k[y, :-1], k[y, 1:])
        if y + 1 < h:
            _pair_moments(st[2], m[y], m[y + 1], k[y], k[y + 1])
            _pair_moments(st[3], m[y, :-1], m[y + 1, 1:], k[y, :-1], k[y + 1, 1:])
            _pair_moments(st[4], m[y, 1:], m[y + 1, :-1], k[y, 1:], k[y + 1, :-1])
    return st


# phi(alpha) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) is increasing in alpha: invert it by
# interpolation on a fine grid (the package solves it with scipy.optimize.root from 0.2).
_ALPHA = np.arange(0.05, 12.0, 0.0005)


@lru_cache(maxsize=1)
def _phi_table() -> np.ndarray:
    from scipy.special import gammaln

    return np.exp(2 * gammaln(2 / _ALPHA) - gammaln(1 / _ALPHA) - gammaln(3 / _ALPHA))


def _aggd(st: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric generalised Gaussian fits by moment matching, one per row of ``st`` (the moments
    of _moments): (alpha, mean, sigma_l, sigma_r) arrays."""
    from scipy.special import gammaln

    n, neg, sq_neg, sq, ab = st.T
    left = sq_neg / np.maximum(neg, 1)
    right = (sq - sq_neg) / np.maximum(n - neg, 1)
    with np.errstate(divide="ignore"):
        gamma = np.where(right > 0, np.sqrt(left) / np.sqrt(right), np.inf)
    r_hat = (ab / n) ** 2 / (sq / n)
    big_r = r_hat * (gamma ** 3 + 1) * (gamma + 1) / (gamma ** 2 + 1) ** 2
    alpha = np.interp(big_r, _phi_table(), _ALPHA)
    const = np.exp(0.5 * (gammaln(1 / alpha) - gammaln(3 / alpha)))
    sl, sr = np.sqrt(left), np.sqrt(right)
    return alpha, (sr - sl) * const * np.exp(gammaln(2 / alpha) - gammaln(1 / alpha)), sl, sr


BRISQUE_MIN_ACTIVITY = 0.01
"""Local standard deviation (grey, 0..1) below which a pixel is flat and left out of the fits."""
_MIN_ACTIVE_FRACTION = 0.01  # fewer active pixels than this: no texture to judge, score is None


def _scale_features(grey: np.ndarray, activity: float) -> list[float] | None:
    # Zero border == scipy.signal.convolve2d(..., "same"), the package's convolution. float32 is
    # enough: features agree with the package's float64 ones to ~1e-5 (test_quality.py).
    g = np.ascontiguousarray(grey, np.float32)
    mu = cv2.sepFilter2D(g, cv2.CV_32F, _KERNEL_1D, _KERNEL_1D, borderType=cv2.BORDER_CONSTANT)
    e2 = cv2.sepFilter2D(cv2.multiply(g, g), cv2.CV_32F, _KERNEL_1D, _KERNEL_1D, borderType=cv2.BORDER_CONSTANT)
    # activity > 0: only where there is local structure. Flat areas (a bokeh background, the fills
    # of a drawing, a gradient) give MSCN ~ rounding noise / C, which the SVR reads as distortion.
    # The 3-pixel frame is out too: zero padding fakes contrast there. activity <= 0: every pixel,
    # exactly the package's features.
    m, k = _mscn_mask(g, mu, e2, np.float32(activity), np.float32(_C))
    st = _moments(m, k)
    if activity > 0 and st[0, 0] < _MIN_ACTIVE_FRACTION * k.size:
        return None
    alpha, mean, sl, sr = _aggd(st)
    feats = [alpha[0], (sl[0] ** 2 + sr[0] ** 2) / 2]
    for j in range(1, 5):
        feats += [alpha[j], mean[j], sl[j] ** 2, sr[j] ** 2]
    return [float(v) for v in feats]


def analysis_grey(img: Image.Image, size: int = BRISQUE_ANALYSIS_SIZE) -> np.ndarray:
    """The grey float32 image in [0, 1] (Rec. 601 luma) downscaled (INTER_AREA) so that its short
    side is ``size``: the fixed analysis size that makes scores of a 512 px and a 2048 px copy
    comparable. A smaller image is analysed as it is (upscaling would manufacture blur); stage 4's
    resolution filter runs first, so there every image reaches the analysis size."""
    # 8-bit Rec. 601 luma, as a grey decode (curation.decode, grey=True) gives it: JPEG's own Y, or
    # Pillow's "L" of other formats — so a stage scores the same whether it decoded RGB or grey.
    # Grey first, then resize: one channel to resample instead of three, straight from the 8-bit
    # pixels into float32 (no 8-bit rounding of the resized pixels).
    grey = luma_pixels(img)
    h, w = grey.shape
    s = size / min(h, w)
    if s < 1.0:
        return area_resize(grey, max(1, round(w * s)), max(1, round(h * s)), 1 / 255)
    return grey.astype(np.float32) * np.float32(1 / 255)


@njit(cache=True, nogil=True)
def _area_taps(src, dst):
    """OpenCV's INTER_AREA taps from ``src`` to ``dst`` < ``src`` samples (its computeResizeAreaTab:
    each output averages the inputs its cell covers, partial ones by their covered fraction, slivers
    under 1e-3 dropped): (taps, dst) source indices and float32 weights, zero-weight padded."""
    scale = 1.0 / (dst / src)  # as OpenCV: the inverse of its inv_scale
    idx = np.zeros((int(np.ceil(scale)) + 2, dst), np.int64)
    wt = np.zeros(idx.shape, np.float32)
    for d in range(dst):
        f1 = d * scale
        f2, cell = f1 + scale, min(scale, src - f1)
        s2 = min(int(np.floor(f2)), src - 1)
        s1 = min(int(np.ceil(f1)), s2)
        n = 0
        if s1 - f1 > 1e-3:
            idx[n, d], wt[n, d], n = s1 - 1, (s1 - f1) / cell, n + 1
        for k in range(s1, s2):
            idx[n, d], wt[n, d], n = k, 1.0 / cell, n + 1
        if f2 - s2 > 1e-3:
            idx[n, d], wt[n, d] = s2, min(min(f2 - s2, 1.0), cell) / cell
    return idx, wt


@njit(cache=True, nogil=True)
def _area_rows(a, height, gain):
    """INTER_AREA of ``a``'s columns to ``height`` rows, times ``gain``: whole rows weighted and
    summed (vectorised)."""
    iy, wy = _area_taps(a.shape[0], height)
    out = np.zeros((height, a.shape[1]), np.float32)
    for j in range(height):
        acc = out[j]
        for t in range(iy.shape[0]):
            c, row = wy[t, j] * gain, a[iy[t, j]]
            if c != 0:
                for x in range(row.size):
                    acc[x] += c * np.float32(row[x])
    return out


def area_resize(grey: np.ndarray, width: int, height: int, gain: float = 1.0) -> np.ndarray:
    """``cv2.resize(grey * gain, (width, height), interpolation=cv2.INTER_AREA)`` in float32 (to
    ~1e-7) of an 8-bit or float32 image, for a downscale: OpenCV's fractional-scale area path is
    scalar code (~2 ms for a 0.5 MP image); the same taps as two compiled row passes (columns,
    then rows of the transpose) take a fraction of that, with no weights to build or cache."""
    tmp = _area_rows(np.ascontiguousarray(grey), height, np.float32(gain))
    return cv2.transpose(_area_rows(cv2.transpose(tmp), width, np.float32(1.0)))


def brisque_features(grey: np.ndarray, activity: float = BRISQUE_MIN_ACTIVITY) -> np.ndarray | None:
    """The 36 BRISQUE features of a grey [0, 1] image: 18 at full and 18 at half scale, fitted on
    the pixels whose local std exceeds ``activity`` (0: all pixels, exactly the ``brisque``
    package's features). None when too few pixels have any structure."""
    grey = np.ascontiguousarray(grey, np.float32)
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    full = _scale_features(grey, activity)
    low = None if full is None else _scale_features(half, activity)
    return None if full is None or low is None else np.array(full + low)


class _Svr:
    """libsvm epsilon-SVR with an RBF kernel, parsed from its text model and evaluated in numpy:
    f(x) = sum_i coef_i exp(-gamma |x - sv_i|^2) - rho."""

    def __init__(self, text: str, n_features: int):
        head, body = text.split("\nSV\n", 1)
        meta = dict(line.split(" ", 1) for line in head.splitlines())
        if meta.get("svm_type") != "epsilon_svr" or meta.get("kernel_type") != "rbf":
            raise ValueError(f"unsupported libsvm model: {meta.get('svm_type')}/{meta.get('kernel_type')}")
        self.gamma, self.rho = float(meta["gamma"]), float(meta["rho"])
        rows = [line.split() for line in body.splitlines() if line.strip()]
        self.coef = np.array([float(r[0]) for r in rows])
        self.sv = np.zeros((len(rows), n_features))
        for i, r in enumerate(rows):  # sparse "index:value" pairs; absent = 0
            for item in r[1:]:
                k, v = item.split(":")
                self.sv[i, int(k) - 1] = float(v)
        self.sv_sq = (self.sv ** 2).sum(1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(x)
        d2 = (x ** 2).sum(1)[:, None] + self.sv_sq[None] - 2 * x @ self.sv.T
        return np.exp(-self.gamma * np.maximum(d2, 0)) @ self.coef - self.rho


@lru_cache(maxsize=1)
def _brisque_model() -> tuple[_Svr, np.ndarray, np.ndarray]:
    # The wheel's files only, found without importing the package (its __init__ imports libsvm).
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the brisque package (its shipped SVM model) is not installed: pip install --no-deps brisque==0.2.0")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    with (models / "normalize.pickle").open("rb") as f:
        params = pickle.load(f)
    lo, hi = np.asarray(params["min_"], np.float64), np.asarray(params["max_"], np.float64)
    return _Svr((models / "svm.txt").read_text(), len(lo)), lo, hi


def brisque_from_features(features: np.ndarray) -> np.ndarray:
    """SVR score(s) of (n, 36) raw features, scaled to [-1, 1] with the package's min/max."""
    svr, lo, hi = _brisque_model()
    return svr(-1.0 + 2.0 * (np.atleast_2d(features) - lo) / (hi - lo))


def brisque_score(img: Image.Image, size: int = BRISQUE_ANALYSIS_SIZE,
                  activity: float = BRISQUE_MIN_ACTIVITY) -> float | None:
    """BRISQUE score of ``img`` at the fixed analysis size (short side ``size``): ~0 pristine, higher
    worse (blur, noise, blocking); not bounded to 0..100 for images far from its training set.

    Fitted on the structured pixels only (``activity``), so that the flat areas of a sharp photo
    with a blurred background, or of a clean illustration, do not count as distortion. None
    (no score: the rule passes) when the image has next to no structure (a pure gradient)."""
    feats = brisque_features(analysis_grey(img, size), activity)
    return None if feats is None else float(brisque_from_features(feats)[0])
