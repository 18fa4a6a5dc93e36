"""The synthetic-text table schema (stage 3, Qwen-Image-2.0 §2.3): one Lance row per render.

Every reader and writer of a ``jobs/synthesize_text.py`` table imports this module. Rows are written
once by the render workers (decision columns absent), then the decision pass adds ``keep`` /
``reject_reason`` / ``decided_config_hash`` from the stored ``ocr_score`` — so ``--rethreshold``
re-decides without rendering or OCR. ``image`` is a Lance blob column like the curated tables'
(:data:`curation.schema.IMAGE_FIELD`), so :func:`curation.table.read_images` reads it.
"""

from __future__ import annotations

import pyarrow as pa

from .schema import IMAGE_FIELD

SOURCE = "synthetic:text"
TEMPLATES = ("line", "paragraph", "poster", "slide")
LANGUAGES = ("en", "zh", "mixed")
BACKGROUNDS = ("plain", "gradient", "photo")
REJECT_RENDER, REJECT_OCR = "render_error", "ocr_readback"

# One rendered text line: its exact text, the block role it belongs to, and its pixel box.
BOX_TYPE = pa.struct([("text", pa.string()), ("role", pa.string()), ("x0", pa.float32()), ("y0", pa.float32()),
                      ("x1", pa.float32()), ("y1", pa.float32())])

FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "stable id: sha1('synthetic:text:seed=<seed>' + index)[:20]"),
    "index": (pa.int64(), "render index within the seed's sequence (0..n-1)"),
    "seed": (pa.int64(), "generator seed; (seed, index) fixes every choice of the render"),
    "source": (pa.string(), "always 'synthetic:text' (the mixture's source tag)"),
    "template": (pa.string(), "line | paragraph | poster | slide"),
    "language": (pa.string(), "en | zh | mixed (English and Chinese in one render)"),
    "text_kind": (pa.string(), "words | sentence | paragraph | structured (poster/slide blocks)"),
    "background": (pa.string(), "plain | gradient | photo"),
    "background_ref": (pa.string(), "the photo used: 'samples:<name>' or '<table uri>#<id>'; null otherwise"),
    "font": (pa.string(), "font name of the body text (config key of fonts)"),
    "width": (pa.int32(), "image width in pixels"),
    "height": (pa.int32(), "image height in pixels"),
    "text": (pa.string(), "the exact rendered text: lines in reading order joined with '\\n'"),
    "boxes": (pa.list_(BOX_TYPE), "one entry per rendered line: text, block role, pixel box"),
    "caption": (pa.string(), "plain-language ground-truth caption (English) for T2I training"),
    "caption_text": (pa.string(), "ground-truth text caption as JSON in the captioning text schema "
                                  "(captioning/schemas/v1/text.json), validated on write"),
    "ocr_engine": (pa.string(), "OCR engine that read the render back; null when read-back was off"),
    "ocr_text": (pa.string(), "what the OCR engine read (lines joined with '\\n')"),
    "ocr_score": (pa.float32(), "common.ocr.char_agreement(text, ocr_text) in [0, 1]; null: not read"),
    "error": (pa.string(), "why the render or its read-back failed; null when fine"),
    "render_config_hash": (pa.string(), "hash of the render + OCR settings (a rerun must match it)"),
}

DECISION_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "keep": (pa.bool_(), "the decision; null until the decision pass ran"),
    "reject_reason": (pa.string(), "render_error | ocr_readback; null when kept"),
    "decided_config_hash": (pa.string(), "hash of the thresholds that made the decision"),
}


def _fields(spec: dict[str, tuple[pa.DataType, str]]) -> list[pa.Field]:
    return [pa.field(n, t, nullable=(n != "id"), metadata={b"doc": d.encode()}) for n, (t, d) in spec.items()]


RENDER_SCHEMA = pa.schema(_fields(FIELDS) + [IMAGE_FIELD])  # what render workers write
DECISION_SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False)] + _fields(DECISION_FIELDS))
SCHEMA = pa.schema(list(RENDER_SCHEMA) + list(DECISION_SCHEMA)[1:])  # after the decision pass
COLUMNS_WITHOUT_IMAGE = [f.name for f in SCHEMA if f.name != "image"]
