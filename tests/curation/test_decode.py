"""Decode-once: every malformed file becomes a result with a reason, every mode becomes RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation import samples
from curation.decode import decode

MAX_PIXELS = 178_956_970


@pytest.fixture(scope="module")
def base() -> Image.Image:
    return dict(samples.real_photos())["chelsea"]  # 451 x 300


@pytest.fixture(scope="module")
def corpus(base) -> dict[str, bytes]:
    return samples.malformed_corpus(base)


@pytest.mark.parametrize("name, needle", [
    ("truncated.jpg", "truncated"),
    ("zero_bytes.jpg", "empty file"),
    ("not_an_image.jpg", "cannot identify"),
    ("corrupt.png", ""),
    ("corrupt_idat_valid_crc.png", ""),
    ("bomb.png", "decompression bomb"),
])
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_broken_files_become_errors_not_crashes(corpus, name, needle, grey):
    d = decode(corpus[name], 256, MAX_PIXELS, grid_crop=512 if grey else 0, grey=grey)
    assert d.image is None and d.error, name
    assert needle.lower() in d.error.lower()
    assert d.content_hash and len(d.content_hash) == 64  # still hashed: the row is identifiable


@pytest.mark.parametrize("name", ["cmyk.jpg", "grey16.png", "palette.png", "animated.gif", "rgba.png",
                                  "la.png", "png_named.jpg", "exif_rot6.jpg"])
def test_every_mode_normalised_to_rgb(corpus, name):
    d = decode(corpus[name], 256, MAX_PIXELS)
    assert d.error is None, d.error
    assert d.image.mode == "RGB"
    assert min(d.image.size) >= min(256, min(d.width, d.height))


def test_content_not_extension_picks_decoder(corpus):
    assert decode(corpus["png_named.jpg"], 256, MAX_PIXELS).format == "PNG"


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 512 * 300).reshape(300, 512)).astype(np.uint16)
    d = decode(samples.png(Image.fromarray(ramp)), 1024, MAX_PIXELS)
    a = np.asarray(d.image)[..., 0]
    # Clipping to 8 bits would saturate nearly everything at 255; scaling keeps the ramp.
    assert a.min() == 0 and a.max() == 255
    assert 120 <= np.median(a) <= 135
    assert (a == 255).mean() < 0.01


def test_alpha_composited_on_white():
    im = Image.new("RGBA", (300, 300), (10, 20, 30, 0))
    d = decode(samples.png(im), 256, MAX_PIXELS)
    assert np.asarray(d.image).min() == 255


def test_exif_orientation_applied_and_recorded(base):
    d = decode(samples.exif_rotated_jpeg(base, 6), 10_000, MAX_PIXELS)
    assert d.orientation == 6
    assert (d.width, d.height) == base.size  # upright size, not the stored (turned) one
    diff = np.abs(np.asarray(d.image, np.int16) - np.asarray(base, np.int16)).mean()
    assert diff < 8  # the same picture, upright (JPEG noise only)


def test_jpeg_draft_decodes_fewer_pixels_but_keeps_working_size():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    d = decode(samples.jpeg(big), 256, MAX_PIXELS)
    assert (d.width, d.height) == (1600, 1200)
    assert 256 <= min(d.image.size) < 600  # drafted: 1/4 scale gives 300 px, not 1200


def test_truncated_jpeg_caught_even_in_draft_mode():
    big = samples.jpeg(dict(samples.real_photos())["astronaut"].resize((1024, 1024)))
    for grey in (False, True):
        d = decode(big[: len(big) * 2 // 3], 256, MAX_PIXELS, grid_crop=512, grey=grey)
        assert d.error and "truncated" in d.error


def test_bomb_limit_is_the_configured_one(base):
    d = decode(samples.jpeg(base), 256, max_pixels=1000)
    assert d.error.startswith("decompression bomb") and "scoring.max_pixels" in d.error


def test_decode_never_raises_on_garbage():
    rng = np.random.default_rng(1)
    for n in (1, 7, 100, 5000):
        d = decode(bytes(rng.integers(0, 256, n, dtype=np.uint8)), 256, MAX_PIXELS)
        assert d.error
    d = decode(b"\xff\xd8\xff\xe0" + b"\0" * 100, 256, MAX_PIXELS)  # JPEG magic, nothing after
    assert d.error


def test_corrupt_idat_with_valid_crcs_is_broken_whatever_decodes_first(base):
    """Pillow's getexif() on a PNG decodes the pixels; its error must not be swallowed as "bad
    EXIF" (the row would pass with half-decoded pixels)."""
    from PIL import Image as PILImage

    data = samples.corrupt_idat_png(base)
    PILImage.open(io.BytesIO(data)).verify()  # every CRC is valid
    d = decode(data, 256, MAX_PIXELS)
    assert d.image is None and d.error, d


