"""Stage-3 synthetic text renders end to end: real fonts (Debian Noto CJK / DejaVu), real Ray Data,
real Lance, real OCR read-back (rapidocr's PP-OCR models), real kill -9 and resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from common.ocr import char_agreement
from common.typed_config import ConfigError
from curation import samples
from curation import schema as curated
from curation import synthetic_text as st
from curation.synthetic_schema import LANGUAGES, RENDER_SCHEMA, SCHEMA, SOURCE, TEMPLATES
from curation.table import read_images

ROOT = Path(__file__).resolve().parents[2]
JOB = [sys.executable, str(ROOT / "jobs" / "synthesize_text.py")]
SMALL = {"sizes": {"384x256": 1.0}, "batch_size": 3}  # small renders: OCR is most of the cost


def _cjk(s: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in s)


def _latin(s: str) -> bool:
    return any("a" <= c.lower() <= "z" for c in s)


def _table(uri) -> pa.Table:
    """The whole table sorted by id, with the image blobs as bytes (``image_bytes``)."""
    ds = lance.dataset(str(uri))
    t = ds.to_table(columns=[c for c in SCHEMA.names if c != "image"], with_row_id=True).sort_by("id")
    data = read_images(ds, t["_rowid"])
    return t.drop(["_rowid"]).append_column("image_bytes", pa.array(data, pa.large_binary()))


def test_every_template_and_language_renders_its_text_boxes_and_caption():
    cfg = st.load_config(overrides=SMALL)
    photos = st.PhotoPool(None, None, [], [], [])
    for k, (tmpl, lang) in enumerate((t, lg) for t in TEMPLATES for lg in LANGUAGES):
        c = st.load_config(overrides={**SMALL, "templates": {tmpl: 1.0}, "languages": {lang: 1.0}})
        r = st.render_one(c, 7, k, photos)
        assert (r.template, r.language) == (tmpl, lang) and r.image.size == (384, 256)
        lines = [ln for b in r.blocks for ln in b.lines]
        text = "".join(lines)
        assert lines and all(ln.strip() for ln in lines)
        assert {"en": _latin(text) and not _cjk(text), "zh": _cjk(text), "mixed": _cjk(text) and _latin(text)}[lang], text
        for b in r.blocks:
            for x0, y0, x1, y1 in b.boxes:
                assert 0 <= x0 < x1 <= 384 and 0 <= y0 < y1 <= 256 and y1 - y0 >= c.min_font_px
        cap = st.caption_json(r)
        st.text_validator().validate(cap)  # the captioning text schema, as a captioner must answer
        assert [b["role"] for b in cap["blocks"]][0] == ("body" if tmpl == "paragraph" else "title")
        assert {"slide": "slide", "poster": "poster"}.get(tmpl, cap["layout"]) == cap["layout"]
        if tmpl == "line":
            assert len(lines) == 1, lines
        if tmpl == "slide":
            assert all(b.lines[0].startswith("• ") for b in r.blocks[1:]) and len(r.blocks) >= 3
    # (seed, index) fixes the pixels; another seed gives another render
    a, b = st.render_one(cfg, 3, 11, photos), st.render_one(cfg, 3, 11, photos)
    assert a.image.tobytes() == b.image.tobytes() and a.blocks == b.blocks
    assert st.render_one(cfg, 4, 11, photos).image.tobytes() != a.image.tobytes()


def test_photo_backgrounds_from_a_curated_table_and_a_corrupt_one_is_a_row_with_a_reason(tmp_path):
    """Backgrounds are the kept rows of a table written with the curated schema module; an
    undecodable stored image becomes that render's error, not a failed batch."""
    photos = dict(samples.real_photos())
    rows = {"astro": samples.jpeg(photos["astronaut"]), "coffee": samples.jpeg(photos["coffee"]),
            "broken": b"\xff\xd8 not a jpeg", "dropped": samples.jpeg(photos["chelsea"])}
    n = len(rows)
    cols = {f.name: pa.nulls(n, f.type) for f in curated.SCHEMA}
    cols.update(id=pa.array(list(rows)), image=pa.array(list(rows.values()), pa.large_binary()),
                keep=pa.array([True, True, True, False]), rotate=pa.array([0, 0, 0, 0], pa.int16()))
    uri = str(tmp_path / "stage1.lance")
    lance.write_dataset(pa.Table.from_pydict(cols, schema=curated.SCHEMA), uri)
    pool = st.PhotoPool.from_table(uri, 100)
    assert sorted(pool.ids) == ["astro", "broken", "coffee"]  # kept rows only
    cfg = st.load_config(overrides={**SMALL, "backgrounds": {"photo": 1.0}, "ocr": {"engine": "none"}})
    t = st.render_rows(list(range(10)), cfg, 1, pool, "h")
    refs, errors = t["background_ref"].to_pylist(), t["error"].to_pylist()
    assert t.num_rows == 10 and t.schema == RENDER_SCHEMA
    for ref, err in zip(refs, errors, strict=True):
        assert (err is not None) == (ref is None), (ref, err)  # a failed render names no background
    assert {r.split("#")[1] for r in refs if r} == {"astro", "coffee"} and any(errors)
    assert all(e.startswith("render: ValueError") for e in errors if e)
    decided = st.decide(t, cfg)
    assert decided["reject_reason"].to_pylist() == ["render_error" if e else None for e in errors]
    with pytest.raises(ConfigError, match="--backgrounds: .* no kept rows"):
        lance.write_dataset(pa.Table.from_pydict({**cols, "keep": pa.array([False] * n)}, schema=curated.SCHEMA),
                            str(tmp_path / "none.lance"))
        st.PhotoPool.from_table(str(tmp_path / "none.lance"), 100)


