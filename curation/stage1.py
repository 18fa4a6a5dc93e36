"""The stage-1 scoring worker: decode once, run every scorer of the chain on that decoded image in
the same Ray Data batch, write the scored rows as a Lance fragment, and hand the driver only the
fragment's metadata to commit (workers write, the driver commits — NeMo Curator's Lance writer).

Nothing here decides keep/reject: see :mod:`curation.decide`.
"""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa

from .config import StageConfig
from .decode import decode, encode_jpeg
from .readers import read_json_caption
from .schema import SCORING_SCHEMA
from .scorers import (
    ClipRotationDetector,
    ClipScorer,
    NsfwScorer,
    TokenCounter,
    grey_entropy,
    noise_score,
    phash64,
)

# Rotation detectors by config name (``scoring.rotation.detector``): a plain dict of presets. A
# detector is built from the loaded scorers and is called as ``detector(images, captions) ->
# (turns, probabilities_not_upright)``; add one here to plug in another model.
ROTATION_DETECTORS = {
    "clip": lambda models, cfg: ClipRotationDetector(models["clip"], cfg) if "clip" in models else None,
    "none": lambda models, cfg: None,
}


def build_model_scorers(cfg: StageConfig, skipped: tuple[str, ...], device: str = "cpu") -> dict:
    """The model-backed scorers this run needs, constructed (cheap) but not loaded."""
    s = cfg.scoring
    out: dict = {}
    if "nsfw" not in skipped:
        out["nsfw"] = NsfwScorer(s.nsfw_model)
    if "clip" not in skipped:
        out["clip"] = ClipScorer(s.clip, device)
    if "token_length" not in skipped:
        out["tokens"] = TokenCounter(s.tokenizer)
    return out


def preflight(cfg: StageConfig, skipped: tuple[str, ...]) -> None:
    """Load every configured model once in the driver: a missing or broken model stops the job
    here, with a message naming the setting, before any data is touched."""
    for scorer in build_model_scorers(cfg, skipped).values():
        scorer.preflight()


def _read(path: str | None) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return None, f"unreadable file: {type(e).__name__}: {e.strerror or e}"


def _read_caption(path: str) -> str | None:
    raw, _ = _read(path)
    if raw is None:
        return None
    if path.lower().endswith(".json"):
        return read_json_caption(raw)
    return raw.decode("utf-8", errors="replace").strip()