def test_grid_is_the_full_scale_luma_whatever_the_working_size():
    """Blockiness reads ``Decoded.grid``: for a JPEG drafted to the working size, a second decode in
    grey at DCT scale 1 (the file's 8x8 grid); for a PNG, the full-scale pixels before reducing."""
    from curation.quality import DEFAULT_MAX_BLOCKINESS, blockiness

    photo = dict(samples.real_photos())["astronaut"].resize((1000, 840))
    q10 = samples.jpeg(photo, 10)
    full = np.asarray(Image.open(io.BytesIO(q10)).convert("L"), np.int16)
    for data in (q10, samples.png(Image.open(io.BytesIO(q10)))):
        d = decode(data, 256, MAX_PIXELS, grid_crop=512)
        assert min(d.image.size) < 840 and d.grid.shape == (512, 512) and d.grid.dtype == np.uint8
        # The centre crop, 8-aligned: (1000 - 512) // 2 // 8 * 8 = 240, (840 - 512) // 2 // 8 * 8 = 160.
        assert np.abs(d.grid.astype(np.int16) - full[160:672, 240:752]).mean() < 1.0
        assert blockiness(d.grid) > DEFAULT_MAX_BLOCKINESS
    assert decode(q10, 256, MAX_PIXELS).grid is None  # only when asked
    clean = decode(samples.jpeg(photo, 92), 256, MAX_PIXELS, grid_crop=512)
    assert blockiness(clean.grid) < DEFAULT_MAX_BLOCKINESS


@pytest.mark.parametrize("name", ["exif_rot6.jpg", "cmyk.jpg", "rgba.png", "grey16.png", "palette.png"])
def test_grey_decode_is_the_rgb_decodes_luma(corpus, name):
    """A luma-only stage decodes grey (one full-scale JPEG pass): same sizes and orientation as the
    RGB decode, the same full-scale grid, and a working image equal to the RGB one's luma."""
    rgb = decode(corpus[name], 256, MAX_PIXELS, grid_crop=512)
    grey = decode(corpus[name], 256, MAX_PIXELS, grid_crop=512, grey=True)
    assert grey.error is None and grey.image.mode == "L"
    assert (grey.width, grey.height, grey.orientation, grey.format) == (rgb.width, rgb.height, rgb.orientation, rgb.format)
    assert grey.image.size == rgb.image.size  # upright, at the working size
    # JPEG's own Y vs Pillow's RGB -> L of the decoded RGB: equal up to rounding.
    assert grey.grid.shape == rgb.grid.shape and np.abs(grey.grid.astype(np.int16) - rgb.grid).max() <= 2
    diff = np.abs(np.asarray(grey.image, np.int16) - np.asarray(rgb.image.convert("L"), np.int16))
    assert diff.mean() < 3, diff.mean()  # DCT-scaled draft vs full decode + reduce: resampling only


def test_luma_pixels_equal_pillows_whether_exported_or_copied():
    """luma_pixels reads an "L" image without a copy where Pillow exports it (one memory block),
    and copies one whose rows span several blocks (over Pillow's block size); other modes: luma."""
    from curation.decode import luma_pixels, to_grey

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (301, 451), np.uint8))
    big = Image.fromarray(rng.integers(0, 256, (4100, 4100), np.uint8))  # 16.8 MB: several blocks
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), np.uint8))
    for im in (small, big, rgb, small.crop((3, 5, 200, 101))):
        a = luma_pixels(im)
        assert a.dtype == np.uint8 and np.array_equal(a, np.asarray(to_grey(im)))