def test_job_renders_reads_back_decides_resumes_and_is_deterministic(ray_local, tmp_path):
    cfg = st.load_config(overrides=SMALL)
    out = tmp_path / "synth.lance"
    s = st.run_synthesis(str(out), 6, cfg, seed=5, commit_every=3, progress=False)
    assert s.rows == 6 and s.rendered_now == 6 and sum(s.reasons.values()) == 6
    ds = lance.dataset(str(out))
    assert ds.schema.names == SCHEMA.names and ds.schema.metadata[b"source"] == SOURCE.encode()
    t = _table(out)
    assert t["index"].to_pylist() != [] and sorted(t["index"].to_pylist()) == list(range(6))
    assert set(t["source"].to_pylist()) == {SOURCE} and len(t["id"].unique()) == 6
    for row in t.to_pylist():
        im = Image.open(io.BytesIO(row["image_bytes"]))
        assert im.format == "PNG" and im.size == (384, 256)
        cap = json.loads(row["caption_text"])
        st.text_validator().validate(cap)
        assert row["text"] == "\n".join(b["text"] for b in row["boxes"])
        assert row["ocr_engine"] == "rapidocr" and row["ocr_score"] == pytest.approx(
            char_agreement(row["text"], row["ocr_text"]), abs=1e-6)
        assert row["keep"] == (row["ocr_score"] >= cfg.thresholds.min_ocr_score)
        assert row["reject_reason"] == (None if row["keep"] else "ocr_readback")
    assert np.mean(t["ocr_score"].to_numpy()) > 0.85  # clean renders read back
    report = Path(s.report).read_text()
    assert "ocr_score" in report and report.count("data:image/jpeg;base64") == 6

    again = st.run_synthesis(str(out), 6, cfg, seed=5, progress=False, report=False)
    assert again.rendered_now == 0 and again.rows == 6
    other = tmp_path / "again.lance"
    st.run_synthesis(str(other), 6, cfg, seed=5, commit_every=100, progress=False, report=False)
    a, b = _table(out), _table(other)
    assert a.drop(["decided_config_hash"]).equals(b.drop(["decided_config_hash"]))  # same seed -> same table

    strict = st.load_config(overrides={**SMALL, "thresholds": {"min_ocr_score": 1.0}})
    r = st.rethreshold(str(out), strict, report=False)
    t2 = _table(out)
    assert t2["image_bytes"].equals(t["image_bytes"]) and t2["ocr_score"].equals(t["ocr_score"])
    assert r.reasons.get("kept", 0) == sum(v == 1.0 for v in t["ocr_score"].to_pylist())

    with pytest.raises(ConfigError, match="--seed: .* seed 5"):
        st.run_synthesis(str(out), 6, cfg, seed=6, progress=False, report=False)
    with pytest.raises(ConfigError, match="--config: .* another render config"):
        st.run_synthesis(str(out), 6, st.load_config(overrides={**SMALL, "min_font_px": 18}), seed=5,
                         progress=False, report=False)


