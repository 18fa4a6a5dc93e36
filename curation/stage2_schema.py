"""The stage-2 edit-pair table schema: one Lance row per input pair (Qwen-Image-2.0 §2.3, TI2I).

Imported by every reader and writer of the table (``curation.stage2`` writes it,
``curation.mixture`` and the encode job read it). Scores are per image where a filter looks at each
image alone (``source_*`` / ``target_*``) and per pair otherwise; decisions are the engine's
(``curation.schema.DECISION_FIELDS``: ``dup_of`` is the surviving pair of a duplicate group).
``image`` holds the source image's bytes (the column name every curation reader and the report
use), ``target_image`` the edited image's.
"""

from __future__ import annotations

import pyarrow as pa

from .schema import BLOB_META, DECISION_FIELDS, _fields

BASE_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "stable id of the pair: sha1(input file + key)[:20]"),
    "uri": (pa.string(), "where the pair came from (file#key, shard#key)"),
    "source": (pa.string(), "source tag of the row for mixture quotas: edit:<name>, web, synthetic:text, ..."),
    "instruction_en": (pa.string(), "English edit instruction"),
    "instruction_zh": (pa.string(), "Chinese edit instruction"),
    "source_caption": (pa.string(), "caption of the source image (optional)"),
    "target_caption": (pa.string(), "caption of the edited image (optional)"),
    "category": (pa.string(), "edit category given by the input (optional)"),
    "error": (pa.string(), "why the pair is broken, naming the image ('source: ...' / 'target: ...')"),
    "source_content_hash": (pa.string(), "sha256 of the source file bytes"),
    "target_content_hash": (pa.string(), "sha256 of the target file bytes"),
    "source_width": (pa.int32(), "source width after EXIF orientation"),
    "source_height": (pa.int32(), "source height after EXIF orientation"),
    "target_width": (pa.int32(), "target width after EXIF orientation"),
    "target_height": (pa.int32(), "target height after EXIF orientation"),
    "stage": (pa.string(), "the curation stage name (stage2)"),
    "score_config_hash": (pa.string(), "hash of the scorer settings (models, skips)"),
    "skipped": (pa.list_(pa.string()), "filters skipped with --skip for this row"),
    "scored_at": (pa.timestamp("us", tz="UTC"), "when the row was scored"),
}

SCORE_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "source_short_side": (pa.int32(), "min(width, height) of the source"),
    "target_short_side": (pa.int32(), "min(width, height) of the target"),
    "source_aspect_ratio": (pa.float32(), "max/min side of the source"),
    "target_aspect_ratio": (pa.float32(), "max/min side of the target"),
    "source_nsfw_score": (pa.float32(), "NudeNet exposed-content score of the source"),
    "target_nsfw_score": (pa.float32(), "NudeNet exposed-content score of the target"),
    "instruction_language": (pa.string(), "en / zh / mixed / other; null = no letters (curation.pairs)"),
    "instruction_tokens": (pa.int32(), "longest of the en/zh instructions in the condition encoder's tokens"),
    "phash_distance": (pa.int16(), "Hamming distance of the two 64-bit pHashes (0..64)"),
    "ssim": (pa.float32(), "grey SSIM of the two images at the working size"),
    "changed_fraction": (pa.float32(), "share of 16x16 cells whose colour changed by > 16 levels"),
    "clip_cosine": (pa.float32(), "cosine of the two images' CLIP embeddings"),
    "directional_similarity": (pa.float32(), "InstructPix2Pix directional CLIP similarity (needs both captions)"),
    "judge_instruction": (pa.float32(), "VLM judge: instruction following, 0..10"),
    "judge_consistency": (pa.float32(), "VLM judge: consistency of the unedited part, 0..10"),
    "judge_error": (pa.string(), "why the judge gave no score (recorded, never fatal)"),
    "pair_key": (pa.string(), "duplicate key: source content hash + normalised instruction"),
}

IMAGE_FIELD = pa.field("image", pa.large_binary(), nullable=True, metadata=BLOB_META)
TARGET_FIELD = pa.field("target_image", pa.large_binary(), nullable=True, metadata=BLOB_META)

PAIR_SCORING_SCHEMA = pa.schema(_fields(BASE_FIELDS) + _fields(SCORE_FIELDS) + [IMAGE_FIELD, TARGET_FIELD])
PAIR_SCHEMA = pa.schema(list(PAIR_SCORING_SCHEMA) + _fields(DECISION_FIELDS))
COLUMNS_WITHOUT_IMAGES = [f.name for f in PAIR_SCHEMA if f.name not in ("image", "target_image")]
