"""Stage-4 quality scores on real photos and degraded copies of them (benchmarks/calibrate_stage4.py
makes both; the defaults are the ones calibrated there)."""

from __future__ import annotations

import importlib
import io
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from curation import quality
from curation.samples import jpeg, png, real_photos

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from calibrate_stage4 import CLEAN, calibration_set, rejected, scores  # noqa: E402


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return dict(real_photos())


@pytest.fixture(scope="module")
def scored() -> list[tuple[str, str, dict]]:
    # Two photos (china: the clean photo with the highest BRISQUE) x every degradation, and three
    # illustrations: enough to see each rule separate them.
    return [(c, n, scores(d)) for c, n, d in calibration_set(("astronaut", "china"), 3)]


def _package_brisque(monkeypatch):
    """The ``brisque`` package's own BRISQUE class. Its module imports libsvm at the top; where
    libsvm is not installed, a stand-in module lets its feature code load (the SVM is not used)."""
    try:
        import libsvm.svmutil  # noqa: F401
    except ImportError:
        stub = types.ModuleType("libsvm")
        stub.svmutil = types.ModuleType("libsvm.svmutil")
        monkeypatch.setitem(sys.modules, "libsvm", stub)
        monkeypatch.setitem(sys.modules, "libsvm.svmutil", stub.svmutil)
    monkeypatch.delitem(sys.modules, "brisque.brisque", raising=False)
    return importlib.import_module("brisque.brisque").BRISQUE


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the package's own numpy idioms
@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_brisque_features_equal_the_packages(photos, name, monkeypatch):
    brisque_cls = _package_brisque(monkeypatch)
    ref = brisque_cls.__new__(brisque_cls)  # its __init__ only loads the SVM, which we replace
    grey = quality.analysis_grey(photos[name])
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    theirs = np.concatenate([ref.calculate_brisque_features(grey), ref.calculate_brisque_features(half)]).astype(float)
    ours = quality.brisque_features(grey, activity=0.0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("shape, size", [((730, 675), (554, 512)), ((513, 1024), (1022, 512)), ((1200, 801), (600, 400))])
def test_area_resize_equals_opencvs(shape, size):
    """The compiled INTER_AREA (fractional and integer scales, 8-bit or float input) is OpenCV's."""
    a = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    ref = cv2.resize(a.astype(np.float32) / 255, size, interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(quality.area_resize(a, *size, 1 / 255), ref, atol=1e-6)
    np.testing.assert_allclose(quality.area_resize(a.astype(np.float32) / 255, *size), ref, atol=1e-6)


def test_numpy_svr_equals_libsvm(photos, monkeypatch):
    try:
        import libsvm.svmutil  # noqa: F401
    except ImportError:
        pytest.skip("libsvm (pip libsvm-official) is not installed: the package's SVM cannot run here")
    ref = _package_brisque(monkeypatch)(url=False)
    for name in ("astronaut", "coffee"):
        feats = quality.brisque_features(quality.analysis_grey(photos[name]), activity=0.0)
        assert quality.brisque_from_features(feats)[0] == pytest.approx(ref.calculate_image_quality_score(feats), abs=1e-6)


def test_each_score_separates_clean_from_degraded(scored):
    def vals(key, classes):
        return np.array([s[key] for c, _, s in scored if c in classes and s[key] is not None], float)

    assert vals("brisque", CLEAN).max() < quality.DEFAULT_MAX_BRISQUE < vals("brisque", ("blur",)).min()
    # x4 upscales are rejected; milder x3 ones sit around the threshold (curation/QUALITY.md).
    assert min(s["brisque"] for c, n, s in scored if c == "upscale" and n.endswith("_x4")) > quality.DEFAULT_MAX_BRISQUE
    assert np.median(vals("brisque", ("noise",))) > np.median(vals("brisque", ("clean",))) + 30
    assert vals("jpeg_quality", ("low_jpeg",)).max() < quality.DEFAULT_MIN_JPEG_QUALITY < vals("jpeg_quality", CLEAN).min()
    assert vals("blockiness", CLEAN).max() < quality.DEFAULT_MAX_BLOCKINESS < vals("blockiness", ("low_jpeg", "resaved")).min()


def test_defaults_keep_bokeh_and_smooth_illustrations(scored):
    kept = {(c, n): rejected(s) for c, n, s in scored if c in CLEAN}
    assert {c for c, _ in kept} == set(CLEAN)
    assert all(not r for r in kept.values()), {k: r for k, r in kept.items() if r}
    # ... and reject every blurred, heavily compressed and re-saved copy.
    assert all(rejected(s) for c, _, s in scored if c in ("blur", "low_jpeg", "resaved"))


def test_brisque_is_none_without_structure():
    y, x = np.mgrid[0:600, 0:800]
    gradient = Image.fromarray(np.stack([x * 255 // 800, y * 255 // 600, 128 + 0 * x], -1).astype(np.uint8))
    assert quality.brisque_score(gradient) is None


def test_jpeg_quality_recovers_the_factor(photos):
    im = photos["coffee"]
    for q in range(30, 96, 5):
        for kw in ({}, {"subsampling": 0}, {"progressive": True, "optimize": True}):
            assert abs(quality.jpeg_quality(jpeg(im, q, **kw)) - q) <= 3, (q, kw)
    ok, buf = cv2.imencode(".jpg", np.asarray(im)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 55])  # libjpeg-turbo via OpenCV
    assert abs(quality.jpeg_quality(buf.tobytes()) - 55) <= 3
    grey = jpeg(im.convert("L"), 70)  # one table only
    assert abs(quality.jpeg_quality(grey) - 70) <= 3


def test_jpeg_quality_is_none_for_other_files(photos):
    im = photos["coffee"]
    for data in (png(im), b"", b"not an image", jpeg(im)[:20]):
        assert quality.jpeg_quality(data) is None
    webp = io.BytesIO()
    im.save(webp, format="WEBP", quality=20)
    assert quality.jpeg_quality(webp.getvalue()) is None


def test_blockiness_catches_resaved_and_png_artefacts_at_any_grid_offset(photos):
    im = photos["astronaut"]
    q10 = Image.open(io.BytesIO(jpeg(im, 10))).convert("RGB")
    resaved = Image.open(io.BytesIO(jpeg(q10, 95)))
    assert quality.jpeg_quality(jpeg(q10, 95)) == 95  # the tables alone say "high quality"
    assert quality.blockiness(resaved) > quality.DEFAULT_MAX_BLOCKINESS
    for dx, dy in ((0, 0), (3, 5), (7, 1)):  # a PNG of the decoded q10, cropped off the 8 px grid
        shifted = Image.open(io.BytesIO(png(q10.crop((dx, dy, 480 + dx, 400 + dy)))))
        assert quality.blockiness(shifted) > quality.DEFAULT_MAX_BLOCKINESS, (dx, dy)
    assert quality.blockiness(Image.open(io.BytesIO(jpeg(im, 92)))) < quality.DEFAULT_MAX_BLOCKINESS
