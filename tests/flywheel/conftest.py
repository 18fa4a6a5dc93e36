"""Flywheel fixtures: a curated pool made by the real stage-1 job (one plentiful concept, one scarce),
its captions table written with captioning's schema module, the tiny random CLIP of the stage, and a
flywheel config pointing at them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lance
import pyarrow as pa
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))
sys.path.insert(0, str(ROOT / "tests" / "captioning"))

PLENTIFUL, SCARCE = 24, 2  # kept bus / zebra images
PLENTIFUL_WORDS = ["red", "double", "decker", "city", "street", "night", "rain", "parked", "crowded", "old"]


def concept_captions() -> list[tuple[str, str, str]]:
    """(file stem, caption, concept) for the pool: many buses, two zebras."""
    out = []
    for i in range(PLENTIFUL):
        w = PLENTIFUL_WORDS[i % len(PLENTIFUL_WORDS)], PLENTIFUL_WORDS[(i * 3 + 1) % len(PLENTIFUL_WORDS)]
        out.append((f"bus_{i:02d}", f"a {w[0]} bus on a {w[1]} road, photo {i}", "bus"))
    for i in range(SCARCE):
        out.append((f"zebra_{i}", f"a zebra grazing in the savanna, photo {i}", "zebra"))
    return out


def caption_json(caption: str, concept: str) -> dict[str, str]:
    """caption_* columns as captioning writes them (validated JSON text)."""
    general = {"en": {"short": caption, "medium": caption + " in daylight, seen from the side of the road.",
                      "dense": caption * 3}, "zh": {"short": "照片", "medium": "一张照片" * 5, "dense": "一张照片" * 15}}
    knowledge = {"entities": [{"name": concept, "type": "species" if concept == "zebra" else "object",
                               "confidence": "high"}], "en": concept, "zh": concept}
    return {"caption_general": json.dumps(general), "caption_knowledge": json.dumps(knowledge)}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from curation.samples import make_tiny_clip, write_sample_config

    d = tmp_path_factory.mktemp("models")
    stage_cfg = write_sample_config(d / "stage1.yaml", d)
    name, cfg_json, weights = make_tiny_clip(d / "clip")
    return {"stage_config": stage_cfg, "clip": {"model": name, "model_config": cfg_json, "weights": weights}}


def curated_schema(dim: int) -> pa.Schema:
    """The curated table's schema from curation's schema module (with clip_embedding of width dim)."""
    from curation import schema as cs

    if hasattr(cs, "scoring_schema"):
        return pa.schema(list(cs.scoring_schema(dim)) + list(cs.DECISION_SCHEMA)[1:])
    return cs.SCHEMA


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


def fresh_workdir(built, tmp_path) -> str:
    """A private copy of the built flywheel database for one test."""
    import shutil

    dst = tmp_path / "flywheel.lancedb"
    shutil.copytree(built["workdir"], dst)
    return str(dst)


def flywheel_config(tmp_path, pool, tiny_models, **sections) -> Path:
    """A flywheel YAML for the test pool; `sections` override/add top-level keys."""
    cfg = {
        "workdir": str(tmp_path / "flywheel.lancedb"),
        "pools": {"main": {"curated": pool["curated"], "captions": pool["captions"]}},
        "index": {"clip": {**tiny_models["clip"], "batch_size": 16}, "batch_size": 64},
        # random tiny CLIP: its cosines carry no meaning, so only full-text matches count as hits
        "attribution": {"min_similarity": 1.01, "similar_case_similarity": 1.01, "search_k": 40},
        "review": {"token": "test-token"},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "flywheel.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
