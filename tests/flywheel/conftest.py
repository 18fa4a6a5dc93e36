"""Flywheel fixtures: a curated pool (one plentiful concept, one scarce) written with curation's and
captioning's schema modules, the stage's tiny random CLIP, and the pool index built once."""

from __future__ import annotations

import sys

import lance
import pyarrow as pa
import pytest
from fwtest import ROOT, caption_json, concept_captions, curated_schema, flywheel_config

sys.path.insert(0, str(ROOT / "jobs"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from curation.samples import make_tiny_clip, write_sample_config

    d = tmp_path_factory.mktemp("models")
    stage_cfg = write_sample_config(d / "stage1.yaml", d)
    name, cfg_json, weights = make_tiny_clip(d / "clip")
    return {"stage_config": stage_cfg, "clip": {"model": name, "model_config": cfg_json, "weights": weights}}


# (stem, keep, reject_reason, dup_of stem) beyond the kept concept images
EXTRA_ROWS = [("zebra_balance", False, "balance", None), ("zebra_blank", False, "entropy", None),
              ("bus_00_copy", False, "dedup", "bus_00")]


@pytest.fixture(scope="session")
def pool(tmp_path_factory, tiny_models):
    """A curated table written with curation/schema.py (image blobs, CLIP image embeddings from the
    stage's own ClipScorer) and its captions table written with captioning/schema.py."""
    from captioning.schema import SCHEMA as CAPTIONS_SCHEMA
    from captioning.testing import jpeg, synthetic_image
    from curation.config import ClipModel
    from curation.scorers import ClipScorer

    d = tmp_path_factory.mktemp("pool")
    items = [(stem, cap, c, True, None, None) for stem, cap, c in concept_captions()]
    items += [(stem, f"a zebra grazing in the savanna, {stem}", "zebra", k, r, dup) if stem.startswith("zebra")
              else (stem, "a red bus on a city road, photo 0", "bus", k, r, dup) for stem, k, r, dup in EXTRA_ROWS]
    images = [synthetic_image(100 + i, (96, 80)) for i in range(len(items))]
    clip = ClipScorer(ClipModel(**tiny_models["clip"]))
    clip.setup()
    emb = clip.embed_images(images).astype("float16")
    schema = curated_schema(emb.shape[1])
    n = len(items)
    ids = {stem: f"{stem}-id" for stem, *_ in items}
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols.update(id=pa.array([ids[it[0]] for it in items]), uri=pa.array([f"/data/{it[0]}.jpg" for it in items]),
                caption=pa.array([it[1] for it in items]), stage=pa.array(["stage1"] * n),
                width=pa.array([96] * n, pa.int32()), height=pa.array([80] * n, pa.int32()),
                clip_score=pa.array([0.3 + 0.01 * i for i in range(n)], pa.float32()),
                keep=pa.array([it[3] for it in items]), reject_reason=pa.array([it[4] for it in items]),
                dup_of=pa.array([ids[it[5]] if it[5] else None for it in items]),
                image=pa.array([jpeg(im) for im in images], pa.large_binary()))
    if "clip_embedding" in schema.names:
        cols["clip_embedding"] = pa.array(list(emb), schema.field("clip_embedding").type)
    if "category" in schema.names:
        cols["category"] = pa.array([it[2] for it in items])
    curated = str(d / "stage1.lance")
    lance.write_dataset(pa.table(cols, schema=schema), curated)
    caps = [{"id": ids[stem], "caption_status": "ok", "model": "test", "prompt_version": "v1", "source_version": 1,
             **caption_json(cap, c)} for stem, cap, c, keep, *_ in items if keep]
    captions = str(d / "captions.lance")
    lance.write_dataset(pa.Table.from_pylist(caps, schema=CAPTIONS_SCHEMA), captions)
    by = {c: sorted(ids[it[0]] for it in items if it[2] == c and it[3]) for c in ("bus", "zebra")}
    return {"curated": curated, "captions": captions, "ids": by, "balance_id": ids["zebra_balance"],
            "dedup": (ids["bus_00_copy"], ids["bus_00"]), "embed_dim": emb.shape[1]}


@pytest.fixture(scope="session")
def built(tmp_path_factory, pool, tiny_models, ray_local):
    """The pool index built once (real Ray Data + LanceDB); tests copy it with `fresh_workdir`."""
    from flywheel.config import load_config
    from flywheel.index import build_index
    from flywheel.store import connect

    d = tmp_path_factory.mktemp("built")
    cfg = load_config(flywheel_config(d, pool, tiny_models))
    summary = build_index(cfg, connect(cfg.workdir))
    return {"workdir": cfg.workdir, "summary": summary}


