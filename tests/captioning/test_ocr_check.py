"""Text captions checked against OCR (common/ocr.py, real rapidocr) on synthetic text renders whose
true text is known (curation/synthetic_text.py): a faithful transcription passes, a hallucinated
one is asked again once and, if still wrong, kept with `ocr_flag` (which training leaves out)."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import pytest
from conftest import SERVED, ScriptedServer, completion, image_of, jpeg, kind_of, write_curated

from captioning.config import PACKAGE_DIR, load_config
from captioning.pipeline import ocr_columns, run
from captioning.schema import caption_variants

GENERAL = {"en": {"short": "a sign with text", "medium": "A plain background with printed text in the middle of it.",
                  "dense": "A plain single-colour background with printed text; the lines are centred, the font is "
                           "clean and large, and nothing else is visible in the frame at all."},
           "zh": {"short": "一张有文字的图", "medium": "纯色背景上印着几行文字，文字位于画面中间。",
                  "dense": "纯色背景上印着几行清晰的大号文字，文字居中排列，字体干净整齐，颜色与背景对比鲜明，画面中除了这些文字之外没有其他任何物体、图案或装饰元素。"}}


@pytest.fixture(scope="module")
def renders():
    from curation.synthetic_text import PhotoPool, caption_json, render_one
    from curation.synthetic_text import load_config as synth_config

    cfg = synth_config(overrides={"templates": {"line": 0.5, "poster": 0.5}, "backgrounds": {"plain": 1.0},
                                  "languages": {"en": 0.5, "zh": 0.5}, "sizes": {"512x384": 1.0}})
    pool = PhotoPool(None, None, [], [], [])
    out = [render_one(cfg, 0, i, pool) for i in range(3)]  # en line, zh poster, zh line (seed 0)
    return [(r.image, caption_json(r)) for r in out]


def test_the_check_scores_known_text_high_and_other_text_low(renders):
    cfg = load_config(input="a", output="b", model="m")
    for image, truth in renders:
        good = ocr_columns(cfg, json.dumps(truth, ensure_ascii=False), image)
        assert good["ocr_agreement"] >= 0.9 and not good["ocr_flag"] and good["ocr_engine"] == "rapidocr"
        wrong = dict(truth, blocks=[{"text": "Quarterly revenue grew by 12 percent", "position": "top", "role": "title"}])
        bad = ocr_columns(cfg, json.dumps(wrong), image)
        assert bad["ocr_agreement"] < 0.5 and bad["ocr_flag"]


def test_hallucinated_transcriptions_are_retried_once_then_flagged(tmp_path, renders):
    images = [jpeg(im) for im, _ in renders]
    truth = {img: t for img, (_, t) in zip(images, renders, strict=True)}
    write_curated(tmp_path / "curated.lance", [True] * 3, images)
    hallucinated = {"layout": "poster", "blocks": [{"text": "Quarterly revenue grew by 12 percent", "position": "top",
                                                    "role": "title"}], "en": 'A slide that reads "Quarterly revenue".'}
    asked: dict[bytes, int] = {}

    def respond(body):
        img, kind = image_of(body), kind_of(body)
        if kind == "route":
            answer = {"has_text": True, "is_structured": False, "has_known_entities": False}
        elif kind.startswith("general."):
            answer = {kind[-2:]: GENERAL[kind[-2:]]}
        elif kind == "text.zh":
            answer = {"zh": truth[img]["zh"]}
        else:  # text.en: image 0 truthful; image 1 hallucinated once, then truthful; image 2 always hallucinated
            asked[img] = n = asked.get(img, 0) + 1
            i = images.index(img)
            faithful = i == 0 or (i == 1 and n > 1)
            answer = {k: truth[img][k] for k in ("layout", "blocks", "en")} if faithful else hallucinated
        return 200, completion(json.dumps(answer, ensure_ascii=False))

    report = tmp_path / "r.html"
    with ScriptedServer(respond) as srv:
        summary = run(load_config(input=str(tmp_path / "curated.lance"), output=str(tmp_path / "c.lance"), model=SERVED,
                                  server=srv.url, prompt_root=str(PACKAGE_DIR), prompt_version="v2", progress=False,
                                  report=str(report)))
    rows = {r["id"]: r for r in lance.dataset(tmp_path / "c.lance").to_table().to_pylist()}
    assert (summary.ok, summary.ocr_checked, summary.ocr_retried, summary.ocr_flagged) == (3, 3, 2, 1)
    good, fixed, flagged = rows["id000"], rows["id001"], rows["id002"]
    assert good["ocr_agreement"] >= 0.9 and good["ocr_flag"] is False
    assert fixed["ocr_agreement"] >= 0.9 and fixed["ocr_flag"] is False
    assert json.loads(fixed["caption_text"])["blocks"] == truth[images[1]]["blocks"]  # the retry's answer kept
    assert flagged["ocr_flag"] is True and flagged["ocr_agreement"] < 0.5 and flagged["caption_status"] == "ok"
    assert "Quarterly" not in flagged["ocr_text"] and flagged["ocr_text"]
    # Training reads the flag: the hallucinated text caption never reaches the condition encoder.
    assert {k for k, _, _ in caption_variants(flagged)} == {"short", "medium", "dense"}
    assert "text" in {k for k, _, _ in caption_variants(good)}
    page = Path(summary.report).read_text()
    assert "OCR agreement of text captions" in page and "1 flagged (ocr_flag)" in page
