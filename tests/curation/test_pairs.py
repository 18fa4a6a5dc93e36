"""Stage-2 pair scorers on pairs made from real photos (scikit-image / scikit-learn samples), and
the edit-pair readers on the same pairs written as Parquet, Lance, JSON-lines and WebDataset."""

from __future__ import annotations

import io
import json
import tarfile

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.typed_config import ConfigError
from curation import pair_readers as pr
from curation import pairs
from curation.readers import work_units
from curation.samples import jpeg, png, real_photos


@pytest.fixture(scope="module")
def photos():
    keep = {"astronaut", "coffee", "chelsea", "china"}
    return [(n, im.resize((im.width * 384 // max(im.size), im.height * 384 // max(im.size))))
            for n, im in real_photos() if n in keep]


def test_noop_and_unrelated_rules_on_real_photo_edits(photos):
    seen = set()
    for kind, edit, src, tgt in pairs.calibration_pairs(photos, seed=1):
        d, s, c = pairs.phash_distance(src, tgt), pairs.ssim(src, tgt), pairs.changed_fraction(src, tgt)
        assert 0 <= d <= 64 and -1 <= s <= 1 and 0 <= c <= 1
        noop, unrelated = pairs.is_noop(d, s, c), pairs.is_unrelated(d, s)
        if kind == "noop":
            assert noop and not unrelated, (edit, d, s, c)
        elif kind == "unrelated":
            assert unrelated and not noop, (edit, d, s, c)
        elif edit in ("paste_object", "add_text", "greyscale", "posterise", "painterly", "night", "hue_turn"):
            # real edits of a colour photo: neither a no-op nor an unrelated pair
            assert not noop and not unrelated, (kind, edit, d, s, c)
        seen.add(kind)
    assert seen == {"noop", "local", "global", "unrelated"}
    # colour-only edits are invisible to pHash and grey SSIM; the changed-cell fraction sees them
    src = photos[0][1]
    grey = src.convert("L").convert("RGB")
    assert pairs.phash_distance(src, grey) <= 2 and pairs.ssim(src, grey) > 0.99
    assert pairs.changed_fraction(src, grey) > 0.3


def test_clip_cosine_and_directional_similarity():
    rng = np.random.default_rng(0)
    src_i, src_t, tgt_t = rng.normal(size=(3, 5, 64))
    along = src_i + 2.0 * (tgt_t - src_t)  # the image moved the way the caption did
    against = src_i - 0.5 * (tgt_t - src_t)
    np.testing.assert_allclose(pairs.directional_similarity(src_i, along, src_t, tgt_t), 1.0, atol=1e-9)
    np.testing.assert_allclose(pairs.directional_similarity(src_i, against, src_t, tgt_t), -1.0, atol=1e-9)
    assert np.isnan(pairs.directional_similarity(src_i, src_i, src_t, tgt_t)).all()  # no image change
    a, b = rng.normal(size=(2, 4, 768)).astype(np.float16)
    want = [float(np.dot(x, y) / np.linalg.norm(x.astype(float)) / np.linalg.norm(y.astype(float)))
            for x, y in zip(a.astype(float), b.astype(float), strict=True)]
    np.testing.assert_allclose(pairs.clip_cosine(a, b), want, atol=1e-6)
    np.testing.assert_allclose(pairs.clip_cosine(a * 3, a), 1.0, atol=1e-9)
    assert pairs.is_unrelated(30, 0.1, clip_cos=0.9) is False  # CLIP, where it ran, must agree


@pytest.mark.parametrize("text,lang", [
    ("Add a red hat to the cat", "en"), ("Make it snowy", "en"), ("给猫戴上一顶红帽子", "zh"),
    ("把背景换成 Times Square at night", "mixed"), ("Ajoutez un chapeau rouge au chat", "other"),
    ("猫に赤い帽子をかぶせて", "other"), ("Добавь кошке красную шляпу", "other"), ("고양이에게 모자를", "other"),
    ("", None), ("  \n ", None), ("!!! 123 ...", None),
])
def test_instruction_language(text, lang):
    assert pairs.instruction_language(text) == lang


def test_instruction_issues_and_duplicate_key():
    assert pairs.instruction_issue("  ", 0, 512) == "empty"
    assert pairs.instruction_issue("Add a hat", 600, 512) == "too_long"
    assert pairs.instruction_issue("Ajoutez un chapeau rouge au chat", 8, 512) == "language"
    assert pairs.instruction_issue("把天空变成紫色", 9, 512) is None
    assert pairs.instruction_issue("Add a hat", None, 512) is None  # not counted: no rejection
    k = pairs.pair_key("sha-a", "Add a red hat.", None)
    assert k == pairs.pair_key("sha-a", "  add a RED   hat ", None)
    assert k != pairs.pair_key("sha-a", "Add a blue hat", None) != pairs.pair_key("sha-b", "Add a red hat", None)
    assert pairs.pair_key("sha-a", None, "加一顶帽子") != pairs.pair_key("sha-a", None, "加一顶红帽子")


# --------------------------------------------------------------------------- readers
PAIRS = [("p0", "astronaut", "Add a red hat", "加一顶红帽子", "local"),
         ("p1", "coffee", "Make it black and white", None, "global"),
         ("p2", "chelsea", None, "把猫变成老虎", None)]


@pytest.fixture(scope="module")
def pair_images(photos):
    ims = dict(photos)
    return {k: (jpeg(ims[n]), png(ims[n].convert("L").convert("RGB"))) for k, n, *_ in PAIRS}


def _rows(source: pr.PairSource) -> dict[str, dict]:
    rows = [r for u in source.units for t in pr.expand_unit(source, u, 2) for r in t.to_pylist()]
    return {r["uri"].rsplit("#", 1)[1]: r for r in rows}


def _check(rows: dict[str, dict], pair_images, by_path: bool = False):
    assert sorted(rows) == ["p0", "p1", "p2"]
    for key, _, en, zh, cat in PAIRS:
        r = rows[key]
        assert (r["instruction_en"], r["instruction_zh"], r["category"], r["error"]) == (en, zh, cat, None)
        src, tgt, err = pr.read_pair_images(r)
        assert err is None and (src, tgt) == pair_images[key]
        assert (r["source_path"] is not None) == by_path


def test_pairs_from_parquet_lance_jsonl_and_webdataset_agree(tmp_path, pair_images):
    table = pa.table({"key": [p[0] for p in PAIRS],
                      "source_image": [pair_images[p[0]][0] for p in PAIRS],
                      "edited_image": [pair_images[p[0]][1] for p in PAIRS],
                      "instruction": [p[2] for p in PAIRS], "instruction_zh": [p[3] for p in PAIRS],
                      "edit_type": [p[4] for p in PAIRS], "input_caption": ["a photo"] * 3})
    pq.write_table(table, tmp_path / "pairs.parquet")
    lance.write_dataset(table, str(tmp_path / "pairs.lance"))
    (tmp_path / "img").mkdir()
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for key, _, en, zh, cat in PAIRS:
            (tmp_path / "img" / f"{key}_s.jpg").write_bytes(pair_images[key][0])
            (tmp_path / "img" / f"{key}_t.png").write_bytes(pair_images[key][1])
            f.write(json.dumps({"id": key, "source_path": f"img/{key}_s.jpg", "target_path": f"img/{key}_t.png",
                                "instruction_en": en, "instruction_zh": zh, "category": cat}) + "\n")
        f.write("{not json\n")
    with tarfile.open(tmp_path / "pairs.tar", "w") as tf:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for key, _, en, zh, cat in PAIRS:
            add(f"{key}.source.jpg", pair_images[key][0])
            add(f"{key}.target.png", pair_images[key][1])
            add(f"{key}.json", json.dumps({"instruction": en, "instruction_zh": zh, "category": cat}).encode())
        add("orphan.source.jpg", pair_images["p0"][0])  # a pair without its target

    pq_src = pr.resolve_pairs(str(tmp_path / "pairs.parquet"))
    assert pq_src.columns.target_image == "edited_image" and pq_src.columns.source_caption == "input_caption"
    _check(_rows(pq_src), pair_images)
    _check(_rows(pr.resolve_pairs(str(tmp_path / "pairs.lance"))), pair_images)
    jl = _rows(pr.resolve_pairs(str(tmp_path / "pairs.jsonl")))
    bad = jl.pop("3")
    assert bad["error"].startswith("bad JSON line")
    _check(jl, pair_images, by_path=True)
    tar = _rows(pr.resolve_pairs(str(tmp_path / "pairs.tar")))
    assert tar.pop("orphan")["error"] == "no target image bytes or path"
    _check(tar, pair_images)
    # ids: stable across runs, distinct across inputs
    again = _rows(pr.resolve_pairs(str(tmp_path / "pairs.parquet")))
    assert {k: r["id"] for k, r in again.items()} == {k: r["id"] for k, r in _rows(pq_src).items()}
    assert again["p0"]["id"] != tar["p0"]["id"]
    # a missing file is an error naming the image, not a lost row
    src, tgt, err = pr.read_pair_images({**jl["p1"], "target_path": str(tmp_path / "gone.png")})
    assert src is not None and tgt is None and err.startswith("target: unreadable file")


def test_work_units_split_big_files_and_keep_ids(tmp_path, pair_images):
    """One big file is read by several tasks (Parquet row groups, Lance row ranges) with the same
    rows and ids as read whole, also without a key column (ids from each row's place in the file)."""
    t = pa.Table.from_pylist([{"source_image": pair_images[k][0], "target_image": pair_images[k][1],
                               "instruction": f"add {i} balls"} for i, k in enumerate(["p0", "p1", "p2"] * 2)])
    pq.write_table(t, tmp_path / "p.parquet", row_group_size=1)
    lance.write_dataset(t, str(tmp_path / "p.lance"), max_rows_per_file=4)  # fragments of 4 + 2 rows
    for spec in ("p.parquet", "p.lance"):
        src = pr.resolve_pairs(str(tmp_path / spec))
        units = work_units(src, 2)
        split = [r for u, a, b, _ in units for tb in pr.expand_unit(src, u, 8, (a, b)) for r in tb.to_pylist()]
        whole = [r for u in src.units for tb in pr.expand_unit(src, u, 8) for r in tb.to_pylist()]
        assert len(units) == 3 and split == whole and len({r["id"] for r in whole}) == 6, spec


def test_truncated_jpeg_is_broken_at_the_working_size(photos):
    """The stage decodes JPEGs at reduced DCT scale (draft) for speed; libjpeg still reads the whole
    entropy-coded stream, so a real photo cut anywhere (even just its end marker) is an error."""
    from curation.decode import decode

    data = jpeg(dict(photos)["chelsea"].resize((768, 512)))
    whole = decode(data, 256, 10**8)
    assert whole.error is None and whole.image.size == (384, 256) and whole.width == 768  # drafted to 1/2
    for cut in (len(data) // 3, len(data) // 2, len(data) * 9 // 10, len(data) - 100, len(data) - 2):
        d = decode(data[:cut], 256, 10**8)
        assert d.image is None and "truncated" in d.error, cut


def test_missing_columns_stop_before_work_naming_them(tmp_path):
    pq.write_table(pa.table({"source_image": [b"x"], "caption": ["c"]}), tmp_path / "half.parquet")
    with pytest.raises(ConfigError) as e:
        pr.resolve_pairs(str(tmp_path / "half.parquet"))
    msg = str(e.value)
    assert "the target image" in msg and "an instruction" in msg and "source image" not in msg
    assert "input columns: source_image, caption" in msg
    with pytest.raises(ConfigError, match="column 'tgt_img' .for target_image. not in the input"):
        pr.resolve_pairs(str(tmp_path / "half.parquet"), pr.PairColumns(target_image="tgt_img"))
    (tmp_path / "mixed").mkdir()
    pq.write_table(pa.table({"a": [1]}), tmp_path / "mixed" / "a.parquet")
    (tmp_path / "mixed" / "b.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="one kind of pair file"):
        pr.resolve_pairs(str(tmp_path / "mixed"))
    with pytest.raises(ConfigError, match="no such file"):
        pr.resolve_pairs(str(tmp_path / "nope.parquet"))
    # Hugging Face datasets' Image() struct column holds the bytes
    hf = pa.table({"source_image": pa.array([{"bytes": b"s", "path": None}]),
                   "target_image": pa.array([{"bytes": b"t", "path": None}]), "prompt": ["add a hat"]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    (row,) = _rows(pr.resolve_pairs(str(tmp_path / "hf.parquet"))).values()
    assert (row["source_data"], row["target_data"], row["instruction_en"]) == (b"s", b"t", "add a hat")
