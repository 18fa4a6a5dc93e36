"""Schemas of the flywheel's Lance tables (one LanceDB database, ``workdir`` in configs/flywheel.yaml).

Every reader and writer of these tables imports them from here. Each table has a stable key
(``KEYS``): writers insert only keys that are not there yet (or update rows whose content changed),
so a rerun on the same inputs writes nothing and creates no new Lance version.

    cases           one row per distinct failure/evaluation signal (key case_id)
    signal_rejects  malformed input records with the reason (key reject_id)
    pool_index      the retrieval index over the curated pool (key id = curated id)
    routes          the attribution decision per failing case, with its evidence (key case_id)
    preferences     RL track: (prompt, bad image, reason) records for the reward side (key case_id)
    prompt_rewrites prompt-engineering track: cases awaiting / given a rewrite (key case_id)
    queue           items proposed by the pre-training track, for human review (key item_id)
    reviews         the latest human decision per queue item (key item_id)
    mixture         approved items merged into the training mixture; a Lance version = a mixture
                    version (key item_id)
    runs            one row per nightly run that changed something (key run_id)
"""

from __future__ import annotations

import pyarrow as pa

BLOB_META = {b"lance-encoding:blob": b"true"}
TS = pa.timestamp("us", tz="UTC")

SOURCES = ("eval", "bad_case", "feedback")
TASKS = ("t2i", "ti2i")
TRACKS = ("pretrain", "prompt", "rl")
ROUTE_PENDING = "pending"  # routes.status while an LLM-judge step waits for the server
DECISIONS = ("approve", "reject")


def _schema(spec: dict[str, tuple[pa.DataType, str]], key: str, blobs: tuple[str, ...] = ()) -> pa.Schema:
    fields = []
    for name, (tp, doc) in spec.items():
        meta = {b"doc": doc.encode(), **(BLOB_META if name in blobs else {})}
        fields.append(pa.field(name, tp, nullable=name != key, metadata=meta))
    return pa.schema(fields)


CASES = _schema({
    "case_id": (pa.string(), "sha1 of the record's identity fields: the same case arriving twice is one row"),
    "source": (pa.string(), "eval | bad_case | feedback"),
    "task": (pa.string(), "t2i | ti2i"),
    "prompt": (pa.string(), "the generation prompt or edit instruction, as given"),
    "category": (pa.string(), "concept / data category when the source names one (lower-case)"),
    "benchmark": (pa.string(), "eval: benchmark name"),
    "metric": (pa.string(), "eval: metric name"),
    "score": (pa.float64(), "eval: the metric's value"),
    "checkpoint": (pa.string(), "model checkpoint that produced the output"),
    "rating": (pa.float64(), "feedback: user rating (1..5)"),
    "complaint": (pa.string(), "feedback / bad case: free-text description of what is wrong"),
    "failed": (pa.bool_(), "derived from the config: eval score below the pass mark, rating at or "
                           "below the fail mark, every bad case; only failures are attributed"),
    "generated_image": (pa.large_binary(), "the generated image's bytes, when given"),
    "source_image": (pa.large_binary(), "the edit's input image bytes (ti2i), when given"),
    "extra": (pa.string(), "JSON of any further fields of the record, kept verbatim"),
    "origin": (pa.string(), "file#row where the case first arrived"),
    "received_at": (TS, "when the case was first ingested"),
}, "case_id", blobs=("generated_image", "source_image"))

SIGNAL_REJECTS = _schema({
    "reject_id": (pa.string(), "sha1 of origin file + row + raw text: a re-read file adds nothing"),
    "origin": (pa.string(), "file#row of the malformed record"),
    "reason": (pa.string(), "why the record was rejected (field: problem)"),
    "raw": (pa.string(), "the record as read (JSON text, truncated to 4 KiB)"),
    "received_at": (TS, "when it was first seen"),
}, "reject_id")


def pool_index_schema(dim: int) -> pa.Schema:
    """The retrieval index; vectors are float32 fixed-size lists of the CLIP embed dim."""
    vec = pa.list_(pa.float32(), dim)
    return _schema({
        "id": (pa.string(), "curated row id (join key into the pool table)"),
        "pool": (pa.string(), "name of the pool table in the flywheel config (pools.<name>)"),
        "pool_version": (pa.int64(), "Lance version of the pool table the row was indexed from"),
        "stage": (pa.string(), "curation stage of the row"),
        "keep": (pa.bool_(), "the curation decision (rejected rows are indexed only for the reasons "
                             "in index.include_reject_reasons, e.g. quota / balance)"),
        "reject_reason": (pa.string(), "curation reject reason, null when kept"),
        "kind": (pa.string(), "image (a T2I item) | edit_pair (an instruction with its base image)"),
        "base_id": (pa.string(), "edit_pair: id of the base image in the pool"),
        "text": (pa.string(), "caption text the FTS index and the text embedding are built from"),
        "categories": (pa.list_(pa.string()), "lower-case concept labels: knowledge-caption entities "
                                              "and types, structured kind, the pool's category column"),
        "text_vector": (vec, "CLIP text-tower embedding of `text` (L2-normalised)"),
        "image_vector": (vec, "the stored clip_embedding of the image (L2-normalised); zeros when "
                              "CLIP did not run (has_image_vector false)"),
        "has_image_vector": (pa.bool_(), "false when the pool row had no clip_embedding"),
        "text_hash": (pa.string(), "sha1 of text + clip model: a changed caption is re-embedded"),
        "indexed_at": (TS, "when the row was (re)indexed"),
    }, "id")


