"""Every filter a curation stage is built from, in one plain dict: :data:`FILTERS`.

A filter is a small scoring function plus a threshold rule:

* ``score(batch)`` fills the filter's score columns for one Ray Data batch, from the decoded image
  (decoded once per row by the worker), the file's bytes, the caption or columns already in the
  batch (``clip_embedding``). It runs in the scoring workers; it never decides.
* ``rule(cols, th)`` turns stored columns into a "fails" mask, per row, with the filter's section of
  ``thresholds``. *Global* filters (dedup, semdedup, balance) instead ``collect`` compact inputs of
  their candidate rows while the decision pass streams the table, and ``decide_global`` over all
  of them at once. Rules run in the decision pass only — which is all ``--rethreshold`` runs.

A stage config (:class:`curation.config.StageConfig`) lists filter names in chain order; model-backed
filters name the shared models they need (:data:`MODELS`), which load once per actor. ``identity``
says which scoring settings decide a filter's scores: a stage chained on a previous stage's table
copies a score instead of recomputing it when the parent's identity for that column is the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from .scorers import (
    ClipRotationDetector,
    ClipScorer,
    NsfwScorer,
    TokenCounter,
    grey_entropy,
    noise_score,
    phash64,
)

# --------------------------------------------------------------------------- models
# Shared model-backed scorers, by name: constructed cheaply, ``preflight()`` in the driver (a missing
# model stops the job naming the setting), ``setup()`` once per actor.


def _aesthetic(cfg, device):
    from .aesthetic import AestheticHead

    return AestheticHead(cfg.scoring.aesthetic.weights, device=device)


MODELS: dict[str, Callable[[Any, str], Any]] = {
    "clip": lambda cfg, device: ClipScorer(cfg.scoring.clip, device),
    "nsfw": lambda cfg, device: NsfwScorer(cfg.scoring.nsfw_model),
    "tokens": lambda cfg, device: TokenCounter(cfg.scoring.tokenizer),
    "aesthetic": _aesthetic,
}

# Rotation detectors by config name (``scoring.rotation.detector``): a plain dict of presets. A
# detector is built from the loaded models and is called as ``detector.detect(images, captions) ->
# (turns, probabilities_not_upright, upright_embeddings | None)``.
ROTATION_DETECTORS = {
    "clip": lambda models, cfg: ClipRotationDetector(models["clip"], cfg) if "clip" in models else None,
    "none": lambda models, cfg: None,
}


# --------------------------------------------------------------------------- the scoring batch
class Batch:
    """One Ray Data batch being scored: ``out`` (column -> list, one entry per row), the rows with
    a decoded image (``idx``, with ``images`` in the same order) and the raw bytes per row."""

    def __init__(self, out: dict[str, list], idx: list[int], images: list[Image.Image] | None,
                 datas: list[bytes | None], models: dict, cfg, cache: dict):
        self.out, self.idx, self.images, self.datas = out, idx, images, datas
        self.models, self.cfg, self.cache = models, cfg, cache
        self._grey: dict[int, Image.Image] = {}
        self.grids: list = []  # full-scale luma crops (decode's ``grid``) when the stage scores blockiness

    def grey(self, k: int) -> Image.Image:
        if k not in self._grey:
            self._grey[k] = self.images[k].convert("L")
        return self._grey[k]

    def captions(self) -> list[str | None]:
        return [self.out["caption"][i] for i in self.idx]

    def embeddings(self) -> tuple[list[int], np.ndarray]:
        """(positions k into ``idx`` that have one, float32 rows) of the stored ``clip_embedding``
        — as stored (float16), so a score from it is the same whether the embedding was computed
        now or read from a previous stage. Missing ones are computed now when CLIP is loaded."""
        emb = self.out["clip_embedding"]
        missing = [k for k, i in enumerate(self.idx) if emb[i] is None]
        if missing and self.images is not None and "clip" in self.models:
            new = self.models["clip"].embed_images([self.images[k] for k in missing])
            for k, e in zip(missing, new, strict=True):
                emb[self.idx[k]] = e.astype(np.float16)
        have = [k for k, i in enumerate(self.idx) if emb[i] is not None]
        if not have:
            return [], np.zeros((0, 0), np.float32)
        return have, np.stack([np.asarray(emb[self.idx[k]], np.float16) for k in have]).astype(np.float32)


# --------------------------------------------------------------------------- score functions
def _score_resolution(b: Batch) -> None:
    for i in b.idx:
        w, h = b.out["width"][i], b.out["height"][i]
        b.out["short_side"][i], b.out["aspect_ratio"][i] = min(w, h), max(w, h) / max(1, min(w, h))


def _score_dedup(b: Batch) -> None:
    for k, i in enumerate(b.idx):
        b.out["phash"][i] = phash64(b.grey(k))


def _score_entropy(b: Batch) -> None:
    for k, i in enumerate(b.idx):
        b.out["entropy"][i], b.out["noise"][i] = grey_entropy(b.grey(k)), noise_score(b.images[k])


def _score_nsfw(b: Batch) -> None:
    if b.idx:
        for i, v in zip(b.idx, b.models["nsfw"](b.images), strict=True):
            b.out["nsfw_score"][i] = v


def _score_rotation(b: Batch) -> None:
    det = b.cache.get("rotation")
    if det is None or not b.idx:
        return
    preds, probs, upright = det.detect(b.images, b.captions())
    for k, i in enumerate(b.idx):
        b.out["rotation_pred"][i], b.out["rotation_score"][i] = preds[k], probs[k]
        # The 0-degree pass is the image's CLIP embedding: stored, and reused by the clip filter.
        if upright is not None and b.out["clip_embedding"][i] is None:
            b.out["clip_embedding"][i] = upright[k].astype(np.float16)


def _score_clip(b: Batch) -> None:
    """Cosine of the stored image embedding and the caption's: one CLIP image pass per row gives
    both ``clip_embedding`` and ``clip_score``. Null without a caption (not a rejection)."""
    have, emb = b.embeddings()
    caps = b.captions()
    pos = [j for j, k in enumerate(have) if caps[k] and caps[k].strip()]
    if pos and "clip" in b.models:
        txt = b.models["clip"].embed_texts([caps[have[j]] for j in pos])
        for t, j in enumerate(pos):
            b.out["clip_score"][b.idx[have[j]]] = float(emb[j] @ txt[t])


def _score_tokens(b: Batch) -> None:
    # Token length needs only the caption, so broken images get a count too.
    for i, v in enumerate(b.models["tokens"](b.out["caption"])):
        b.out["token_count"][i] = v


def _score_quality(b: Batch) -> None:
    from .quality import brisque_score

    for k, i in enumerate(b.idx):
        b.out["brisque"][i] = brisque_score(b.images[k])


def _score_aesthetic(b: Batch) -> None:
    have, emb = b.embeddings()
    if have:
        for k, v in zip(have, b.models["aesthetic"](emb), strict=True):
            b.out["aesthetic"][b.idx[k]] = float(v)


def _score_compression(b: Batch) -> None:
    """JPEG quality from the header; blockiness on the full-scale luma crop the worker's decode
    returned (``Batch.grids``: the 8x8 grid the defaults are calibrated on, whatever the working size)."""
    from .quality import blockiness, jpeg_quality

    for k, i in enumerate(b.idx):
        if b.out["format"][i] == "JPEG" and b.datas[i] is not None:
            b.out["jpeg_quality"][i] = jpeg_quality(b.datas[i])
        if b.images is not None:
            b.out["blockiness"][i] = blockiness(b.grids[k])


def _score_semdedup(b: Batch) -> None:
    b.embeddings()  # semantic dedup decides from the stored embeddings only


def _score_balance(b: Batch) -> None:
    """Category per row: CLIP zero-shot over the configured taxonomy (text embeddings computed
    once per worker), from the stored image embedding; or the input's category column."""
    cat = b.cfg.scoring.category
    if cat.column:
        return  # copied from the parent table by the worker
    if "taxonomy" not in b.cache:
        names = list(cat.taxonomy)
        b.cache["taxonomy"] = (names, b.models["clip"].embed_texts([cat.taxonomy[n] for n in names]))
    names, txt = b.cache["taxonomy"]
    have, emb = b.embeddings()
    if not have:
        return
    logits = 100.0 * emb @ txt.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    best = p.argmax(1)
    for j, k in enumerate(have):
        b.out["category"][b.idx[k]], b.out["category_score"][b.idx[k]] = names[best[j]], float(p[j, best[j]])


