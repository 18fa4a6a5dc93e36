"""Session fixtures for the training tests: tiny random models saved locally, a tiny curated Lance
table (curation/schema.py) with a captions table and edit pairs, and the latent cache
jobs/encode_latents.py builds from them (with SeFi semantic channels, so every test can use it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lance
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Ray Train's controller polls its worker group every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, passed
# on from the driver): every fit() here waited up to that long to see a failure and the end of each
# attempt. The same poll, every 0.2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    from captioning.testing import build_tiny_qwen2vl

    # The condition encoder is a VLM with its processor: edit instructions are encoded with the source
    # image (training/conditioning.py). Hidden size 64.
    return {"vae": str(tiny.make_tiny_vae(root / "vae")), "text": str(build_tiny_qwen2vl(root / "qwen")),
            "semantic": str(tiny.make_tiny_dinov2(root / "dino"))}


@pytest.fixture(scope="session")
def source_tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    curated, captions, pairs = str(root / "curated.lance"), str(root / "captions.lance"), str(root / "pairs.lance")
    ids = tiny.make_curated_table(curated)
    caption_rows = tiny.make_captions_table(captions, curated, ids)  # id -> caption types / failed / missing
    # Edit pairs: target id, source id, instruction (the TI2I data).
    lance.write_dataset(pa.table({"id": ids[1:7], "source_id": ids[0:6],
                                  "instruction": [f"make the {w} house big" for w in tiny.WORDS[1:7]],
                                  "lang": ["en"] * 6}), pairs)
    return {"curated": curated, "captions": captions, "pairs": pairs, "ids": ids, "caption_rows": caption_rows}


@pytest.fixture(scope="session")
def encode_settings(tiny_models, source_tables, tmp_path_factory):
    from training.encode import EncodeSettings

    return EncodeSettings(curated=source_tables["curated"], captions=source_tables["captions"],
                          edit_pairs=source_tables["pairs"], out=str(tmp_path_factory.mktemp("cache")),
                          vae=tiny_models["vae"], text_encoder=tiny_models["text"],
                          semantic_encoder=tiny_models["semantic"], semantic_channels=2,
                          resolution=64, bucket_multiple=16, max_text_len=64, batch_size=8)


@pytest.fixture(scope="session")
def cache(ray_local, encode_settings):
    from training.encode import run_encode

    summary = run_encode(encode_settings, progress=False)
    return {"dir": encode_settings.out, "summary": summary}
