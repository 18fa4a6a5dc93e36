"""Aspect buckets, caption-variant sampling, and the pure step -> batch mapping."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from training.data import LatentIndex, bucket_table, caption_variants, nearest_bucket, pick_variant, plan_step


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


def test_caption_variants_from_captioning_json_and_alt_text():
    g = json.dumps({"short": {"en": "cat", "zh": "猫"}, "medium": {"en": " "}, "dense": {"en": "a long one"}})
    assert caption_variants("alt", g) == [("short", "en", "cat"), ("short", "zh", "猫"), ("dense", "en", "a long one"),
                                          ("original", "und", "alt")]
    assert caption_variants("alt", None) == [("original", "und", "alt")]
    assert caption_variants(None, "not json") == []


def test_pick_variant_follows_ratios_renormalised_over_what_exists():
    rng = np.random.default_rng(0)
    avail = [(0, "short", "en"), (1, "short", "zh"), (2, "dense", "en"), (3, "original", "und")]
    types, langs = {"short": 0.2, "medium": 0.3, "dense": 0.5}, {"en": 0.8, "zh": 0.2}
    c = Counter(pick_variant(avail, types, langs, rng) for _ in range(20000))
    # medium is missing: short 0.2/0.7, dense 0.5/0.7; within short, en 0.8 / zh 0.2; alt text never
    assert c[2] / 20000 == pytest.approx(0.5 / 0.7, abs=0.015)
    assert c[0] / 20000 == pytest.approx(0.2 / 0.7 * 0.8, abs=0.015)
    assert c[1] / 20000 == pytest.approx(0.2 / 0.7 * 0.2, abs=0.015)
    assert c[3] == 0
    assert pick_variant([(7, "original", "und")], types, langs, rng) == 7  # fallback to the alt text
    assert pick_variant(avail + [(9, "instruction", "en")], types, langs, rng, instruction=True) == 9


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