# --------------------------------------------------------------------------- rules
class Cols:
    """Stored columns of a record batch or table, as the rules read them."""

    def __init__(self, t: pa.Table | pa.RecordBatch):
        self.t, self.n = t, t.num_rows

    def f(self, name: str, fill: float = np.nan) -> np.ndarray:
        """A score column as float64, nulls as ``fill`` (NaN compares False: a null passes)."""
        return pc.fill_null(self.t.column(name).cast(pa.float64()), fill).to_numpy()

    def valid(self, name: str) -> np.ndarray:
        return np.asarray(self.t.column(name).is_valid(), bool)

    def strings(self, name: str) -> np.ndarray:
        return np.asarray(self.t.column(name).to_pylist(), dtype=object)


def _rule_rotation(v: Cols, th) -> tuple[np.ndarray, np.ndarray]:
    pred = v.f("rotation_pred", 0)
    rotated = (pred != 0) & (v.f("rotation_score") >= th.min_confidence)
    if th.action == "discard":
        return rotated, np.zeros(v.n, np.int16)
    return np.zeros(v.n, bool), np.where(rotated, pred, 0).astype(np.int16)


# --------------------------------------------------------------------------- global rules
def _u64(keys: np.ndarray) -> np.ndarray:
    """Content hashes as 64-bit digests: exact-duplicate keys at 8 bytes a row, whatever the
    stored string (a false match needs a 64-bit collision: ~3e-4 over 10^8 distinct files)."""
    return np.array([int.from_bytes(hashlib.blake2b(str(h).encode(), digest_size=8).digest()) for h in keys],
                    np.uint64)


