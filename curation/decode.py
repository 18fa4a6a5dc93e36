"""Decode an image once, at the stage's working size, into RGB — or say exactly why not.

Every scorer of a stage runs on the image this returns. JPEGs are decoded at reduced scale with
Pillow's ``draft`` (libjpeg DCT scaling still reads the whole entropy-coded stream, so a truncated
file still fails), which is where most of stage 1's speed comes from: a 1024 px JPEG drafted to
256 px decodes several times faster than a full decode.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

# We enforce our own pixel limit before decoding (with a message naming the setting); Pillow's
# global guard would otherwise fire first with a different message, or only warn.
Image.MAX_IMAGE_PIXELS = None


def _keep_freed_heap() -> None:
    """Fixed glibc allocator thresholds for processes that decode batches of large images.

    By default glibc serves an allocation over its (dynamic, ~ the largest freed so far) mmap
    threshold with a fresh mapping and returns freed memory at the top of the heap to the OS past
    twice that: a stage worker that decodes a batch of 1-2 MP images, scores and frees them, then
    faults every page back in for the next batch (~750 page faults, ~1.5 ms of kernel time per
    1.5 MP image, ~15 % of stage 4's CPU). With fixed thresholds the freed pages stay in the heap
    (up to 256 MB) and are reused. No-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum; setting it also stops the dynamic rule
    mallopt(m_trim_threshold, 256 << 20)


_keep_freed_heap()  # every process that decodes (stage workers, the driver's previews) imports this


_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
# EXIF orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


@dataclass
class Decoded:
    image: Image.Image | None  # RGB (grey decode: "L") at working size, upright; None when broken
    width: int | None  # full-size width after orientation
    height: int | None
    format: str | None
    orientation: int | None
    error: str | None
    content_hash: str | None
    grid: np.ndarray | None = None  # full-scale luma centre crop (uint8), when decode() was asked for it


def _to_rgb(im: Image.Image) -> Image.Image:
    """Normalise every Pillow mode to 8-bit RGB; high-bit-depth data is scaled, never clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit containers hold 0..65535; 32-bit int / float data gets scaled by its own range.
        hi = 65535.0 if mode.startswith("I;16") or (a.min() >= 0 and a.max() <= 65535 and a.max() > 255) else None
        if hi is None:
            lo, top = float(a.min()), float(a.max())
            a = (a - lo) / (top - lo) * 255.0 if top > lo else np.zeros_like(a)
        else:
            a = a / hi * 255.0
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, as a viewer on a white page would show them.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX, I;16 handled above


def _crop_box(shape: tuple[int, int], side: int) -> tuple[slice, slice]:
    """Centre crop of at most ``side`` x ``side`` whose origin is a multiple of 8 (the JPEG grid)."""
    h, w = shape
    ch, cw = min(h, side), min(w, side)
    y0, x0 = (h - ch) // 2 // 8 * 8, (w - cw) // 2 // 8 * 8
    return slice(y0, y0 + ch), slice(x0, x0 + cw)


def _centre_crop(im: Image.Image, side: int) -> Image.Image:
    ys, xs = _crop_box(im.size[::-1], side)
    return im.crop((xs.start, ys.start, xs.stop, ys.stop))


def _reduce2(a: np.ndarray) -> np.ndarray:
    """``Image.reduce(2)`` of 8-bit luma, bit for bit (2x2 means rounded half up; an odd last row or
    column averages its pairs, an odd corner is kept), with OpenCV's vectorised 2x INTER_AREA: ~10x
    cheaper than Pillow's on a 1.5 MP image."""
    import cv2  # only the grey path needs it (stage 1's workers do not import it)

    h, w = a.shape
    h2, w2 = h // 2, w // 2
    out = np.empty((h - h2, w - w2), np.uint8)
    out[:h2, :w2] = cv2.resize(a[:2 * h2, :2 * w2], (w2, h2), interpolation=cv2.INTER_AREA)
    if w % 2:
        out[:h2, w2] = (a[0:2 * h2:2, -1].astype(np.uint16) + a[1:2 * h2:2, -1] + 1) >> 1
    if h % 2:
        out[h2, :w2] = (a[-1, 0:2 * w2:2].astype(np.uint16) + a[-1, 1:2 * w2:2] + 1) >> 1
        if w % 2:
            out[h2, w2] = a[-1, -1]
    return out


def _full_scale_luma(data: bytes, side: int) -> np.ndarray:
    """Luma of a JPEG at DCT scale 1, centre crop: a second decoder pass that outputs grey only
    (libjpeg skips the chroma IDCT, upsampling and colour conversion: about a draft decode's cost,
    both being dominated by the entropy decoding of the whole file)."""
    im = Image.open(io.BytesIO(data))
    im.draft("L", im.size)  # a no-op for CMYK files: converted below
    im.load()
    return luma_pixels(_centre_crop(im, side))


def luma_pixels(im: Image.Image) -> np.ndarray:
    """The (h, w) uint8 array of an "L" image (any other mode: its luma, see ``to_grey``), read-only.
    Without a copy where Pillow can export the pixels (Arrow C data interface: one memory block;
    the array keeps them alive): ``np.asarray`` goes through ``tobytes`` (~0.4 ms for 1.5 MP)."""
    im = to_grey(im)
    try:
        return pa.array(im).to_numpy(zero_copy_only=True).reshape(im.size[1], im.size[0])
    except ValueError:  # rows in several blocks (images over Pillow's block size)
        return np.asarray(im)


def to_grey(im: Image.Image) -> Image.Image:
    """8-bit luma (ITU-R 601, JPEG's own Y) of any Pillow mode, transparency over white as in _to_rgb."""
    return im if im.mode == "L" else _to_rgb(im).convert("L")


def decode(data: bytes, working_size: int, max_pixels: int, grid_crop: int = 0, grey: bool = False) -> Decoded:
    """Decode ``data`` to an upright RGB image whose short side is about ``working_size`` (never
    below it unless the source is smaller). Any failure becomes ``Decoded.error``; never raises.

    ``grey``: an "L" image instead, for stages whose scorers read luma only: libjpeg then skips the
    chroma IDCT, upsampling and colour conversion, and with ``grid_crop`` the JPEG is decoded once,
    at scale 1 (the grid and the working image both come from that pass) instead of twice.

    ``grid_crop`` > 0 also returns ``Decoded.grid``: a centre crop (at most ``grid_crop`` px a side)
    of the luma at full scale, on the file's own 8x8 grid, for blockiness. A JPEG decoded at a
    reduced DCT scale is decoded once more in grey at scale 1 for it; other images give the
    full-scale pixels the decode had anyway."""
    content_hash = hashlib.sha256(data).hexdigest()
    if not data:
        return Decoded(None, None, None, None, None, "empty file (0 bytes)", content_hash)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on odd EXIF; the result is what counts
            im = Image.open(io.BytesIO(data))
            fmt = im.format
            if fmt == "PNG":
                # Pillow's PNG decoder does not check chunk CRCs while decoding, so a smashed IDAT
                # can decode to garbage silently; verify() checks every CRC without decoding.
                im.verify()
                im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                return Decoded(None, None, None, fmt, None,
                               f"decompression bomb: {w}x{h} = {w * h} pixels > scoring.max_pixels "
                               f"({max_pixels})", content_hash)
            if fmt != "JPEG":
                # Decode the pixels first: for PNG (and others) getexif() itself loads the image, and
                # the EXIF fallback below would swallow a decoder error (a corrupt IDAT with valid
                # CRCs), leaving a half-decoded image that a later load() accepts. JPEG keeps its
                # EXIF in the header and must not load before draft() picks the DCT scale.
                im.load()
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # malformed EXIF block: treat as upright, the pixels may be fine
                orientation = 1
            if orientation not in range(1, 9):
                orientation = 1
            if getattr(im, "is_animated", False):
                im.seek(0)  # first frame stands for an animation
            if fmt == "JPEG":
                # draft keeps both sides >= the request, so the short side stays >= working_size.
                scale = 1.0 if grey and grid_crop > 0 else working_size / min(w, h)
                mode = im.mode if im.mode == "CMYK" else "L" if grey else "RGB"
                if scale < 1 or mode != im.mode:
                    im.draft(mode, (max(1, int(w * scale)), max(1, int(h * scale))) if scale < 1 else (w, h))
            im.load()
            drafted = im.size != (w, h)
            im = to_grey(im) if grey else _to_rgb(im)
            if orientation != 1:
                im = im.transpose(_EXIF_TRANSPOSE[orientation])
            grid = None
            # Non-JPEG formats (and grey JPEGs) decode at full size; integer reduce keeps short side
            # >= working_size.
            factor = min(im.size) // working_size
            if grey and (grid_crop > 0 or factor == 2):  # one array serves the grid and the working image
                a = luma_pixels(im)
                if grid_crop > 0 and not drafted:
                    # A copy: a view would keep the whole full-scale image alive for the batch.
                    grid = np.ascontiguousarray(a[_crop_box(a.shape, grid_crop)])
                if factor == 2:
                    im = Image.fromarray(_reduce2(a))
            if grid_crop > 0 and grid is None:  # the grid's phase is searched per axis: orientation is moot
                grid = _full_scale_luma(data, grid_crop) if drafted else luma_pixels(_centre_crop(im, grid_crop))
            if factor >= 2 and not (grey and factor == 2):
                im = im.reduce(factor)
        if orientation in _TRANSPOSED_ORIENTATIONS:
            w, h = h, w
        return Decoded(im, w, h, fmt, orientation, None, content_hash, grid)
    except Exception as e:  # noqa: BLE001 - every decoder failure is a row with a reason
        msg = f"{type(e).__name__}: {e}".strip()
        return Decoded(None, None, None, None, None, msg[:500], content_hash)


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
