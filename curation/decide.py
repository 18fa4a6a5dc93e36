"""Keep/reject decisions from stored scores — the final pass of every run and all of
``--rethreshold``. Pure Arrow/numpy over the score columns; no image is decoded, no model runs.

The chain order is the report's: the first failing filter is the ``reject_reason``. A null score
means "not computed" (skipped filter, no caption) and passes its rule. Dedup is global: it runs over
every row that passed ``broken`` and ``resolution``, so a too-small copy cannot be a survivor.
"""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import dedup
from .config import STAGE1_CHAIN, StageConfig
from .schema import DECISION_FIELDS, DECISION_SCHEMA

SCORE_INPUT_COLUMNS = ["id", "error", "skipped", "content_hash", "width", "height", "short_side",
                       "aspect_ratio", "phash", "nsfw_score", "rotation_score", "rotation_pred",
                       "entropy", "noise", "clip_score", "token_count"]


def _np(t: pa.Table, name: str, fill: float = np.nan) -> np.ndarray:
    """A score column as float64 with nulls as ``fill`` (NaN: compares False, so null passes)."""
    return pc.fill_null(t.column(name).cast(pa.float64()), fill).to_numpy()


def decide(scores: pa.Table, cfg: StageConfig) -> pa.Table:
    """``DECISION_SCHEMA`` rows (id, keep, reject_reason, dup_of, rotate, decided_config_hash)."""
    th, n = cfg.thresholds, scores.num_rows
    reason = np.full(n, None, dtype=object)
    dup_of = np.full(n, None, dtype=object)
    skipped_lists = scores.column("skipped").to_pylist()
    skip = {name: np.array([name in (s or ()) for s in skipped_lists], bool) for name in STAGE1_CHAIN}

    def reject(name: str, fails: np.ndarray) -> None:
        mask = fails & ~skip[name] & (reason == None)  # noqa: E711 - elementwise on object array
        reason[mask] = name

    # NaN (null score) compares False against every bound, so null passes: "not computed".
    reject("broken", scores.column("error").is_valid().to_numpy(zero_copy_only=False))
    short, aspect = _np(scores, "short_side"), _np(scores, "aspect_ratio")
    reject("resolution", (short < th.resolution.min_short_side) | (aspect > th.resolution.max_aspect_ratio))

    cand = np.flatnonzero((reason == None) & ~skip["dedup"] & scores.column("phash").is_valid().to_numpy(  # noqa: E711
        zero_copy_only=False))
    if len(cand) > 1:
        sub = scores.take(pa.array(cand))
        labels = dedup.cluster(sub.column("phash").to_numpy(), sub.column("content_hash").to_numpy(
            zero_copy_only=False), th.dedup.max_hamming)
        area = _np(sub, "width", 0) * _np(sub, "height", 0)
        ids = sub.column("id").to_numpy(zero_copy_only=False)
        win = dedup.survivors(labels, area, ids)
        losers = win != np.arange(len(cand))
        reason[cand[losers]] = "dedup"
        dup_of[cand[losers]] = ids[win[losers]]

    reject("nsfw", _np(scores, "nsfw_score") > th.nsfw.max_score)
    pred = _np(scores, "rotation_pred", 0)
    rotated = (pred != 0) & (_np(scores, "rotation_score") >= th.rotation.min_confidence) & ~skip["rotation"]
    rotate = np.zeros(n, np.int16)
    if th.rotation.action == "discard":
        reject("rotation", rotated)
    else:
        rotate[rotated] = pred[rotated].astype(np.int16)
    ent, noise = _np(scores, "entropy"), _np(scores, "noise")
    reject("entropy", (ent < th.entropy.min_entropy) | (noise > th.entropy.max_noise))
    reject("clip", _np(scores, "clip_score") < th.clip.min_score)
    tok = _np(scores, "token_count")
    reject("token_length", (tok < th.token_length.min_tokens) | (tok > th.token_length.max_tokens))

    keep = reason == None  # noqa: E711
    return pa.Table.from_arrays([
        scores.column("id"), pa.array(keep, pa.bool_()), pa.array(reason.tolist(), pa.string()),
        pa.array(dup_of.tolist(), pa.string()), pa.array(rotate, pa.int16()),
        pa.array([cfg.threshold_hash()] * n, pa.string()),
    ], schema=DECISION_SCHEMA)


def apply_decisions(uri: str, cfg: StageConfig, storage_options: dict | None = None) -> tuple[pa.Table, int]:
    """Decide from the stored scores and write the decision columns as a new table version.

    Decision columns are replaced with Lance's column add (``merge`` on ``id``), which writes only
    the new columns' files: images and scores are not rewritten. Idempotent: a pass killed half-way
    is simply run again. Returns (decisions, version)."""
    ds = lance.dataset(uri, storage_options=storage_options)
    scores = ds.to_table(columns=SCORE_INPUT_COLUMNS)
    decisions = decide(scores, cfg)
    stale = [c for c in DECISION_FIELDS if c in ds.schema.names]
    if stale:
        ds.drop_columns(stale)
        ds = lance.dataset(uri, storage_options=storage_options)
    ds.merge(decisions, left_on="id")
    return decisions, lance.dataset(uri, storage_options=storage_options).version
