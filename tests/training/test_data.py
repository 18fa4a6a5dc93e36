"""Aspect buckets, caption-variant sampling, and the pure step -> batch mapping."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from training.data import LatentIndex, bucket_table, image_variants, nearest_bucket, pick_variant, plan_step


@pytest.mark.parametrize("res", [256, 512, 1024, 2048])
def test_bucket_tables_keep_area_and_span_aspect_ratios(res):
    b = bucket_table(res, 32)
    assert (res, res) in b
    for h, w in b:
        assert h % 32 == 0 and w % 32 == 0
        assert 0.8 < h * w / res**2 < 1.25
    ratios = [h / w for h, w in b]
    assert min(ratios) <= 0.3 and max(ratios) >= 3.5 and ratios == sorted(ratios)
    assert nearest_bucket(1920, 1080, b)[1] > nearest_bucket(1920, 1080, b)[0]  # landscape -> wide bucket
    assert nearest_bucket(100, 100, b) == (res, res)


def test_image_variants_render_a_captions_row_and_add_the_alt_text():
    from captioning.schema import SCHEMA, STATUS_FAILED, STATUS_OK

    g = {"en": {"short": "cat", "medium": " ", "dense": "a long one"}, "zh": {"short": "猫", "medium": "", "dense": "长的"}}
    k = {"entities": [], "en": "a cat", "zh": "一只猫"}
    row = dict.fromkeys(SCHEMA.names) | {"id": "x", "caption_status": STATUS_OK, "caption_general": json.dumps(g),
                                          "caption_knowledge": json.dumps(k)}
    assert image_variants("alt", row) == [("short", "en", "cat"), ("short", "zh", "猫"), ("dense", "en", "a long one"),
                                          ("dense", "zh", "长的"), ("knowledge", "en", "a cat"),
                                          ("knowledge", "zh", "一只猫"), ("alt", "und", "alt")]
    # A failed row (its valid partial captions included) and a missing row: the alt text only.
    assert image_variants("alt", row | {"caption_status": STATUS_FAILED}) == [("alt", "und", "alt")]
    assert image_variants("alt", None) == [("alt", "und", "alt")]
    assert image_variants(None, None) == []


KINDS = {"general": 0.6, "text": 0.2, "knowledge": 0.0, "structured": 0.1, "alt": 0.1}
LENGTHS, LANGS = {"short": 0.2, "medium": 0.3, "dense": 0.5}, {"en": 0.8, "zh": 0.2}


def test_pick_variant_draws_type_length_and_language_by_ratios_renormalised_over_what_exists():
    rng = np.random.default_rng(0)
    avail = [(0, "short", "en"), (1, "short", "zh"), (2, "dense", "en"), (3, "alt", "und"), (4, "text", "en"),
             (5, "text", "zh"), (6, "knowledge", "en")]
    n = 40000
    c = Counter(pick_variant(avail, KINDS, LENGTHS, LANGS, rng) for _ in range(n))
    # types present: general .6, text .2, knowledge 0 (never), alt .1 -> /0.9 (no structured caption)
    # general: medium missing -> short .2/.7, dense .5/.7; short en .8 / zh .2 (dense has en only)
    expect = {0: .6 / .9 * .2 / .7 * .8, 1: .6 / .9 * .2 / .7 * .2, 2: .6 / .9 * .5 / .7, 3: .1 / .9,
              4: .2 / .9 * .8, 5: .2 / .9 * .2, 6: 0.0}
    for row, p in expect.items():
        assert c[row] / n == pytest.approx(p, abs=0.012), row
    assert pick_variant([(7, "alt", "und")], KINDS, LENGTHS, LANGS, rng) == 7  # failed/missing captions: alt text
    assert pick_variant([(7, "alt", "und"), (8, "knowledge", "en")], KINDS | {"alt": 0.0}, LENGTHS, LANGS, rng) == 7
    assert pick_variant(avail + [(9, "instruction", "en")], KINDS, LENGTHS, LANGS, rng, instruction=True) == 9


def _index(n=50):
    rng = np.random.default_rng(1)
    buckets = np.array([(64, 64), (48, 80), (80, 48)])[rng.integers(0, 3, n)]
    texts = [[(2 * i, "short", "en"), (2 * i + 1, "dense", "zh")] for i in range(n)]
    has_ref = np.arange(n) % 5 == 0
    for i in np.flatnonzero(has_ref):
        texts[i] = [(1000 + i, "instruction", "en")]
    return LatentIndex("l", "t", 1, 1, {}, buckets, has_ref, texts, null_row=9999)


def test_step_plan_is_a_pure_function_of_step_and_respects_task_and_bucket():
    idx = _index()
    kw = dict(global_batch=16, seed=3, t2i_ratio=0.7, caption_types={"short": 0.5, "dense": 0.5}, languages={"en": 0.5, "zh": 0.5})
    a, b = plan_step(idx, 17, **kw), plan_step(_index(), 17, **kw)
    assert a.bucket == b.bucket and (a.latent_rows == b.latent_rows).all() and (a.text_rows == b.text_rows).all()
    plans = [plan_step(idx, s, **kw) for s in range(300)]
    assert len({p.latent_rows.tobytes() for p in plans}) == 300
    ti2i = np.mean([p.ti2i for p in plans])
    assert ti2i == pytest.approx(0.3, abs=0.08)
    for p in plans:
        assert all(tuple(idx.bucket[r]) == p.bucket for r in p.latent_rows)  # one shape per batch
        assert all(idx.has_ref[r] == p.ti2i for r in p.latent_rows)
        assert all(t >= 1000 for t in p.text_rows) == p.ti2i


def test_missing_ti2i_rows_are_named():
    idx = _index()
    idx.has_ref[:] = False
    with pytest.raises(ValueError, match="^data.ti2i_ratio"):
        idx.pools(True)