ROUTES = _schema({
    "case_id": (pa.string(), "the routed case"),
    "status": (pa.string(), "routed | pending (a judge step waits for the LLM server; retried next run)"),
    "track": (pa.string(), "pretrain | prompt | rl; null while pending"),
    "reason": (pa.string(), "one line: why this track"),
    "density": (pa.int32(), "relevant hybrid-search hits around the prompt"),
    "typical_density": (pa.float64(), "the pool's median density (same search for sampled pool captions)"),
    "category_count": (pa.int64(), "pool rows labelled with the case's category; null without category"),
    "typical_category_count": (pa.float64(), "median pool rows per category"),
    "scarce": (pa.bool_(), "density or category count below the config's ratio of the typical value"),
    "neighbour_ids": (pa.list_(pa.string()), "nearest pool ids (hybrid search), best first"),
    "neighbour_scores": (pa.list_(pa.float32()), "cosine similarity of each neighbour's caption to the prompt"),
    "similar_case_ids": (pa.list_(pa.string()), "evaluated cases with similar prompts"),
    "similar_pass_rate": (pa.float64(), "share of those that passed; null when none"),
    "rule_flags": (pa.list_(pa.string()), "prompt rules that fired (too_short, vague_word:..., ...)"),
    "judge_answer": (pa.string(), "the LLM judge's validated JSON answer"),
    "judge_error": (pa.string(), "why the judge step is pending (server down, invalid answers)"),
    "actions": (pa.string(), "pre-training track: done | pending (prompt variants wait for the LLM server)"),
    "config_hash": (pa.string(), "hash of the attribution config that made the decision"),
    "index_version": (pa.int64(), "pool_index version searched"),
    "routed_at": (TS, "when the decision was made"),
}, "case_id")

PREFERENCES = _schema({
    "case_id": (pa.string(), "the RL-routed case"),
    "prompt": (pa.string(), "the prompt the model failed"),
    "task": (pa.string(), "t2i | ti2i"),
    "rejected_image": (pa.large_binary(), "the bad generation (the 'rejected' side), when given"),
    "source_image": (pa.large_binary(), "edit input image, when given"),
    "reason": (pa.string(), "what is wrong: complaint, or metric and score"),
    "checkpoint": (pa.string(), "checkpoint that failed"),
    "created_at": (TS, "when the record was made"),
}, "case_id", blobs=("rejected_image", "source_image"))

PROMPT_REWRITES = _schema({
    "case_id": (pa.string(), "the prompt-track case"),
    "prompt": (pa.string(), "the original prompt"),
    "status": (pa.string(), "awaiting_enhancer | rewritten | failed"),
    "rewrite": (pa.string(), "the enhanced prompt; null until the enhancer ran"),
    "model": (pa.string(), "served model that rewrote it"),
    "error": (pa.string(), "why rewriting failed"),
    "updated_at": (TS, "last change"),
}, "case_id")

QUEUE = _schema({
    "item_id": (pa.string(), "sha1(case_id, kind, ref): stable across runs"),
    "case_id": (pa.string(), "the failing case this item compensates"),
    "kind": (pa.string(), "pool_item | edit_pair | prompt_variant"),
    "pool": (pa.string(), "pool name (pool_item / edit_pair)"),
    "pool_id": (pa.string(), "curated id of the retrieved item (thumbnail source)"),
    "base_id": (pa.string(), "edit_pair: curated id of the base image"),
    "text": (pa.string(), "the item's caption, or the generated prompt variant"),
    "category": (pa.string(), "the case's category"),
    "source": (pa.string(), "where it came from: retrieval:<pool> | llm:<model>"),
    "similarity": (pa.float32(), "cosine similarity to the failed prompt (retrieval); null for variants"),
    "keep": (pa.bool_(), "curation decision of a retrieved item (false: rejected only by quota/balance)"),
    "reject_reason": (pa.string(), "curation reject reason of a retrieved item"),
    "provenance": (pa.string(), "JSON: query, rank, index/pool versions, model, prompt template"),
    "created_at": (TS, "when queued"),
}, "item_id")

REVIEWS = _schema({
    "item_id": (pa.string(), "the reviewed queue item"),
    "decision": (pa.string(), "approve | reject"),
    "reviewer": (pa.string(), "who decided (name given at sign-in)"),
    "reviewed_at": (TS, "when"),
}, "item_id")

MIXTURE = _schema({
    "item_id": (pa.string(), "approved queue item"),
    "kind": (pa.string(), "pool_item | edit_pair | prompt_variant"),
    "pool": (pa.string(), "pool name"),
    "pool_uri": (pa.string(), "pool table URI (lineage)"),
    "pool_version": (pa.int64(), "pool table version the item was indexed from (lineage)"),
    "pool_id": (pa.string(), "curated id (lineage)"),
    "base_id": (pa.string(), "edit pair base image id"),
    "text": (pa.string(), "caption or prompt variant"),
    "case_id": (pa.string(), "the case that asked for it (lineage)"),
    "reviewer": (pa.string(), "who approved it (lineage)"),
    "reviewed_at": (TS, "when it was approved"),
    "run_id": (pa.string(), "nightly run that merged it"),
}, "item_id")

RUNS = _schema({
    "run_id": (pa.string(), "sha1 of the run's input state: an unchanged night has the same id"),
    "started_at": (TS, "when the run started"),
    "counts": (pa.string(), "JSON: rows added per table and routes per track"),
    "versions": (pa.string(), "JSON: Lance version of every table after the run"),
}, "run_id")

TABLES: dict[str, pa.Schema] = {
    "cases": CASES, "signal_rejects": SIGNAL_REJECTS, "routes": ROUTES, "preferences": PREFERENCES,
    "prompt_rewrites": PROMPT_REWRITES, "queue": QUEUE, "reviews": REVIEWS, "mixture": MIXTURE, "runs": RUNS,
}
KEYS: dict[str, str] = {name: s.field(0).name for name, s in TABLES.items()} | {"pool_index": "id"}
