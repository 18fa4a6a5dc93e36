"""Stage 2 of Qwen-Image-2.0 §2.3: image-editing (TI2I) pairs on the shared stage engine.

The item is a pair (``curation.pair_readers.PAIR_ITEM_SCHEMA``); the worker decodes both images
once at the working size and runs the pair filters on them in chain order; the engine's
``commit_fragments`` (workers write, the driver commits), ``apply_decisions`` (rules from stored
scores, global duplicate-pair pass), ``rethreshold`` and report do the rest, unchanged. The pair
filters live in :data:`PAIR_FILTERS` (merged into ``curation.filters.FILTERS``); per-image checks
are one filter per side (``source_resolution`` / ``target_nsfw``, ...), so the ``reject_reason``
names the image, and both sides read one thresholds section (``Filter.section``).
Scores: ``curation.pairs`` (SYNTH's pure functions). Table: ``curation.stage2_schema``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from dataclasses import dataclass, field

import pyarrow as pa

from common.typed_config import ConfigError, build, read_yaml, set_dotted

from . import pairs
from .config import NsfwRule, ResolutionRule, Scoring, StageConfig
from .decode import decode
from .filters import FILTERS, MODELS
from .pair_readers import PairColumns, PairSource, expand_unit, read_pair_images, resolve_pairs
from .readers import unit_items, work_units
from .stage import written
from .stage2_filters import SIDES, PairBatch
from .stage2_schema import PAIR_SCORING_SCHEMA

PAIR_CHAIN = ("broken", "source_resolution", "target_resolution", "source_nsfw", "target_nsfw", "instruction",
              "noop", "unrelated", "direction", "judge", "pair_dedup")


# --------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class JudgeScoring:
    url: str | None = None
    """OpenAI-compatible server (``http://host:8000/v1``) of a VLM that judges each kept-so-far pair;
    null = the judge is off (its scores stay null and pass)."""
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Model name the server serves."""
    timeout_s: float = 60.0
    """Per-request read timeout; a failure is recorded in ``judge_error``, never fatal."""
    max_side: int = 512
    """Images are sent as JPEG with this long side."""
    max_attempts: int = 3
    """Counted attempts per pair (timeouts, 429/5xx, invalid JSON) through the captioning client."""
    backoff_s: float = 0.5
    """Base of the capped, jittered exponential backoff between attempts (``Retry-After`` wins)."""
    patience_s: float = 120.0
    """How long a batch's requests wait (breaker open, no attempt counted) for a server that stopped
    answering before its pairs get ``judge_error = server_gone``."""
    concurrency: int = 8
    """Requests in flight per scoring worker."""


@dataclass(frozen=True, kw_only=True)
class PairScoring(Scoring):
    judge: JudgeScoring = field(default_factory=JudgeScoring)


@dataclass(frozen=True, kw_only=True)
class InstructionRule:
    max_tokens: int = 512
    """Reject instructions longer than this many condition-encoder tokens (en and zh each)."""
    languages: tuple[str, ...] = ("en", "zh", "mixed")
    """Accepted ``instruction_language`` values; no letters at all is ``empty``, always rejected."""


@dataclass(frozen=True, kw_only=True)
class NoopRule:
    max_phash: int = pairs.DEFAULTS["noop_max_phash"]
    """No-op when pHash distance <= this AND ssim >= min_ssim AND changed_fraction <= max_changed."""
    min_ssim: float = pairs.DEFAULTS["noop_min_ssim"]
    """See max_phash (curation/PAIRS.md calibration)."""
    max_changed: float = pairs.DEFAULTS["noop_max_changed"]
    """See max_phash."""


@dataclass(frozen=True, kw_only=True)
class UnrelatedRule:
    max_ssim: float = pairs.DEFAULTS["unrelated_max_ssim"]
    """Unrelated when ssim < this AND pHash distance >= min_phash AND (no CLIP or clip_cosine < min_clip)."""
    min_phash: int = pairs.DEFAULTS["unrelated_min_phash"]
    """See max_ssim."""
    min_clip: float = pairs.DEFAULTS["unrelated_min_clip"]
    """See max_ssim (InstructPix2Pix's image-image CLIP filter)."""


@dataclass(frozen=True, kw_only=True)
class DirectionRule:
    min_similarity: float = pairs.DEFAULTS["min_directional"]
    """Reject when the directional CLIP similarity is below this (null: no captions, passes)."""


@dataclass(frozen=True, kw_only=True)
class JudgeRule:
    min_instruction: float = 5.0
    """Reject when the judge's instruction-following score (0..10) is below this (null passes)."""
    min_consistency: float = 5.0
    """Reject when the judge's consistency score (0..10) is below this (null passes)."""


@dataclass(frozen=True, kw_only=True)
class PairDedupRule:
    keep: str = "smallest_id"
    """Survivor of a group of pairs with the same source and instruction: the smallest id."""


@dataclass(frozen=True, kw_only=True)
class PairThresholds:
    resolution: ResolutionRule = field(default_factory=ResolutionRule)
    nsfw: NsfwRule = field(default_factory=NsfwRule)
    instruction: InstructionRule = field(default_factory=InstructionRule)
    noop: NoopRule = field(default_factory=NoopRule)
    unrelated: UnrelatedRule = field(default_factory=UnrelatedRule)
    direction: DirectionRule = field(default_factory=DirectionRule)
    judge: JudgeRule = field(default_factory=JudgeRule)
    pair_dedup: PairDedupRule = field(default_factory=PairDedupRule)


@dataclass(frozen=True, kw_only=True)
class PairStageConfig(StageConfig):
    stage: str = "stage2"
    filters: tuple[str, ...] = PAIR_CHAIN
    batch_size: int = 64
    source: str = "edit:pairs"
    """``source`` tag written on every row (mixture quotas): ``edit:<dataset name>``."""
    scoring: PairScoring = field(default_factory=PairScoring)
    thresholds: PairThresholds = field(default_factory=PairThresholds)


def load_pair_config(path: str | None = None, overrides: dict | None = None) -> PairStageConfig:
    data = read_yaml(path) if path else {}
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    cfg = build(PairStageConfig, data)
    if not cfg.filters or cfg.filters[0] != "broken":
        raise ConfigError(f"filters = {list(cfg.filters)}: the chain must start with 'broken'")
    for i, name in enumerate(cfg.filters):
        if name not in PAIR_CHAIN:
            raise ConfigError(f"filters[{i}] = {name!r}: not a pair filter (one of: {', '.join(PAIR_CHAIN)})")
    for path_, v, lo, hi in (("batch_size", cfg.batch_size, 1, 65536),
                             ("scoring.working_size", cfg.scoring.working_size, 32, 16384),
                             ("thresholds.instruction.max_tokens", cfg.thresholds.instruction.max_tokens, 1, 10**6),
                             ("thresholds.noop.min_ssim", cfg.thresholds.noop.min_ssim, -1, 1),
                             ("thresholds.unrelated.max_ssim", cfg.thresholds.unrelated.max_ssim, -1, 1),
                             ("thresholds.nsfw.max_score", cfg.thresholds.nsfw.max_score, 0, 1)):
        if not lo <= v <= hi:
            raise ConfigError(f"{path_} = {v} is out of range [{lo}, {hi}]")
    if not cfg.source or ":" not in cfg.source and cfg.source != "web":
        raise ConfigError(f"source = {cfg.source!r}: expected web or <kind>:<name>, e.g. edit:magicbrush")
    return cfg


def pair_models(cfg: PairStageConfig, active: tuple[str, ...]) -> tuple[str, ...]:
    need = [m for n in active for m in FILTERS[n].models]
    return tuple(dict.fromkeys(need))


# --------------------------------------------------------------------------- the worker
class PairScorer:
    """Ray Data callable over work units (``readers.work_units``, packed by ``run.unit_dataset``):
    read each unit's pairs not yet committed, decode both images of each pair once, run the active pair filters, write one Lance
    fragment per ``batch_size`` pairs, return the fragments' metadata (the engine's
    ``commit_fragments`` commits). Reading in the scoring task keeps the image bytes out of Ray's
    object store (one copy fewer per image) and spreads one big file over every core."""

    def __init__(self, cfg: PairStageConfig, skipped: tuple[str, ...], active: tuple[str, ...],
                 output_uri: str, score_hash: str, storage_options: dict | None = None,
                 source: PairSource | None = None, done_ref=None):
        import cv2
        import ray

        self.cfg, self.skipped, self.active, self.uri = cfg, skipped, active, output_uri
        self.score_hash, self.storage_options, self.source = score_hash, storage_options, source
        self.done = ray.get(done_ref) if done_ref is not None else None
        threads = max(1, int(cfg.cpus_per_worker))
        cv2.setNumThreads(threads)  # its pthread pool would take every core in every worker
        if "clip" in pair_models(cfg, active):
            import torch

            torch.set_num_threads(threads)
        self.models = {m: MODELS[m](cfg, "cpu") for m in pair_models(cfg, active)}
        for m in self.models.values():
            m.setup()

    def score(self, batch: pa.Table) -> pa.Table:
        s = self.cfg.scoring
        n = batch.num_rows
        rows = batch.to_pylist()
        out = {f.name: [None] * n for f in PAIR_SCORING_SCHEMA}
        now = dt.datetime.now(dt.UTC)
        idx, src, tgt = [], [], []
        for i, r in enumerate(rows):
            for c in ("id", "uri", "instruction_en", "instruction_zh", "source_caption", "target_caption",
                      "category"):
                out[c][i] = r[c]
            out["source"][i], out["stage"][i], out["score_config_hash"][i] = self.cfg.source, self.cfg.stage, self.score_hash
            out["skipped"][i], out["scored_at"][i] = list(self.skipped), now
            if r["error"]:
                out["error"][i] = r["error"]
                continue
            sdata, tdata, err = read_pair_images(r)
            out["image"][i], out["target_image"][i] = sdata, tdata
            errors, dec = [err] if err else [], {}
            for side, data in zip(SIDES, (sdata, tdata), strict=True):
                if data is None:
                    continue
                d = decode(data, s.working_size, s.max_pixels)
                out[f"{side}_content_hash"][i] = d.content_hash
                if d.error:
                    errors.append(f"{side}: {d.error}")  # the reason names the image
                    continue
                out[f"{side}_width"][i], out[f"{side}_height"][i] = d.width, d.height
                out[f"{side}_short_side"][i] = min(d.width, d.height)
                out[f"{side}_aspect_ratio"][i] = max(d.width, d.height) / max(1, min(d.width, d.height))
                dec[side] = d.image
            if errors:
                out["error"][i] = "; ".join(errors)
                continue
            idx.append(i)
            src.append(dec["source"])
            tgt.append(dec["target"])
        b = PairBatch(out, idx, src, tgt, self.models, self.cfg, {})
        for name in self.active:
            fn = FILTERS[name].score
            if fn is not None:
                fn(b)
        return pa.Table.from_pydict(out, schema=PAIR_SCORING_SCHEMA)

    def write(self, items: pa.Table) -> list:
        import lance.fragment

        return lance.fragment.write_fragments(self.score(items), self.uri, schema=PAIR_SCORING_SCHEMA,
                                              storage_options=self.storage_options)

    def __call__(self, units: dict) -> pa.Table:
        read = lambda unit, size, part: expand_unit(self.source, str(unit), size, part)  # noqa: E731
        frags = [f for parts in units["parts"] for items in unit_items(str(parts), read, self.done, self.cfg.batch_size)
                 for f in self.write(items)]
        return written(frags)


_TASK: dict[tuple, PairScorer] = {}


def pair_score_task(units: dict, **kw) -> pa.Table:
    """Task entry point (no heavy model): the scorer is built once per worker process."""
    ref = kw["done_ref"]
    key = (kw["output_uri"], kw["score_hash"], kw["source"], ref.hex() if ref is not None else None)  # a rerun anew
    if key not in _TASK:
        _TASK.clear()
        _TASK[key] = PairScorer(**kw)
    return _TASK[key](units)


# --------------------------------------------------------------------------- the driver
def run_pair_stage(pairs_spec: str, output: str, cfg: PairStageConfig, skipped: tuple[str, ...] = (),
                   commit_every: int = 10_000, columns: PairColumns | None = None, progress: bool = True,
                   report: bool = True, storage_options: dict | None = None, num_cpus: int | None = None):
    """Score every pair of ``pairs_spec`` into ``output`` (resuming: ids already committed are not
    scored again), then decide with the engine's decision pass. One row per input pair."""
    import lance
    import ray
    from ray.data import DataContext

    from .decide import apply_decisions
    from .run import RunSummary, _open, check_output, commit_fragments

    t0 = time.time()
    if commit_every < 1:
        raise ConfigError(f"--commit-every must be >= 1, got {commit_every}")
    source = resolve_pairs(pairs_spec, columns)  # missing columns stop here, named
    active = tuple(n for n in cfg.filters if n not in skipped and n != "broken")
    if "unrelated" in active and "noop" not in active:
        active = ("noop",) + active  # unrelated reads the structure scores
    models = {m: MODELS[m](cfg, "cpu") for m in pair_models(cfg, active)}
    for m in models.values():
        m.preflight()  # a missing model names its setting before any data is read
    score_hash = cfg.score_hash(skipped)
    existing = check_output(output, cfg, score_hash, storage_options, schema=PAIR_SCORING_SCHEMA)
    meta = {b"stage": cfg.stage.encode(), b"score_config_hash": score_hash.encode(),
            b"skipped": json.dumps(list(skipped)).encode(), b"store_image": b"source",
            b"filters": json.dumps(list(cfg.filters)).encode(), b"pairs": pairs_spec.encode()}
    if _open(output, storage_options) is None:
        schema = PAIR_SCORING_SCHEMA.with_metadata(meta)
        lance.write_dataset(schema.empty_table(), output, schema=schema, mode="create",
                            storage_options=storage_options)
    ds_out = lance.dataset(output, storage_options=storage_options)
    done = ds_out.to_table(columns=["id"]).column("id").combine_chunks() if existing else None
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, log_to_driver=progress, include_dashboard=False, ignore_reinit_error=True)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars, ctx.verbose_progress = progress, False
    # One task per work unit (about batch_size pairs: Parquet row groups, a Lance row range, a
    # JSON-lines file, tar member ranges) reads, scores and writes it (the image stages' runner).
    from .run import unit_dataset

    units, _ = unit_dataset(work_units(source, cfg.batch_size), cfg.batch_size)
    kwargs = {"cfg": cfg, "skipped": skipped, "active": active, "output_uri": output, "score_hash": score_hash,
              "storage_options": storage_options, "source": source,
              "done_ref": ray.put(done) if done is not None and len(done) else None}
    if set(models) - {"tokens"}:
        workers = cfg.num_workers or max(1, int(ray.available_resources().get("CPU", 1) // max(cfg.cpus_per_worker, 1e-3)))
        scored = units.map_batches(PairScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                                   num_cpus=cfg.cpus_per_worker, fn_constructor_kwargs=kwargs)
    else:
        scored = units.map_batches(pair_score_task, batch_size=1, num_cpus=cfg.cpus_per_worker, fn_kwargs=kwargs)
    t_score = time.time()
    _, scored_now = commit_fragments(scored, output, ds_out.version, commit_every, storage_options, cfg.stage)
    scoring_seconds = time.time() - t_score
    counts, total, version = apply_decisions(output, cfg, storage_options)
    summary = RunSummary(output, version, total, scored_now, time.time() - t0, scoring_seconds, counts)
    if report:
        from .report import write_report

        summary.report = write_report(output, cfg, summary, storage_options)
    return summary


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None, doc: str = "") -> int:
    import argparse

    from .cli import CONFIGS, execute
    from .config import parse_skip

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", help="edit pairs: .parquet / .jsonl file or folder, .lance table, .tar shards")
    ap.add_argument("--output", required=True, help="output Lance table URI")
    ap.add_argument("--config", default=str(CONFIGS / "stage2.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--source", help="source tag of these pairs (config 'source'), e.g. edit:magicbrush")
    ap.add_argument("--skip", help="comma-separated filters to skip, e.g. source_nsfw,target_nsfw,direction")
    ap.add_argument("--commit-every", type=int, default=10_000)
    ap.add_argument("--rethreshold", action="store_true", help="re-decide from stored scores (no --pairs)")
    for f in dataclasses.fields(PairColumns):
        ap.add_argument(f"--{f.name.replace('_', '-')}-column", dest=f"col_{f.name}")
    ap.add_argument("--num-cpus", type=int)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args(argv)

    def run(cfg):
        if not a.pairs:
            raise ConfigError("--pairs is required (or pass --rethreshold)")
        cols = PairColumns(**{f.name: getattr(a, f"col_{f.name}") for f in dataclasses.fields(PairColumns)})
        return run_pair_stage(a.pairs, a.output, cfg, parse_skip(a.skip, cfg), a.commit_every, cols,
                              progress=not a.no_progress, report=not a.no_report, num_cpus=a.num_cpus)

    return execute(a, lambda ov: load_pair_config(a.config, ov), run, {"source": a.source} if a.source else None)


# --------------------------------------------------------------------------- sample pairs (tests, benchmark)
def write_sample_pairs(path: str, size: int = 512, seed: int = 0, bad: bool = True) -> dict[str, str | None]:
    """A Parquet file of edit pairs made from the bundled real photos (``curation.pairs``' edits at
    long side ``size``): per photo a local edit, a global style edit, a no-op and an unrelated pair;
    with ``bad``, also a broken target, a small source, an empty, a French and a duplicate
    instruction, a Chinese one. Returns {key: the reject_reason the default rules give (None = kept)}."""
    import io

    import pyarrow.parquet as pq

    from .samples import real_photos

    photos = [(n, im.resize((im.width * size // max(im.size), im.height * size // max(im.size))))
              for n, im in real_photos() if n in ("astronaut", "coffee", "chelsea", "china", "rocket", "motorcycle_left")]

    def jpg(im, q=92):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=q)
        return buf.getvalue()

    rows, want = [], {}
    pick = {"paste_object": ("local", "add a coloured ball"), "sepia": ("global", "make it look like an old sepia photo"),
            "jpeg_q50": ("noop", "turn the sky red"), "unrelated": ("unrelated", "add a hat")}
    for kind, edit, src, tgt in pairs.calibration_pairs(photos, seed):
        name = "unrelated" if kind == "unrelated" else edit
        if name not in pick:
            continue
        key = f"{len(rows):03d}_{kind}_{edit}"
        rows.append({"key": key, "source_image": jpg(src), "target_image": jpg(tgt), "instruction": pick[name][1],
                     "source_caption": "a photo", "target_caption": f"a photo, {pick[name][1]}", "edit_type": kind})
        want[key] = {"noop": "noop", "unrelated": "unrelated"}.get(kind)
    if bad:
        from PIL import ImageDraw

        def ball(im, colour):
            out = im.copy()
            w, h = im.size
            ImageDraw.Draw(out).ellipse((w // 4, h // 4, w // 2, h // 2), fill=colour)
            return out

        src = photos[0][1]
        tgt, tgt2 = ball(src, (220, 30, 30)), ball(src, (30, 30, 220))
        cut = jpg(tgt)
        extra = [("broken_target", jpg(src), cut[: len(cut) // 2], "add a red ball", "broken"),  # truncated mid-scan
                 ("small_source", jpg(src.resize((200, 200))), jpg(tgt), "add a red ball", "source_resolution"),
                 ("empty_instruction", jpg(src), jpg(tgt), " 1 2 3 ", "instruction"),
                 ("french_instruction", jpg(src), jpg(tgt), "ajoute une balle rouge au centre", "instruction"),
                 ("chinese_instruction", jpg(src), jpg(tgt), "在图片中间加一个红色的球", None),
                 ("dup_a", jpg(src), jpg(tgt), "Add a red ball.", None),
                 ("dup_b", jpg(src), jpg(tgt2), "add a  red ball", "pair_dedup")]
        for key, s, t, ins, why in extra:
            rows.append({"key": key, "source_image": s, "target_image": t, "instruction": ins, "source_caption": None,
                         "target_caption": None, "edit_type": "bad"})
            want[key] = why
    pq.write_table(pa.Table.from_pylist(rows), path)
    return want
