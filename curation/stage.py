"""The scoring worker of every stage: decode each row once (when a filter of the stage needs pixels),
run the stage's filters on that image in chain order in the same Ray Data batch, write the scored
rows as a Lance fragment, and hand the driver only the fragment's metadata to commit (workers write,
the driver commits — NeMo Curator's Lance writer).

Nothing here decides keep/reject: see :mod:`curation.decide`. Which filters run, which columns are
copied from a previous stage's table and which models load is the driver's :class:`Plan`.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from .config import StageConfig
from .decode import decode, encode_jpeg
from .filters import FILTERS, MODELS, ROTATION_DETECTORS, Batch
from .readers import read_bytes, read_json_caption, unit_items
from .schema import EMBEDDING, scoring_schema

# Columns of a previous stage's row that describe the file itself, copied as they are.
FILE_COLUMNS = ("content_hash", "width", "height", "format", "exif_orientation", "error", "source")
PARENT_PREFIX = "parent."


@dataclass(frozen=True)
class Plan:
    """What the workers of one run do, decided once in the driver."""

    active: tuple[str, ...]
    """Filters whose score functions run (the chain minus skipped and reused ones)."""
    carry: tuple[str, ...] = ()
    """Columns copied from the parent table (chained stage): file columns + reused scores."""
    models: tuple[str, ...] = ()
    """Shared models to load (``curation.filters.MODELS``)."""
    decode: bool = True
    """Decode the image (some active filter needs pixels, or the input is not a curated table)."""
    grey: bool = False
    """Decode to luma only (no active filter reads colour and no colour image is stored)."""
    embed_dim: int = 768
    """Width of ``clip_embedding``."""
    reused: tuple[str, ...] = ()
    """Filters whose scores all come from the parent (recorded in the summary)."""
    column_hashes: dict[str, str] = field(default_factory=dict)
    """Score column -> identity hash of what this run writes (table metadata)."""

    @property
    def schema(self) -> pa.Schema:
        return scoring_schema(self.embed_dim)


def build_models(cfg: StageConfig, plan: Plan, device: str = "cpu") -> dict:
    return {name: MODELS[name](cfg, device) for name in plan.models}


def preflight(cfg: StageConfig, plan: Plan) -> dict[str, int]:
    """Load every model the run needs once in the driver: a missing or broken model stops the job
    here, with a message naming the setting, before any data is touched. Returns facts the plan
    needs ({"embed_dim": D} when CLIP loads)."""
    facts = {}
    for name, model in build_models(cfg, plan).items():
        model.preflight()
        if name == "clip":
            facts["embed_dim"] = model.embed_dim
        if name == "aesthetic":
            model.setup()  # a small MLP: its input width is checked against the CLIP's
            facts["aesthetic_dim"] = model.dim
    return facts


def _read(path: str | None) -> tuple[bytes | None, str | None]:
    try:
        return read_bytes(path), None  # a local path or an object-store URI (common.storage)
    except OSError as e:
        return None, f"unreadable file: {type(e).__name__}: {e.strerror or e}"


def _read_caption(path: str) -> str | None:
    raw, _ = _read(path)
    if raw is None:
        return None
    if path.lower().endswith(".json"):
        return read_json_caption(raw)
    return raw.decode("utf-8", errors="replace").strip()


def _embedding_array(values: list, dim: int) -> pa.Array:
    """Per-row vectors (or None) -> FixedSizeList<float16, dim>."""
    flat = np.zeros((len(values), dim), np.float16)
    mask = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        if v is None:
            mask[i] = True
        else:
            flat[i] = np.asarray(v, np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float16()), dim, mask=pa.array(mask))


class StageScorer:
    """Ray Data callable class: one per actor; models load in ``__init__`` (once per actor)."""

    def __init__(self, cfg: StageConfig, skipped: tuple[str, ...], plan: Plan, output_uri: str | None,
                 score_hash: str, storage_options: dict | None = None, read=None, done_ref=None):
        import ray

        self.cfg, self.skipped, self.plan, self.uri, self.score_hash = cfg, skipped, plan, output_uri, score_hash
        self.storage_options, self.read = storage_options, read
        self.done = ray.get(done_ref) if done_ref is not None else None  # ids committed before (resume)
        self.schema = plan.schema
        device = "cpu"
        if set(plan.models) & {"clip", "aesthetic"}:  # torch is imported only where a torch model runs
            import torch

            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
            device = "cuda" if cfg.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        if {"quality", "compression"} & set(plan.active):
            import cv2  # its pthread pool takes every core: one per worker, as torch above

            cv2.setNumThreads(max(1, int(cfg.cpus_per_worker)))
        self.models = build_models(cfg, plan, device)
        for m in self.models.values():
            m.setup()
        self.cache: dict = {}
        if "rotation" in plan.active:
            self.cache["rotation"] = ROTATION_DETECTORS[cfg.scoring.rotation.detector](self.models,
                                                                                       cfg.scoring.rotation)

    # ------------------------------------------------------------------ scoring
    def score(self, batch: pa.Table) -> pa.Table:
        s, plan = self.cfg.scoring, self.plan
        n = batch.num_rows
        col = {name: batch.column(name).to_pylist() for name in batch.column_names}
        out: dict[str, list] = {f.name: [None] * n for f in self.schema}
        out["id"], out["uri"] = col["id"], col["uri"]
        for c in plan.carry:
            out[c] = list(col[PARENT_PREFIX + c])
        if s.category.column and "balance" in plan.active:
            out["category"] = [None if v is None else str(v) for v in col[PARENT_PREFIX + s.category.column]]
        now = dt.datetime.now(dt.UTC)
        datas: list[bytes | None] = [None] * n
        idx: list[int] = []
        images: list | None = [] if plan.decode else None
        grids: list = []
        # Blockiness reads the luma at full scale (the file's own 8x8 grid), not the working image.
        grid_crop = 0
        if "compression" in plan.active:
            from .quality import BLOCKINESS_CROP as grid_crop
        for i in range(n):
            caption = col["caption"][i]
            if caption is None and col["caption_path"][i]:
                caption = _read_caption(col["caption_path"][i])
            out["caption"][i] = caption
            out["stage"][i], out["score_config_hash"][i] = self.cfg.stage, self.score_hash
            out["source"][i] = out["source"][i] or self.cfg.source  # a parent row's tag is kept
            out["skipped"][i], out["scored_at"][i] = list(self.skipped), now
            if col["error"][i]:
                out["error"][i] = col["error"][i]
                continue
            data, err = (col["data"][i], None) if col["data"][i] is not None else _read(col["path"][i])
            if data is None:
                out["error"][i] = err
                continue
            datas[i] = data
            if not plan.decode:
                if out["error"][i] is None:
                    idx.append(i)
                if s.store_image == "source":
                    out["image"][i] = data
                continue
            d = decode(data, s.working_size, s.max_pixels, grid_crop, plan.grey)
            out["content_hash"][i], out["error"][i] = d.content_hash, d.error
            if d.error:
                continue
            out["width"][i], out["height"][i] = d.width, d.height
            out["format"][i], out["exif_orientation"][i] = d.format, d.orientation
            images.append(d.image)
            grids.append(d.grid)
            idx.append(i)
            if s.store_image == "source":
                out["image"][i] = data
            elif s.store_image == "normalized":
                out["image"][i] = encode_jpeg(d.image, s.store_quality)

        b = Batch(out, idx, images, datas, self.models, self.cfg, self.cache)
        b.grids = grids
        for name in plan.active:
            fn = FILTERS[name].score
            if fn is not None:
                fn(b)
        emb = _embedding_array(out.pop(EMBEDDING), plan.embed_dim)
        t = pa.Table.from_pydict({k: out[k] for k in self.schema.names if k != EMBEDDING},
                                 schema=pa.schema([f for f in self.schema if f.name != EMBEDDING]))
        pos = self.schema.get_field_index(EMBEDDING)
        return t.add_column(pos, self.schema.field(EMBEDDING), emb)

    # ------------------------------------------------------------------ Ray Data entry point
    def write(self, items: pa.Table) -> list:
        import lance.fragment

        return lance.fragment.write_fragments(self.score(items), self.uri, schema=self.schema,
                                              storage_options=self.storage_options)

    def units(self, parts: str) -> Iterator[pa.Table]:
        """The not-yet-committed items of one work unit (``readers.unit_items``)."""
        return unit_items(parts, self.read, self.done, self.cfg.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score and write a batch of items (a folder listing: paths, read here) or of work units
        (column ``parts``: read here by ``self.read``, so image bytes never pass through Ray's
        object store and one big shard, file or fragment is scored by many tasks)."""
        if "parts" in batch.column_names:
            frags = [f for parts in batch.column("parts").to_pylist() for items in self.units(parts)
                     for f in self.write(items)]
        else:
            frags = self.write(batch)
        return written(frags)


