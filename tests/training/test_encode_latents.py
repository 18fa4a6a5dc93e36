"""jobs/encode_latents.py on a tiny curated table: rows, caption variants, provenance, rerun."""

from __future__ import annotations

from dataclasses import replace

import lance
import numpy as np
import pytest

from training.data import bucket_table
from training.latents_schema import from_bytes, read_metadata


def test_cache_has_one_latent_row_per_kept_image_plus_edit_pairs(cache, source_tables):
    lat = lance.dataset(f"{cache['dir']}/latents.lance").to_table().to_pylist()
    ids = [r["id"] for r in lat]
    assert len(ids) == len(set(ids)) == len(source_tables["ids"]) + 6  # 12 kept (1 rejected row left out) + 6 pairs
    assert "img012" not in ids  # keep == false
    buckets = set(bucket_table(64, 16))
    for r in lat:
        assert (r["bucket_h"], r["bucket_w"]) in buckets
        c, h, w = r["latent_shape"]
        assert (c, h, w) == (4 + 2, r["bucket_h"] // 4, r["bucket_w"] // 4)  # 4 VAE + 2 semantic channels
        z = from_bytes(r["latent"], r["latent_shape"])
        assert np.isfinite(z).all() and z.std() > 0
        if "|" in r["id"]:
            assert r["ref_id"] == r["id"].split("|")[1]
            assert from_bytes(r["ref_latent"], (4, h, w)).std() > 0  # references: texture channels only
        else:
            assert r["ref_latent"] is None
    # Different aspect ratios land in different buckets (64x64, 96x48 and 48x96 inputs).
    assert len({(r["bucket_h"], r["bucket_w"]) for r in lat}) == 3


def test_text_rows_cover_every_caption_variant_and_the_null_prompt(cache, source_tables):
    """The captions table written by the captioning job's own writer reaches the text table: every
    caption type x length x language of ok rows, the alt text of every row; failed and missing rows
    have only their alt text and are counted in the summary."""
    txt = lance.dataset(f"{cache['dir']}/text.lance").to_table(columns=["id", "kind", "lang", "text", "length"]).to_pylist()
    by_id: dict[str, set] = {}
    for r in txt:
        by_id.setdefault(r["id"], set()).add((r["kind"], r["lang"]))
        assert r["length"] > 0
    assert by_id[""] == {("null", "und")}
    both = {"en", "zh"}
    for i, what in source_tables["caption_rows"].items():
        kinds = {"failed": set(), "missing": set()}.get(what)
        if kinds is None:
            kinds = {k for t in what.split("+") for k in (("short", "medium", "dense") if t == "general" else (t,))}
        assert by_id[i] == {(k, lg) for k in kinds for lg in both} | {("alt", "und")}, (i, what)
    assert sum(1 for r in txt if r["kind"] == "instruction") == 6
    full = next(i for i, w in source_tables["caption_rows"].items() if w.count("+") == 3)
    text = {(r["kind"], r["lang"]): r["text"] for r in txt if r["id"] == full}
    # The structured caption's documented rendering, and the text caption's unquoted block appended.
    assert text[("structured", "en")] == ('a diagram of a cat in a house\nFigure: diagram\n'
                                          'Elements: "cat" (color: red); "house"\nRelations: "cat" -in-> "house"')
    assert text[("structured", "zh")].startswith("一张示意图：一只猫在一座房子里面，箭头指向房子。\n图类型: diagram\n元素: ")
    assert text[("text", "en")] == 'a green sign with the text "SALE" on top\nText: "big sale"'
    assert text[("alt", "und")] == "a red photo of a cat"
    s = cache["summary"]
    assert s["images_by_caption"] == {"captioned": 9, "failed": 2, "missing": 1}
    assert s["alt_text_fallback"] == 3 and s["no_text"] == 0
    assert s["caption_variants"]["structured/zh"] == 3 and s["caption_variants"]["alt/und"] == 12
    assert s["caption_variants"]["dense/en"] == 9 and s["caption_variants"]["text/zh"] == 6


def test_provenance_recorded_and_rerun_is_skipped_without_duplicates(cache, encode_settings, source_tables):
    from training.encode import run_encode

    md = read_metadata(lance.dataset(f"{cache['dir']}/latents.lance").schema)
    assert md["curated_version"] == lance.dataset(source_tables["curated"]).version
    assert md["resolution"] == 64 and md["latent_channels"] == 6 and md["semantic_channels"] == 2 and md["text_dim"] == 64
    before = lance.dataset(f"{cache['dir']}/text.lance").count_rows()
    again = run_encode(encode_settings, progress=False)
    assert again["skipped"] == ["latents", "text"]
    assert lance.dataset(f"{cache['dir']}/text.lance").count_rows() == before


def test_bad_inputs_fail_naming_the_flag(encode_settings, tmp_path):
    from training.encode import run_encode

    with pytest.raises(ValueError, match="^--curated"):
        run_encode(replace(encode_settings, curated=str(tmp_path / "missing.lance")))
    with pytest.raises(ValueError, match="^--resolution"):
        run_encode(replace(encode_settings, resolution=50))
    with pytest.raises(FileNotFoundError, match="--vae"):
        run_encode(replace(encode_settings, vae=str(tmp_path / "no_vae"), out=str(tmp_path / "o")))