def test_killed_job_rerun_loses_and_duplicates_nothing(ray_local, tmp_path):
    """kill -9 the job's driver after its second commit (the job runs on the session's Ray, as a
    job submitted to a cluster does); the same settings again end with every index exactly once
    and the rows of an uninterrupted run."""
    out = tmp_path / "killed.lance"
    sets = {"batch_size": 1, "sizes": {"256x256": 1.0}, "ocr": {"engine": "none"}}
    cmd = JOB + ["--output", str(out), "--n", "12", "--seed", "2", "--commit-every", "1", "--no-progress",
                 "--no-report"] + [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    address = ray_local.get_runtime_context().gcs_address
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", RAY_ADDRESS=address), cwd=ROOT)
    deadline, seen = time.time() + 240, []
    for line in p.stdout:
        seen.append(line)
        if "committed 2 rows" in line or time.time() > deadline:
            break
    os.killpg(p.pid, signal.SIGKILL)  # the driver; Ray ends the dead job's tasks
    p.wait()
    partial = lance.dataset(str(out)).count_rows() if out.exists() else 0
    assert 0 < partial < 12, "".join(seen)[-3000:]
    # The rerun, in this process (the session's Ray): the same config the command line built.
    cfg = st.load_config(ROOT / "configs" / "synthetic_text.yaml", sets)
    s = st.run_synthesis(str(out), 12, cfg, seed=2, progress=False, report=False)
    assert s.rendered_now == 12 - partial and s.rows == 12
    ref = tmp_path / "reference.lance"
    st.run_synthesis(str(ref), 12, cfg, seed=2, progress=False, report=False)
    assert _table(out).equals(_table(ref))
    assert all(_table(out)["keep"].to_pylist())  # no read-back: nothing is rejected for it


def test_bad_config_and_arguments_stop_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"fonts\.x\.regular: no such font file"):
        st.load_config(overrides={"fonts": {"x": {"regular": "/nope.ttf", "bold": "/nope.ttf"}}})
    with pytest.raises(ConfigError, match=r"templates\.flyer: unknown template"):
        st.load_config(overrides={"templates": {"flyer": 1.0}})
    with pytest.raises(ConfigError, match=r"thresholds\.min_ocr_scor: unknown field"):
        st.load_config(overrides={"thresholds": {"min_ocr_scor": 0.5}})
    with pytest.raises(ConfigError, match=r"sizes\.big: expected WIDTHxHEIGHT"):
        st.load_config(overrides={"sizes": {"big": 1.0}})
    with pytest.raises(ConfigError, match=r"ocr\.engine"):
        st.load_config(overrides={"ocr": {"engine": "easyocr"}})
    other = tmp_path / "other.lance"
    lance.write_dataset(pa.table({"id": ["x"]}), str(other))
    r = subprocess.run(JOB + ["--output", str(other), "--n", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "another kind of table" in r.stderr, r.stderr[-1500:]
    r = subprocess.run(JOB + ["--output", str(tmp_path / "x.lance")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--n is required" in r.stderr
    assert not (tmp_path / "x.lance").exists()
