"""The retrieval engine on what the producers really write: `jobs/filter_stage1.py` runs on a few
images (its CLIP writes `clip_embedding`), the captions table is written with captioning/schema.py,
then the index is built from both and attribution's density / image search are checked."""

from __future__ import annotations

import runpy
import sys

import lance
import numpy as np
import pyarrow as pa
import pytest
from fwtest import ROOT, caption_json, flywheel_config

from flywheel.attribution import density
from flywheel.config import load_config
from flywheel.index import PoolIndex, TextEmbedder, build_index
from flywheel.store import connect

CONCEPTS = {"bus": [f"a red bus on a city street, photo {i}" for i in range(4)],
            "zebra": [f"a zebra grazing in the savanna, photo {i}" for i in range(2)]}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_models, ray_local):
    """Sample images with sidecar captions (one too small: rejected by resolution) -> the stage-1 job."""
    from captioning.testing import jpeg, synthetic_image

    d = tmp_path_factory.mktemp("real_pool")
    src = d / "images"
    src.mkdir()
    items = [(f"{c}_{i}", cap, (320, 288)) for c, caps in CONCEPTS.items() for i, cap in enumerate(caps)]
    items.append(("zebra_tiny", "a zebra grazing in the savanna, tiny", (96, 80)))
    for k, (stem, cap, size) in enumerate(items):
        (src / f"{stem}.jpg").write_bytes(jpeg(synthetic_image(300 + k, size)))
        (src / f"{stem}.txt").write_text(cap)
    out = d / "stage1.lance"
    argv = ["filter_stage1.py", "--input", str(src), "--output", str(out), "--config", tiny_models["stage_config"],
            "--skip", "nsfw", "--no-progress", "--no-report"]
    old, sys.argv = sys.argv, argv
    try:  # the job's own entry point, in-process so that it reuses the session's Ray
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(ROOT / "jobs" / "filter_stage1.py"), run_name="__main__")
    finally:
        sys.argv = old
    assert done.value.code == 0
    return d, str(out)


def test_index_from_the_stage1_job_and_captions_schema(stage1, tiny_models):
    from captioning.schema import SCHEMA as CAPTIONS_SCHEMA

    d, curated = stage1
    t = lance.dataset(curated).to_table(columns=["id", "uri", "keep", "reject_reason", "caption", "clip_embedding"])
    rows = t.to_pylist()
    kept = [r for r in rows if r["keep"]]
    assert len(rows) == 7 and len(kept) == 6, [(r["uri"], r["reject_reason"]) for r in rows]
    concept = {r["id"]: "zebra" if "zebra" in r["caption"] else "bus" for r in rows}
    caps = [{"id": r["id"], "caption_status": "ok", "model": "test", "prompt_version": "v2", "source_version": 1,
             **caption_json(r["caption"], concept[r["id"]])} for r in kept]
    captions = str(d / "captions.lance")
    lance.write_dataset(pa.Table.from_pylist(caps, schema=CAPTIONS_SCHEMA), captions, mode="overwrite")
    pool = {"curated": curated, "captions": captions}
    cfg = load_config(flywheel_config(d, pool, tiny_models))
    db = connect(cfg.workdir)
    s = build_index(cfg, db)
    assert (s.pool_rows, s.embedded, s.vector_index) == (6, 6, "exact"), s.text()

    idx = PoolIndex(db, cfg.index)
    assert idx.category_counts() == {"bus": 4, "object": 4, "zebra": 2, "species": 2}
    emb = TextEmbedder(cfg.index.clip)
    want = {c: sorted(r["id"] for r in kept if concept[r["id"]] == c) for c in CONCEPTS}
    for c, prompt in (("zebra", "a zebra in the savanna"), ("bus", "a bus on a street")):
        dens = density(idx, prompt, emb.embed([prompt])[0], cfg)
        assert sorted(dens.hits.filter(dens.hits["fts_match"])["id"].to_pylist()) == want[c]
        assert dens.count == len(want[c])
    # the stage's stored image embedding is what the index searches: each kept image finds itself
    for r in kept:
        hit = idx.images(np.asarray(r["clip_embedding"], np.float32), 1)
        assert hit["id"].to_pylist() == [r["id"]] and hit["similarity"][0].as_py() > 0.999
