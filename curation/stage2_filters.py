"""Stage-2 pair filters (see ``curation.stage2``): score functions over a :class:`PairBatch` (both
images of each pair decoded once) and threshold rules over stored columns. Scores are SYNTH's pure
functions in ``curation.pairs``. This module imports nothing from ``curation.filters`` at import
time: ``filters`` merges :func:`pair_filters` into its ``FILTERS`` dict at its end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import pairs

if TYPE_CHECKING:
    from .filters import Cols

SIDES = ("source", "target")


# --------------------------------------------------------------------------- the pair batch
class PairBatch:
    """One batch of pairs being scored: ``out`` (column -> list per row), the rows whose two images
    decoded (``idx``) with their images (``src``/``tgt``, same order)."""

    def __init__(self, out, idx, src, tgt, models, cfg, cache):
        self.out, self.idx, self.src, self.tgt = out, idx, src, tgt
        self.models, self.cfg, self.cache = models, cfg, cache

    def images(self, side: str) -> list:
        return self.src if side == "source" else self.tgt


def _score_nsfw(side: str):
    def fn(b: PairBatch) -> None:
        if b.idx:
            for i, v in zip(b.idx, b.models["nsfw"](b.images(side)), strict=True):
                b.out[f"{side}_nsfw_score"][i] = v
    return fn


def _score_instruction(b: PairBatch) -> None:
    en, zh = b.out["instruction_en"], b.out["instruction_zh"]
    tok = b.models.get("tokens")
    counts = [tok(en), tok(zh)] if tok is not None else None
    for i in range(len(en)):
        text = " ".join(t for t in (en[i], zh[i]) if t)
        b.out["instruction_language"][i] = pairs.instruction_language(text)
        if counts is not None:
            b.out["instruction_tokens"][i] = max((c[i] for c in counts if c[i] is not None), default=None)


def _score_structure(b: PairBatch) -> None:
    for k, i in enumerate(b.idx):
        s, t = b.src[k], b.tgt[k]
        b.out["phash_distance"][i], b.out["ssim"][i], b.out["changed_fraction"][i] = pairs.structure_scores(s, t)


def _image_embeddings(b: PairBatch) -> tuple[np.ndarray, np.ndarray] | None:
    if "emb" not in b.__dict__:
        clip = b.models.get("clip")
        b.emb = None if clip is None or not b.idx else (clip.embed_images(b.src), clip.embed_images(b.tgt))
    return b.emb


def _score_unrelated(b: PairBatch) -> None:
    """Structure scores, and the image-image CLIP cosine where CLIP is loaded (by ``direction``)."""
    _score_structure_once(b)
    emb = _image_embeddings(b)
    if emb is not None:
        for k, v in zip(b.idx, pairs.clip_cosine(*emb), strict=True):
            b.out["clip_cosine"][k] = float(v)


def _score_structure_once(b: PairBatch) -> None:
    """noop and unrelated read the same three scores: computed once per batch."""
    if not b.cache.get("structure"):
        b.cache["structure"] = True
        _score_structure(b)


def _score_direction(b: PairBatch) -> None:
    """InstructPix2Pix directional similarity where both captions exist (null otherwise)."""
    emb = _image_embeddings(b)
    if emb is None:
        return
    pos = [k for k, i in enumerate(b.idx) if b.out["source_caption"][i] and b.out["target_caption"][i]]
    if not pos:
        return
    clip = b.models["clip"]
    st = clip.embed_texts([b.out["source_caption"][b.idx[k]] for k in pos])
    tt = clip.embed_texts([b.out["target_caption"][b.idx[k]] for k in pos])
    d = pairs.directional_similarity(emb[0][pos], emb[1][pos], st, tt)
    for k, v in zip(pos, d, strict=True):
        b.out["directional_similarity"][b.idx[k]] = None if np.isnan(v) else float(v)


def _score_judge(b: PairBatch) -> None:
    j = b.cfg.scoring.judge
    if not j.url or not b.idx:
        return
    from .stage2_judge import judge_pairs  # only with a server configured

    got = judge_pairs(j, [b.out["id"][i] for i in b.idx], b.src, b.tgt,
                      [b.out["instruction_en"][i] or b.out["instruction_zh"][i] for i in b.idx])
    for i, (ins, con, err) in zip(b.idx, got, strict=True):
        b.out["judge_instruction"][i], b.out["judge_consistency"][i], b.out["judge_error"][i] = ins, con, err


def _score_key(b: PairBatch) -> None:
    for i in range(len(b.out["id"])):
        h = b.out["source_content_hash"][i]
        if h is not None:
            b.out["pair_key"][i] = pairs.pair_key(h, b.out["instruction_en"][i], b.out["instruction_zh"][i])


# --------------------------------------------------------------------------- rules
def _rule_resolution(side: str):
    return lambda v, th: ((v.f(f"{side}_short_side") < th.min_short_side)
                          | (v.f(f"{side}_aspect_ratio") > th.max_aspect_ratio))


def _rule_instruction(v: Cols, th) -> np.ndarray:
    lang = v.strings("instruction_language")
    empty = np.array([x is None for x in lang], bool)
    bad_lang = np.array([x is not None and x not in th.languages for x in lang], bool)
    return empty | bad_lang | (v.f("instruction_tokens") > th.max_tokens)


def _rule_noop(v: Cols, th) -> np.ndarray:
    return ((v.f("phash_distance") <= th.max_phash) & (v.f("ssim") >= th.min_ssim)
            & (v.f("changed_fraction") <= th.max_changed))


def _rule_unrelated(v: Cols, th) -> np.ndarray:
    clip = v.f("clip_cosine")
    return ((v.f("ssim") < th.max_ssim) & (v.f("phash_distance") >= th.min_phash)
            & (np.isnan(clip) | (clip < th.min_clip)))


def _collect_keys(v: Cols, cfg) -> dict[str, np.ndarray]:
    return {"id": v.strings("id"), "key": v.strings("pair_key")}


def _decide_pair_dedup(c: dict[str, np.ndarray], th, cfg):
    """Pairs with the same key (source content + normalised instruction): the smallest id survives."""
    order = np.lexsort((c["id"].astype(str), c["key"].astype(str)))
    keys, ids = c["key"][order], c["id"][order]
    first = np.r_[True, keys[1:] != keys[:-1]]
    survivor = ids[np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))]
    rejected = np.empty(len(ids), bool)
    dup_of = np.empty(len(ids), object)
    rejected[order], dup_of[order] = ~first, np.where(first, None, survivor)
    return rejected, {"dup_of": dup_of}


def _side_filters(Filter) -> dict:
    out = {}
    for s in SIDES:
        out[f"{s}_resolution"] = Filter((f"{s}_short_side", f"{s}_aspect_ratio"), None, rule=_rule_resolution(s),
                                        needs_image=False, section="resolution",
                                        plots=((f"{s}_short_side", "min_short_side", "min"),))
        out[f"{s}_nsfw"] = Filter((f"{s}_nsfw_score",), _score_nsfw(s), models=("nsfw",), section="nsfw",
                                  rule=lambda v, th, s=s: v.f(f"{s}_nsfw_score") > th.max_score,
                                  plots=((f"{s}_nsfw_score", "max_score", "max"),))
    return out


def pair_filters() -> dict:
    """The pair filters, by name (merged into ``curation.filters.FILTERS`` there)."""
    from .filters import Filter

    return {
        **_side_filters(Filter),
        "instruction": Filter(("instruction_language", "instruction_tokens"), _score_instruction, models=("tokens",),
                              rule=_rule_instruction, needs_image=False,
                              plots=(("instruction_tokens", "max_tokens", "max"),)),
        "noop": Filter(("phash_distance", "ssim", "changed_fraction"), _score_structure_once, rule=_rule_noop,
                       plots=(("ssim", "min_ssim", "min"), ("changed_fraction", "max_changed", "max"))),
        "unrelated": Filter(("clip_cosine",), _score_unrelated, rule=_rule_unrelated, reads=("ssim", "phash_distance"),
                            plots=(("ssim", "max_ssim", "max"),)),
        "direction": Filter(("directional_similarity",), _score_direction, models=("clip",),
                            rule=lambda v, th: v.f("directional_similarity") < th.min_similarity,
                            plots=(("directional_similarity", "min_similarity", "min"),)),
        "judge": Filter(("judge_instruction", "judge_consistency", "judge_error"), _score_judge,
                        rule=lambda v, th: ((v.f("judge_instruction") < th.min_instruction)
                                            | (v.f("judge_consistency") < th.min_consistency))),
        "pair_dedup": Filter(("pair_key",), _score_key, collect=_collect_keys, decide_global=_decide_pair_dedup,
                             candidates=("pair_key",), needs_image=False),
    }
