"""The captions-table schema: exactly one Lance row per kept curated `id`.

Caption columns hold the schema-validated JSON text exactly as the model returned it (no rewriting of
its strings); null where routing did not ask for that type or the row failed. A downstream job joins
this table to the curated table on `id`; `source_version` says which curated Lance version the row
was captioned from.
"""

from __future__ import annotations

import pyarrow as pa

# Order matters: it is the order captions are requested and reported in. `general` is always written.
CAPTION_TYPES: tuple[str, ...] = ("general", "text", "knowledge", "structured")
ROUTED_TYPES: dict[str, str] = {  # routing answer key -> caption type it switches on
    "has_text": "text",
    "is_structured": "structured",
    "has_known_entities": "knowledge",
}
STATUS_OK, STATUS_FAILED = "ok", "failed"

FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "curated row id (join key)"),
    "caption_status": (pa.string(), "ok: every routed caption is schema-valid; failed: see caption_error"),
    "caption_error": (pa.string(), "why the row failed: '<type>: <reason>: <detail>'; null when ok"),
    "caption_error_kind": (pa.string(), "failure reason class (length, invalid_json, schema, http_5xx, "
                                        "http_429, http_4xx, connection, timeout); null when ok"),
    "route_text": (pa.bool_(), "routing: the image needs a text caption; null if routing failed"),
    "route_structured": (pa.bool_(), "routing: the image needs a structured caption"),
    "route_knowledge": (pa.bool_(), "routing: the image needs a knowledge caption"),
    "route_json": (pa.string(), "the routing answer as the model returned it"),
    **{f"caption_{t}": (pa.string(), f"validated JSON of the {t} caption, verbatim") for t in CAPTION_TYPES},
    "attempts": (pa.int32(), "requests sent for this row, retries included"),
    "model": (pa.string(), "served model name or model path/id"),
    "prompt_version": (pa.string(), "prompt set version (captioning/prompts/<version>)"),
    "source_version": (pa.int64(), "Lance version of the curated table the row was captioned from"),
    "captioned_at": (pa.timestamp("us", tz="UTC"), "when the row was written"),
}

SCHEMA = pa.schema([pa.field(n, t, nullable=(n != "id")) for n, (t, _) in FIELDS.items()])


def with_source_metadata(schema: pa.Schema, source_uri: str, source_version: int) -> pa.Schema:
    """Schema metadata names the curated table (the per-row column holds the version)."""
    return schema.with_metadata({b"captioning.source_uri": source_uri.encode(),
                                 b"captioning.source_version": str(source_version).encode()})
