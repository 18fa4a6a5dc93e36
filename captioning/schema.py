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
                                        "http_429, http_4xx, connection, timeout, bad_image, no_image, "
                                        "engine, internal); null when ok"),
    "route_text": (pa.bool_(), "routing: the image needs a text caption; null if routing failed"),
    "route_structured": (pa.bool_(), "routing: the image needs a structured caption"),
    "route_knowledge": (pa.bool_(), "routing: the image needs a knowledge caption"),
    "route_json": (pa.string(), "the routing answer as the model returned it"),
    **{f"caption_{t}": (pa.string(), f"validated JSON of the {t} caption, verbatim") for t in CAPTION_TYPES},
    "ocr_engine": (pa.string(), "OCR engine that read the image back (text captions only; common/ocr.py)"),
    "ocr_text": (pa.string(), "what OCR read in the image, lines joined with newlines; null without a text caption"),
    "ocr_agreement": (pa.float32(), "character agreement (common.ocr.char_agreement) of the text caption's "
                                     "transcribed blocks with ocr_text, in [0, 1]"),
    "ocr_flag": (pa.bool_(), "true: ocr_agreement stayed below ocr_min_agreement after one retry (the "
                             "transcription may be hallucinated; training leaves this text caption out)"),
    "attempts": (pa.int32(), "requests sent for this row, retries included"),
    "model": (pa.string(), "served model name or model path/id"),
    "prompt_version": (pa.string(), "prompt set version (captioning/prompts/<version>)"),
    "previous_model": (pa.string(), "model of the ok row this row replaced on purpose (--recaption); else null"),
    "previous_prompt_version": (pa.string(), "prompt version of the ok row this row replaced (--recaption)"),
    "source_version": (pa.int64(), "Lance version of the curated table the row was captioned from"),
    "captioned_at": (pa.timestamp("us", tz="UTC"), "when the row was written"),
}

SCHEMA = pa.schema([pa.field(n, t, nullable=(n != "id")) for n, (t, _) in FIELDS.items()])
# Columns added after the first release: an older captions table gets them (all null) on its next run.
ADDED_COLUMNS: tuple[str, ...] = ("ocr_engine", "ocr_text", "ocr_agreement", "ocr_flag", "previous_model",
                                  "previous_prompt_version")
# merge_insert guard: a new row replaces a stored one only if it is ok or the stored one is not, so an
# ok caption is never replaced by a failed one (whatever the model, prompt version or --recaption).
REPLACE_IF = f"source.caption_status = '{STATUS_OK}' OR target.caption_status <> '{STATUS_OK}'"


def with_source_metadata(schema: pa.Schema, source_uri: str, source_version: int) -> pa.Schema:
    """Schema metadata names the curated table (the per-row column holds the version)."""
    return schema.with_metadata({b"captioning.source_uri": source_uri.encode(),
                                 b"captioning.source_version": str(source_version).encode()})


# --------------------------------------------------------------------------- what training reads
# The one rendering of a captions-table row into the texts the condition encoder sees
# (jobs/encode_latents.py calls `caption_variants`; nothing else parses the caption JSON for training).
# Variant kinds: the general caption's three lengths, then one text per other caption type.
LENGTHS: tuple[str, ...] = ("short", "medium", "dense")
LANGUAGES: tuple[str, ...] = ("en", "zh")
VARIANT_KINDS: tuple[str, ...] = (*LENGTHS, "text", "knowledge", "structured")
_LABELS = {"en": {"text": "Text", "kind": "Figure", "entities": "Elements", "relations": "Relations"},
           "zh": {"text": "文字", "kind": "图类型", "entities": "元素", "relations": "关系"}}


# Columns `caption_variants` reads (a reader selects only these).
TRAINING_COLUMNS: tuple[str, ...] = ("id", "caption_status", *(f"caption_{t}" for t in CAPTION_TYPES), "ocr_flag")


def variant_type(kind: str) -> str:
    """Caption type of a variant kind: the three lengths are the general caption."""
    return "general" if kind in LENGTHS else kind


def render_text(value: dict, lang: str) -> str:
    """Text caption -> the description in `lang`, then (one line) every transcribed block that the
    description does not already quote verbatim, in reading order: the exact text reaches training
    even when the description paraphrases it."""
    desc = value[lang].strip()
    missing = [b["text"] for b in value["blocks"] if b["text"] not in desc and b["text"] != "[illegible]"]
    return desc + (f"\n{_LABELS[lang]['text']}: " + " / ".join(f'"{t}"' for t in missing) if missing else "")


def render_structured(value: dict, lang: str) -> str:
    """Structured caption -> the summary in `lang`, then the figure kind, the elements with their
    attributes and the relations, naming elements by their label (their id when unlabeled):

        <summary>
        Figure: flowchart
        Elements: "Start" (shape: oval); "Check" (shape: diamond); "End"
        Relations: "Start" -flows_to-> "Check"; "Check" -flows_to-> "End" (yes)
    """
    L = _LABELS[lang]
    name = {e["id"]: e["label"] or e["id"] for e in value["entities"]}

    def element(e: dict) -> str:
        attrs = ", ".join(f"{k}: {v}" for k, v in e["attributes"].items())
        return f'"{name[e["id"]]}"' + (f" ({attrs})" if attrs else "")

    def relation(r: dict) -> str:
        s, t = name.get(r["source"], r["source"]), name.get(r["target"], r["target"])
        return f'"{s}" -{r["type"]}-> "{t}"' + (f" ({r['label']})" if r["label"] else "")

    lines = [value[lang].strip(), f"{L['kind']}: {value['kind']}",
             f"{L['entities']}: " + "; ".join(element(e) for e in value["entities"])]
    if value["relations"]:
        lines.append(f"{L['relations']}: " + "; ".join(relation(r) for r in value["relations"]))
    return "\n".join(lines)


def caption_variants(row: dict) -> list[tuple[str, str, str]]:
    """(kind, lang, text) of every caption variant of one captions-table row, in VARIANT_KINDS order.

    Only `ok` rows give variants (a failed row's training caption is its alt text, which the caller
    adds). A text caption flagged by the OCR check (`ocr_flag`) is left out: its transcription
    disagrees with what OCR reads in the image. Empty strings are skipped.
    """
    import json

    if row.get("caption_status") != STATUS_OK:
        return []
    out: list[tuple[str, str, str]] = []
    if row.get("caption_general"):
        g = json.loads(row["caption_general"])
        out += [(n, lang, g[lang][n].strip()) for n in LENGTHS for lang in LANGUAGES if g.get(lang, {}).get(n)]
    renderers = {"text": render_text, "knowledge": lambda v, lang: v[lang].strip(), "structured": render_structured}
    for t, render in renderers.items():
        raw = row.get(f"caption_{t}")
        if not raw or (t == "text" and row.get("ocr_flag")):
            continue
        v = json.loads(raw)
        out += [(t, lang, render(v, lang)) for lang in LANGUAGES if v.get(lang, "").strip()]
    return [(k, lang, text) for k, lang, text in out if text]
