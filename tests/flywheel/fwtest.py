"""Helpers shared by the flywheel tests (a module with its own name: conftest modules of several
test folders share the name `conftest`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[2]
PLENTIFUL, SCARCE = 24, 2  # kept bus / zebra images
PLENTIFUL_WORDS = ["red", "double", "decker", "city", "street", "night", "rain", "parked", "crowded", "old"]


def caption_json(caption: str, concept: str) -> dict[str, str]:
    """caption_* columns as captioning writes them (validated JSON text)."""
    general = {"en": {"short": caption, "medium": caption + " in daylight, seen from the side of the road.",
                      "dense": caption * 3}, "zh": {"short": "照片", "medium": "一张照片" * 5, "dense": "一张照片" * 15}}
    knowledge = {"entities": [{"name": concept, "type": "species" if concept == "zebra" else "object",
                               "confidence": "high"}], "en": concept, "zh": concept}
    return {"caption_general": json.dumps(general), "caption_knowledge": json.dumps(knowledge)}


def concept_captions() -> list[tuple[str, str, str]]:
    """(file stem, caption, concept) for the pool: many buses, two zebras."""
    out = []
    for i in range(PLENTIFUL):
        w = PLENTIFUL_WORDS[i % len(PLENTIFUL_WORDS)], PLENTIFUL_WORDS[(i * 3 + 1) % len(PLENTIFUL_WORDS)]
        out.append((f"bus_{i:02d}", f"a {w[0]} bus on a {w[1]} road, photo {i}", "bus"))
    for i in range(SCARCE):
        out.append((f"zebra_{i}", f"a zebra grazing in the savanna, photo {i}", "zebra"))
    return out


def curated_schema(dim: int) -> pa.Schema:
    """The curated table's schema from curation's schema module (with clip_embedding of width dim)."""
    from curation import schema as cs

    if hasattr(cs, "scoring_schema"):
        return pa.schema(list(cs.scoring_schema(dim)) + list(cs.DECISION_SCHEMA)[1:])
    return cs.SCHEMA


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


def fresh_workdir(built, tmp_path) -> str:
    """A private copy of the built flywheel database for one test."""
    import shutil

    dst = tmp_path / "flywheel.lancedb"
    shutil.copytree(built["workdir"], dst)
    return str(dst)


def captioning_test_servers():
    """tests/captioning/conftest.py (the project's scripted OpenAI-compatible test server), loaded
    under its own module name."""
    path = ROOT / "tests" / "captioning" / "conftest.py"
    spec = importlib.util.spec_from_file_location("captioning_test_servers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