def _collect_dedup(v: Cols) -> dict[str, np.ndarray]:
    return {"phash": v.t.column("phash").to_numpy(zero_copy_only=False).astype(np.uint64),
            "content": _u64(v.strings("content_hash")),
            "area": v.f("width", 0) * v.f("height", 0), "id": v.strings("id")}


def _decide_dedup(c: dict[str, np.ndarray], th, cfg) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Exact (content hash) and near (pHash within ``max_hamming``) duplicates, globally; the
    survivor is the largest image, then the smallest id (``curation.dedup``)."""
    from . import dedup

    labels = dedup.cluster(c["phash"], c["content"], th.max_hamming, distributed=th.distributed)
    win = dedup.survivors(labels, c["area"], c["id"])
    losers = win != np.arange(len(win))
    return losers, {"dup_of": np.where(losers, c["id"][win], None)}


def _collect_semdedup(v: Cols, cfg) -> dict[str, np.ndarray]:
    col = v.t.column("clip_embedding")
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    dim = col.type.list_size
    # The child values as stored, null rows included (``flatten()`` drops them and would shift every
    # later row against its id); a row without an embedding becomes NaN, which semantic dedup
    # keeps, unclustered, with no semdup_of. (The decision pass passes candidates only, rows with an
    # embedding; this keeps the collector right on any table.)
    emb = col.values.slice(col.offset * dim, len(col) * dim).to_numpy(zero_copy_only=False)
    emb = emb.astype(np.float16).reshape(len(col), dim)
    emb[~np.asarray(col.is_valid(), bool)] = np.nan
    out = {"emb": emb, "id": v.strings("id"), "pixels": v.f("width", 0) * v.f("height", 0)}
    for key in cfg.thresholds.semdedup.rank:
        if key not in out:
            out[key] = v.f(key, -np.inf)
    return out


def _decide_semdedup(c: dict[str, np.ndarray], th, cfg) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """SemDeDup over the stored embeddings (``curation.semdedup``): near copies at cosine >= 1 - eps
    within a k-means cluster; the survivor by the configured ranking."""
    from .semdedup import semantic_dedup

    if len(c["id"]) < 2:
        return np.zeros(len(c["id"]), bool), {}
    rank = [c[k] for k in th.rank]
    keep, semdup_of, sim = semantic_dedup(c["id"], c["emb"], rank, th.eps, th.n_clusters)
    rejected = ~np.asarray(keep, bool)
    return rejected, {"semdup_of": np.where(rejected, np.asarray(semdup_of, object), None),
                      "semdup_similarity": np.where(rejected, np.asarray(sim, np.float64), np.nan)}


def _collect_balance(v: Cols) -> dict[str, np.ndarray]:
    return {"id": v.strings("id"), "category": v.strings("category")}


def _decide_balance(c: dict[str, np.ndarray], th, cfg) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from .balance import rebalance

    return ~rebalance(c["id"], c["category"], th), {}


# --------------------------------------------------------------------------- the filters
@dataclass(frozen=True)
class Filter:
    columns: tuple[str, ...]
    """Score columns it writes (``curation.schema.SCORE_FIELDS``); ``broken`` writes the base fields."""
    score: Callable[[Batch], None] | None
    """Fills ``columns`` for a batch (None: the worker's decode is the score)."""
    rule: Callable[[Cols, Any], Any] | None = None
    """Local rule: (stored columns, the filter's thresholds) -> fails mask, or (fails, rotate)."""
    collect: Callable[..., dict[str, np.ndarray]] | None = None
    """Global filters: compact inputs of candidate rows, gathered while the table streams."""
    decide_global: Callable[..., tuple[np.ndarray, dict[str, np.ndarray]]] | None = None
    """Global filters: (collected inputs, thresholds, cfg) -> (rejected mask, decision columns)."""
    candidates: tuple[str, ...] = ()
    """Global filters: rows with a null in one of these columns are not candidates."""
    reads: tuple[str, ...] = ()
    """Stored columns its rule/collect reads besides ``columns``."""
    models: tuple[str, ...] = ()
    """:data:`MODELS` it needs to score."""
    uses_embedding: bool = False
    """Reads ``clip_embedding`` (computed with the stage's CLIP where not stored yet)."""
    needs_image: bool = True
    """Scores from the decoded image (False: header fields, bytes, caption or stored columns)."""
    colour: bool = True
    """Reads colour pixels (False: luma only, or only the decode's success; a stage whose image
    filters all say False decodes grey: one cheaper full-scale pass, see ``curation.decode``)."""
    identity: Callable[[Any], dict] = field(default=lambda s: {})
    """The scoring settings its scores depend on (``cfg.scoring`` -> dict), for reuse across stages."""
    plots: tuple[tuple[str, str, str], ...] = ()
    """(score column, threshold field, label): threshold lines the report draws on histograms."""
    section: str | None = None
    """The ``thresholds`` section its rule reads (default: its name). Per-image filters of a pair
    stage (``source_resolution``, ``target_resolution``) share one section."""

    def th(self, name: str) -> str:
        return self.section or name


def _ws(s) -> dict:
    return {"working_size": s.working_size}


FILTERS: dict[str, Filter] = {
    "broken": Filter(("error",), None, rule=lambda v, th: v.valid("error"), colour=False,
                     identity=lambda s: {"max_pixels": s.max_pixels}),
    "resolution": Filter(
        ("short_side", "aspect_ratio"), _score_resolution, needs_image=False,
        rule=lambda v, th: (v.f("short_side") < th.min_short_side) | (v.f("aspect_ratio") > th.max_aspect_ratio),
        plots=(("short_side", "min_short_side", "min"), ("aspect_ratio", "max_aspect_ratio", "max"))),
    "dedup": Filter(("phash",), _score_dedup, collect=lambda v, cfg: _collect_dedup(v),
                    decide_global=_decide_dedup, candidates=("phash",),
                    reads=("content_hash", "width", "height"), identity=_ws),
    "nsfw": Filter(("nsfw_score",), _score_nsfw, models=("nsfw",),
                   rule=lambda v, th: v.f("nsfw_score") > th.max_score,
                   identity=lambda s: {**_ws(s), "nsfw_model": s.nsfw_model},
                   plots=(("nsfw_score", "max_score", "max"),)),
    "rotation": Filter(("rotation_score", "rotation_pred"), _score_rotation, rule=_rule_rotation,
                       models=("clip",),
                       identity=lambda s: {**_ws(s), "detector": s.rotation.detector, "clip": s.clip.identity()},
                       plots=(("rotation_score", "min_confidence", "min conf."),)),
    "entropy": Filter(("entropy", "noise"), _score_entropy, identity=_ws,
                      rule=lambda v, th: (v.f("entropy") < th.min_entropy) | (v.f("noise") > th.max_noise),
                      plots=(("entropy", "min_entropy", "min"), ("noise", "max_noise", "max"))),
    "clip": Filter(("clip_score",), _score_clip, models=("clip",), uses_embedding=True,
                   rule=lambda v, th: v.f("clip_score") < th.min_score,
                   identity=lambda s: {"clip": s.clip.identity()}, plots=(("clip_score", "min_score", "min"),)),
    "token_length": Filter(
        ("token_count",), _score_tokens, models=("tokens",), needs_image=False,
        rule=lambda v, th: (v.f("token_count") < th.min_tokens) | (v.f("token_count") > th.max_tokens),
        identity=lambda s: {"tokenizer": s.tokenizer},
        plots=(("token_count", "min_tokens", "min"), ("token_count", "max_tokens", "max"))),
    # Stage 4 (and 6, stricter). BRISQUE runs at its own fixed analysis size: not tied to working_size.
    # BRISQUE reads the luma: a grey decode gives JPEG's own Y (Rec. 601) instead of the skimage
    # weights of an RGB image (scores move by < 1 on the calibration set, decisions do not).
    "quality": Filter(("brisque",), _score_quality, rule=lambda v, th: v.f("brisque") > th.max_brisque,
                      colour=False,
                      plots=(("brisque", "max_brisque", "max"),)),
    "aesthetic": Filter(("aesthetic",), _score_aesthetic, models=("aesthetic",), uses_embedding=True,
                        needs_image=False, rule=lambda v, th: v.f("aesthetic") < th.min_score,
                        identity=lambda s: {"head": s.aesthetic.weights, "clip": s.clip.identity()},
                        plots=(("aesthetic", "min_score", "min"),)),
    "compression": Filter(
        ("jpeg_quality", "blockiness"), _score_compression, colour=False,
        rule=lambda v, th: (v.f("jpeg_quality") < th.min_jpeg_quality) | (v.f("blockiness") > th.max_blockiness),
        plots=(("jpeg_quality", "min_jpeg_quality", "min"), ("blockiness", "max_blockiness", "max"))),
    "semdedup": Filter((), _score_semdedup, collect=_collect_semdedup, decide_global=_decide_semdedup,
                       candidates=("clip_embedding",), reads=("clip_embedding", "width", "height"),
                       uses_embedding=True, needs_image=False),
    "balance": Filter(("category", "category_score"), _score_balance, collect=lambda v, cfg: _collect_balance(v),
                      decide_global=_decide_balance, candidates=("category",), uses_embedding=True,
                      needs_image=False,
                      identity=lambda s: {"taxonomy": s.category.taxonomy, "column": s.category.column,
                                          "clip": s.clip.identity()}),
}
EMBEDDING_IDENTITY = lambda s: {"clip": s.clip.identity()}  # noqa: E731 - what decides clip_embedding


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def column_identities(cfg, names) -> dict[str, str]:
    """Score column -> hash of the settings that decide it, for the filters ``names`` (written in the
    output's metadata; a chained stage copies a parent column whose hash equals its own)."""
    out = {}
    for name in names:
        f = FILTERS[name]
        h = _hash({"filter": name, **f.identity(cfg.scoring)})
        out.update({c: h for c in f.columns})
    return out


def embedding_identity(cfg) -> str:
    return _hash(EMBEDDING_IDENTITY(cfg.scoring))


def models_for(cfg, active: tuple[str, ...], embeddings_carried: bool, clip_skipped: bool = False) -> tuple[str, ...]:
    """Shared models the active filters need; CLIP only to compute embeddings not carried over.
    The rotation detector uses the stage's CLIP, so ``--skip clip`` leaves EXIF orientation only."""
    need: list[str] = []
    for name in active:
        f = FILTERS[name]
        need += [m for m in f.models if not (m == "clip" and name == "rotation" and (
            cfg.scoring.rotation.detector == "none" or clip_skipped))]
        if f.uses_embedding and not embeddings_carried:
            need.append("clip")
        if name == "balance" and not cfg.scoring.category.column:
            need.append("clip")  # the taxonomy's text embeddings
    return tuple(dict.fromkeys(need))

# Stage-2 pair filters (curation/stage2_filters.py) share this dict, so the decision pass, --rethreshold and
# the report treat them like any other filter. Imported last: they are built from Filter and Cols.
from .stage2_filters import pair_filters  # noqa: E402

FILTERS.update(pair_filters())