class Stage1Scorer:
    """Ray Data callable class: one per actor; models load in ``__init__`` (once per actor)."""

    def __init__(self, cfg: StageConfig, skipped: tuple[str, ...], output_uri: str | None,
                 score_hash: str, storage_options: dict | None = None):
        self.cfg, self.skipped, self.uri, self.score_hash = cfg, skipped, output_uri, score_hash
        self.storage_options = storage_options
        device = "cpu"
        if "clip" not in skipped:  # torch is imported only by actors that run a torch model
            import torch

            torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
            device = "cuda" if cfg.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu"
        self.models = build_model_scorers(cfg, skipped, device)
        for m in self.models.values():
            m.setup()
        rot = cfg.scoring.rotation
        self.rotation = (None if "rotation" in skipped
                         else ROTATION_DETECTORS[rot.detector](self.models, rot))

    # ------------------------------------------------------------------ scoring
    def score(self, batch: pa.Table) -> pa.Table:
        s, sk = self.cfg.scoring, self.skipped
        n = batch.num_rows
        col = {name: batch.column(name).to_pylist() for name in batch.column_names}
        out: dict[str, list] = {f.name: [None] * n for f in SCORING_SCHEMA}
        out["id"], out["uri"] = col["id"], col["uri"]
        now = dt.datetime.now(dt.UTC)
        images, idx = [], []
        for i in range(n):
            caption = col["caption"][i]
            if caption is None and col["caption_path"][i]:
                caption = _read_caption(col["caption_path"][i])
            out["caption"][i] = caption
            out["stage"][i], out["score_config_hash"][i] = self.cfg.stage, self.score_hash
            out["skipped"][i], out["scored_at"][i] = list(sk), now
            if col["error"][i]:
                out["error"][i] = col["error"][i]
                continue
            data, err = (col["data"][i], None) if col["data"][i] is not None else _read(col["path"][i])
            if data is None:
                out["error"][i] = err
                continue
            d = decode(data, s.working_size, s.max_pixels)
            out["content_hash"][i], out["error"][i] = d.content_hash, d.error
            if d.error:
                continue
            out["width"][i], out["height"][i] = d.width, d.height
            out["format"][i], out["exif_orientation"][i] = d.format, d.orientation
            images.append(d.image)
            idx.append(i)
            if s.store_image == "source":
                out["image"][i] = data
        captions = [out["caption"][i] for i in idx]

        if self.rotation is not None and images:
            preds, probs = self.rotation(images, captions)
            for k, i in enumerate(idx):
                out["rotation_pred"][i], out["rotation_score"][i] = preds[k], probs[k]
        for k, i in enumerate(idx):
            w, h = out["width"][i], out["height"][i]
            if "resolution" not in sk:
                out["short_side"][i], out["aspect_ratio"][i] = min(w, h), max(w, h) / max(1, min(w, h))
            grey = images[k].convert("L")
            if "dedup" not in sk:
                out["phash"][i] = phash64(grey)
            if "entropy" not in sk:
                out["entropy"][i], out["noise"][i] = grey_entropy(grey), noise_score(images[k])
            if s.store_image == "normalized":
                out["image"][i] = encode_jpeg(images[k], s.store_quality)
        if "nsfw" in self.models and images:
            for k, v in enumerate(self.models["nsfw"](images)):
                out["nsfw_score"][idx[k]] = v
        if "clip" in self.models and images:
            for k, v in enumerate(self.models["clip"].similarity(images, captions)):
                out["clip_score"][idx[k]] = v
        if "tokens" in self.models:
            # Token length needs only the caption, so broken images get a count too.
            for i, v in enumerate(self.models["tokens"](out["caption"])):
                out["token_count"][i] = v
        return pa.Table.from_pydict(out, schema=SCORING_SCHEMA)

    # ------------------------------------------------------------------ Ray Data entry point
    def __call__(self, batch: pa.Table) -> pa.Table:
        import lance.fragment

        rows = self.score(batch)
        frags = lance.fragment.write_fragments(rows, self.uri, schema=SCORING_SCHEMA,
                                               storage_options=self.storage_options)
        # Only metadata travels back; the driver commits these fragments every --commit-every rows.
        return pa.table({
            "fragment": pa.array([json.dumps(f.to_json()) for f in frags], pa.string()),
            "rows": pa.array([f.num_rows for f in frags], pa.int64()),
        })


# Per-process cache for the task path: a Ray worker process that runs several scoring tasks builds
# its scorer (tokenizer) once, as an actor would, without waiting for dedicated actor processes.
_TASK_SCORERS: dict[tuple, Stage1Scorer] = {}


def score_task(batch: pa.Table, cfg: StageConfig, skipped: tuple[str, ...], output_uri: str,
               score_hash: str, storage_options: dict | None = None) -> pa.Table:
    """Ray Data task entry point for runs without torch/ONNX models (model-free chain): Ray's
    prestarted workers pick batches up at once, where an actor pool first spawns and imports."""
    key = (output_uri, score_hash)
    if key not in _TASK_SCORERS:
        _TASK_SCORERS.clear()
        _TASK_SCORERS[key] = Stage1Scorer(cfg, skipped, output_uri, score_hash, storage_options)
    return _TASK_SCORERS[key](batch)


def needs_actors(skipped: tuple[str, ...]) -> bool:
    """Model-backed scorers (CLIP, NudeNet) load once per actor; without them tasks are cheaper."""
    return "clip" not in skipped or "nsfw" not in skipped
