"""common.ocr on text rendered with the Debian Noto CJK fonts: both engines read English and Chinese
back, and char_agreement is the normalised edit-distance score the synthetic-text and caption checks use."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest
from PIL import Image, ImageDraw, ImageFont

from common import ocr

EN = "Quality data makes better models 2026"
ZH = "高质量数据训练更好的模型"


def _font(size: int) -> ImageFont.FreeTypeFont:
    if not shutil.which("fc-match"):
        pytest.skip("fontconfig (fc-match) is not installed; install fonts-noto-cjk")
    out = subprocess.run(["fc-match", "-f", "%{file}|%{index}", "Noto Sans CJK SC:style=Regular"],
                         capture_output=True, text=True).stdout
    path, _, index = out.partition("|")
    if "NotoSansCJK" not in path:
        pytest.skip(f"Noto Sans CJK SC not installed (fc-match gave {path!r}); apt-get install fonts-noto-cjk")
    return ImageFont.truetype(path, size, index=int(index or 0))


def render(lines: list[str], size: int = 40) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    font = _font(size)
    im = Image.new("RGB", (900, 60 + 80 * len(lines)), (250, 248, 240))
    d = ImageDraw.Draw(im)
    boxes = []
    for i, line in enumerate(lines):
        xy = (40, 30 + 80 * i)
        d.text(xy, line, font=font, fill=(20, 20, 30))
        boxes.append(d.textbbox(xy, line, font=font))
    return im, boxes


@pytest.mark.parametrize("text", [EN, ZH], ids=["english", "chinese"])
def test_rapidocr_reads_rendered_line_with_its_box(text):
    im, (box,) = render([text])
    r = ocr.read_text(im)
    assert r.engine == "rapidocr"
    assert ocr.char_agreement(text, r.text) >= 0.9, r.text
    assert len(r.lines) == len(r.boxes) == len(r.scores) == 1 and r.text == r.lines[0]
    xs, ys = [p[0] for p in r.boxes[0]], [p[1] for p in r.boxes[0]]
    cy = (box[1] + box[3]) / 2
    assert min(ys) <= cy <= max(ys) and min(xs) < box[0] + 30 and max(xs) > box[2] - 30
    assert 0.5 < r.scores[0] <= 1.0


def test_rapidocr_two_lines_in_reading_order_and_engine_loaded_once():
    im, _ = render([EN, ZH])
    r = ocr.read_text(im)
    assert ocr.char_agreement(EN + "\n" + ZH, r.text) >= 0.9, r.text
    assert ocr.char_agreement(ZH + EN, r.text) < 0.5  # order matters
    assert ocr._rapid(1) is ocr._rapid(1)


def test_blank_image_reads_nothing():
    r = ocr.read_text(Image.new("RGB", (400, 200), "white"))
    assert r.text == "" and r.lines == [] and ocr.char_agreement(EN, r.text) == 0.0


def test_tesseract_reads_english_and_chinese():
    if not shutil.which("tesseract"):
        pytest.skip("tesseract CLI not installed (apt-get install tesseract-ocr tesseract-ocr-chi-sim)")
    langs = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True).stdout.split()
    if "chi_sim" not in langs:
        pytest.skip("tesseract has no chi_sim data (apt-get install tesseract-ocr-chi-sim)")
    im, _ = render([EN, ZH])
    r = ocr.read_text(im, engine="tesseract")
    assert r.engine == "tesseract" and len(r.lines) == len(r.boxes) == len(r.scores) == 2
    assert ocr.char_agreement(EN + ZH, r.text) >= 0.8, r.text


def test_unknown_engine_is_an_error():
    with pytest.raises(ValueError, match="unknown OCR engine 'easyocr'"):
        ocr.read_text(Image.new("RGB", (10, 10)), engine="easyocr")


def test_char_agreement_normalises_space_punctuation_and_width():
    assert ocr.char_agreement("Hello, world!", "hello world") < 1.0  # case counts by default
    assert ocr.char_agreement("Hello, world!", "hello world", ignore_case=True) == 1.0
    assert ocr.char_agreement("你好，世界。", "你 好 世 界") == 1.0  # full-width punctuation, CJK spacing
    assert ocr.char_agreement("ＡＢＣ１２３", "ABC123") == 1.0  # NFKC folds full-width forms
    assert ocr.char_agreement("", "  ") == 1.0 and ocr.char_agreement("abc", "") == 0.0
    assert ocr.char_agreement("一二三四五六七八九十", "一二三四五六七八九千") == pytest.approx(0.9)
    assert ocr.char_agreement("abcd", "abXcd") == pytest.approx(0.8)


def test_numpy_edit_distance_matches_reference_dp():
    def dp(a, b):
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]

    rng = random.Random(0)
    alphabet = "ab文字c"
    for _ in range(300):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert ocr._edit_distance_np(a, b) == dp(a, b) == ocr.edit_distance(a, b), (a, b)
