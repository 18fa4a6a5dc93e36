"""Schemas of the Prompt-Enhancer tables: every reader and writer imports them from here.

    PE_DATA   jobs/build_pe_data.py: one row per input id (captions-table id, or `edit:<pair id>`):
              the (P_short, CoT, P_fine) triplet with how it was made, or why it was not.
    ENHANCED  jobs/enhance_prompts.py: one row per prompt id: original and enhanced prompt.

Both are written by the captioning job's writer (`captioning.pipeline.CaptionWriter`, merge on `id`)
under the guard below: an `ok` row is never replaced by a failed one.
"""

from __future__ import annotations

import pyarrow as pa

STATUS_OK, STATUS_REJECTED, STATUS_FAILED = "ok", "rejected", "failed"
# Final states a rerun skips (a rejection is a decision: the same seeds would reproduce it).
DONE = (STATUS_OK, STATUS_REJECTED)
TASKS = ("t2i", "edit")
TS = pa.timestamp("us", tz="UTC")


def _schema(spec: dict[str, tuple[pa.DataType, str]]) -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable=n != "id", metadata={b"doc": d.encode()}) for n, (t, d) in spec.items()])


_STATUS = {
    "status": (pa.string(), "ok | rejected (meaning check) | failed (requests; a rerun retries it)"),
    "error_kind": (pa.string(), "failure/reject class: meaning, no_caption, length, invalid_json, schema, "
                                "http_*, connection, timeout, internal; null when ok"),
    "error": (pa.string(), "why: '<request>: <detail>' or the meaning check's reason"),
}

PE_DATA = _schema({
    "id": (pa.string(), "captions-table id (t2i) or edit:<pair id> (edit)"),
    "task": (pa.string(), "t2i (degraded from a caption) | edit (summarised edit annotation)"),
    **_STATUS,
    "category": (pa.string(), "LLM class of P_fine: general | portrait | text | complex_text (t2i)"),
    "language": (pa.string(), "language of P_fine and P_short (en | zh)"),
    "difficulty": (pa.string(), "light | medium | heavy (t2i)"),
    "strategies": (pa.list_(pa.string()), "degradation strategies applied, in order (configs/pe.yaml names)"),
    "removed": (pa.list_(pa.string()), "per strategy, what the LLM says it removed or blurred"),
    "p_fine": (pa.string(), "the fine annotation (rendered from the captions by captioning/schema.py)"),
    "p_short": (pa.string(), "the degraded prompt (t2i) or concise editing prompt (edit)"),
    "cot": (pa.string(), "the inverse steps, last strategy first: how to recover P_fine from P_short"),
    "length_ratio": (pa.float32(), "len(p_short) / len(p_fine) in characters"),
    "caption_kinds": (pa.list_(pa.string()), "caption variants P_fine was built from (dense, text, ...)"),
    "attempts": (pa.int32(), "requests sent for this row, retries included"),
    "model": (pa.string(), "served model that classified and degraded"),
    "prompt_version": (pa.string(), "PE prompt set version (flywheel/pe_prompts/<version>)"),
    "source_version": (pa.int64(), "Lance version of the captions (or edits) table read"),
    "created_at": (TS, "when the row was written"),
})

ENHANCED = _schema({
    "id": (pa.string(), "the prompt's id (given, or sha1 of the prompt text)"),
    **_STATUS,
    "prompt": (pa.string(), "the original prompt"),
    "enhanced": (pa.string(), "the enhancer's rewrite; null unless ok"),
    "attempts": (pa.int32(), "requests sent, retries included"),
    "model": (pa.string(), "served prompt-enhancer model"),
    "prompt_version": (pa.string(), "prompt set version, or 'plain' (PE's own chat format)"),
    "enhanced_at": (TS, "when the row was written"),
})

# merge_insert guard (captioning.pipeline.CaptionWriter): never replace an ok row by a non-ok one.
REPLACE_IF = f"source.status = '{STATUS_OK}' OR target.status <> '{STATUS_OK}'"
