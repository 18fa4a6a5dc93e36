"""The curated-table schema: one Lance row per input item, for every curation stage.

This is the contract that captioning, the flywheel and the trainer read. A row is written once per
input during scoring (``keep``/``reject_reason``/``dup_of`` null), then the decision pass fills the
decision columns from the stored scores. Scores are kept apart from decisions so thresholds can be
changed (``--rethreshold``) without decoding or running models again.

Downstream jobs select ``keep == true`` and read ``image`` with :mod:`curation.table`: by default
the source file's own bytes (``scoring.store_image: source``; decode them with
``curation.decode.decode`` to get the same upright RGB the scorers saw), or the working-size upright
RGB JPEG (``normalized``). The table's schema metadata ``store_image`` says which.
"""

from __future__ import annotations

import pyarrow as pa

# Image bytes live in a Lance blob column so scans of the score columns never touch them.
BLOB_META = {b"lance-encoding:blob": b"true"}

# name -> (arrow type, doc). Score columns are all nullable: null means "not computed" (filter
# skipped, item broken, or no caption for a caption filter), never "passed".
SCORE_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "short_side": (pa.int32(), "min(width, height) after EXIF orientation"),
    "aspect_ratio": (pa.float32(), "max(w, h) / min(w, h)"),
    "phash": (pa.uint64(), "64-bit imagehash pHash of the decoded image"),
    "nsfw_score": (pa.float32(), "max probability over NudeNet's exposed-content classes"),
    "rotation_score": (pa.float32(), "probability the pixels are visually rotated (detector)"),
    "rotation_pred": (pa.int16(), "counter-clockwise turn (0/90/180/270) that makes it upright"),
    "entropy": (pa.float32(), "Shannon entropy (bits) of the grey histogram"),
    "noise": (pa.float32(), "high-frequency energy, max over R,G,B channels (0..1)"),
    "clip_score": (pa.float32(), "cosine similarity of open_clip image and caption embeddings"),
    "token_count": (pa.int32(), "caption length in tokens of the configured tokenizer"),
    "brisque": (pa.float32(), "BRISQUE no-reference quality at a fixed analysis size (lower is better)"),
    "aesthetic": (pa.float32(), "LAION improved aesthetic predictor on clip_embedding (about 1..10)"),
    "jpeg_quality": (pa.float32(), "JPEG quality factor from the quantisation tables (null: not a JPEG)"),
    "blockiness": (pa.float32(), "8x8 block-grid edge excess of the decoded pixels (0 = none)"),
    "category": (pa.string(), "category of the row (CLIP zero-shot over the taxonomy, or an input column)"),
    "category_score": (pa.float32(), "zero-shot probability of the chosen category (null from a column)"),
}
# The image embedding of the CLIP pass that gives clip_score, L2-normalised, stored once so that
# aesthetic, tagging, semantic dedup and the flywheel's retrieval read it. Fixed-size list of the
# model's embedding width D (see scoring_schema); null where CLIP did not run.
EMBEDDING = "clip_embedding"
DEFAULT_EMBED_DIM = 768  # OpenAI ViT-L/14; a table's own width is in its schema


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)

DECISION_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "keep": (pa.bool_(), "the decision of the stage; null until the decision pass ran"),
    "reject_reason": (pa.string(), "first failing filter in chain order, null when kept"),
    "dup_of": (pa.string(), "id of the cluster survivor for exact/near duplicates"),
    "rotate": (pa.int16(), "counter-clockwise turn readers apply (rotation action correct), else 0"),
    "decided_config_hash": (pa.string(), "hash of the thresholds that made the decision"),
    "semdup_of": (pa.string(), "id of the semantic-dedup survivor this row is a near copy of"),
    "semdup_similarity": (pa.float32(), "cosine similarity to that survivor's embedding"),
}

BASE_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "stable id: sha1(source + key)[:20]"),
    "uri": (pa.string(), "where the item came from (path, tar#member, table#row)"),
    "source": (pa.string(), "source tag for mixture quotas (config 'source': web, synthetic:text, edit:<name>, ...)"),
    "caption": (pa.string(), "the item's original text (alt text / .txt / caption column)"),
    "content_hash": (pa.string(), "sha256 of the raw file bytes (exact dedup)"),
    "width": (pa.int32(), "width after EXIF orientation"),
    "height": (pa.int32(), "height after EXIF orientation"),
    "format": (pa.string(), "format detected from the content (JPEG, PNG, ...)"),
    "exif_orientation": (pa.int8(), "EXIF orientation tag (1..8) that was applied"),
    "error": (pa.string(), "why the item is broken; null for a decodable image"),
    "stage": (pa.string(), "the curation stage name, e.g. stage1"),
    "score_config_hash": (pa.string(), "hash of the scorer settings (models, skips)"),
    "skipped": (pa.list_(pa.string()), "filters skipped with --skip for this row"),
    "scored_at": (pa.timestamp("us", tz="UTC"), "when the row was scored"),
}

IMAGE_FIELD = pa.field("image", pa.large_binary(), nullable=True, metadata=BLOB_META)


def _fields(spec: dict[str, tuple[pa.DataType, str]]) -> list[pa.Field]:
    return [pa.field(n, t, nullable=(n != "id"), metadata={b"doc": d.encode()}) for n, (t, d) in spec.items()]


def scoring_schema(embed_dim: int = DEFAULT_EMBED_DIM) -> pa.Schema:
    """What scoring workers write (decision columns do not exist yet): every stage writes the same
    columns (a score no filter of the stage computes is null), with ``clip_embedding`` as wide as
    the stage's CLIP."""
    emb = pa.field(EMBEDDING, embedding_type(embed_dim), metadata={b"doc": b"L2-normalised CLIP image embedding"})
    return pa.schema(_fields(BASE_FIELDS) + _fields(SCORE_FIELDS) + [emb, IMAGE_FIELD])


def embed_dim(schema: pa.Schema) -> int | None:
    """The ``clip_embedding`` width of a curated table's schema (None without the column)."""
    if EMBEDDING not in schema.names:
        return None
    return schema.field(EMBEDDING).type.list_size


# The full table after the decision pass added the decision columns with Lance's add-column path
# (no rewrite of the image data).
SCORING_SCHEMA = scoring_schema()
DECISION_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False)] + _fields(DECISION_FIELDS))
SCHEMA = pa.schema(list(SCORING_SCHEMA) + list(DECISION_SCHEMA)[1:])
COLUMNS_WITHOUT_IMAGE = [f.name for f in SCHEMA if f.name != "image"]
SCORE_COLUMNS = list(SCORE_FIELDS)