def written(frags: list) -> pa.Table:
    """What a scoring call returns for the Lance fragments it wrote: only metadata travels back; the
    driver (``run.commit_fragments``) commits them every --commit-every rows."""
    return pa.table({
        "fragment": pa.array([json.dumps(f.to_json()) for f in frags], pa.string()),
        "rows": pa.array([f.num_rows for f in frags], pa.int64()),
    })


# Per-process cache for the task path: a Ray worker process that runs several scoring tasks builds
# its scorer once, as an actor would, without waiting for dedicated actor processes.
_TASK_SCORERS: dict[tuple, StageScorer] = {}


def score_task(batch: pa.Table, cfg: StageConfig, skipped: tuple[str, ...], plan: Plan, output_uri: str,
               score_hash: str, storage_options: dict | None = None, read=None, done_ref=None) -> pa.Table:
    """Ray Data task entry point for runs whose models are light (a tokenizer at most): Ray's
    prestarted workers pick batches up at once, where an actor pool first spawns and imports."""
    key = (output_uri, score_hash, done_ref.hex() if done_ref is not None else None)  # a rerun anew
    if key not in _TASK_SCORERS:
        _TASK_SCORERS.clear()
        _TASK_SCORERS[key] = StageScorer(cfg, skipped, plan, output_uri, score_hash, storage_options,
                                         done_ref=done_ref)
    scorer = _TASK_SCORERS[key]
    scorer.read = read  # this run's input (the cached scorer may have served another run's)
    return scorer(batch)


def needs_actors(plan: Plan) -> bool:
    """Model-backed scorers (CLIP, NudeNet, the aesthetic head) load once per actor; without them
    tasks are cheaper."""
    return bool(set(plan.models) - {"tokens"})
