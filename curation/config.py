"""Typed, frozen stage configs, validated at load — one dataclass for every curation stage.

A stage names its filters in order (``filters``: the report's order for that stage, keys of
:data:`curation.filters.FILTERS`) and its working size; the rest has two halves, kept apart on purpose:

* ``scoring`` — what decides the *scores* (working size, models, detector). Changing it means
  rescoring; its hash is stored on every row as ``score_config_hash``.
* ``thresholds`` — what decides ``keep``/``reject_reason`` from the stored scores. Changing it only
  needs ``--rethreshold``; its hash is stored as ``decided_config_hash``.

Unknown or misspelt keys, wrong types and out-of-range values raise :class:`ConfigError` (one loader
for every job: :mod:`common.typed_config`) naming the field (``thresholds.entropy.min_entropy``),
before any work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from common.typed_config import ConfigError, build, read_yaml, set_dotted

# The report's stage-1 chain, in its order (Qwen-Image-2.0 §2.3): the default ``filters``. The first
# failing filter is the row's reject_reason, so this order is part of the output's meaning.
STAGE1_CHAIN = ("broken", "resolution", "dedup", "nsfw", "rotation", "entropy", "clip", "token_length")


# --------------------------------------------------------------------------- scoring settings
@dataclass(frozen=True, kw_only=True)
class ClipModel:
    model: str = "ViT-L-14"
    """open_clip architecture name (``open_clip.list_models()``)."""
    weights: str | None = None
    """Local checkpoint path, or an open_clip pretrained tag / hub id resolvable on the cluster."""
    model_config: str | None = None
    """Optional JSON file with a custom open_clip architecture (registered before loading)."""
    batch_size: int = 64
    """Images per forward pass."""

    def identity(self) -> dict:
        """What decides the embeddings (batch size does not): the key for reusing stored ones."""
        return {"model": self.model, "weights": self.weights, "model_config": self.model_config}


@dataclass(frozen=True, kw_only=True)
class RotationDetector:
    detector: str = "clip"
    """``clip`` (zero-shot over the 4 rotations with the stage's CLIP model; off when ``--skip
    clip``) or ``none`` (EXIF orientation only, which is always applied)."""


@dataclass(frozen=True, kw_only=True)
class AestheticModel:
    weights: str | None = None
    """LAION improved-aesthetic-predictor head (``sac+logos+ava1-l14-linearMSE.pth``, a local path).
    It reads the stored ``clip_embedding``, so ``scoring.clip`` must be OpenAI ViT-L/14 for its
    scores to mean anything (any CLIP of the same width runs, e.g. in tests)."""


@dataclass(frozen=True, kw_only=True)
class CategoryScoring:
    taxonomy: dict[str, str] = field(default_factory=dict)
    """Category name -> text prompt for CLIP zero-shot over the stored ``clip_embedding`` (text
    embeddings computed once per worker). Empty when ``column`` gives the category."""
    column: str | None = None
    """Take the category from this column of the input table instead (``--category-column``: a
    source tag, a structured-caption label); the input must be a previous stage's table."""


@dataclass(frozen=True, kw_only=True)
class Scoring:
    working_size: int = 256
    """Short side, in pixels, the stage decodes to (JPEG draft mode) and scores at."""
    max_pixels: int = 178_956_970
    """Decompression-bomb guard: a header with more pixels than this is a broken file."""
    store_image: str = "source"
    """What the ``image`` blob column holds for every decodable row: ``source`` — the file's own
    bytes (full resolution, what later 512-2048 px stages and captioning need; decode them with
    ``curation.decode.decode`` for the same orientation/mode handling); ``normalized`` — the
    upright RGB image at the working size as JPEG; ``none`` — nothing (``uri`` is the reference)."""
    store_quality: int = 90
    """JPEG quality of the stored image with ``store_image: normalized``."""
    clip: ClipModel = field(default_factory=ClipModel)
    tokenizer: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Tokenizer (local path or hub id) that counts caption tokens; the condition encoder's."""
    nsfw_model: str | None = None
    """NudeNet ONNX model path; null uses the 320n detector shipped inside the ``nudenet`` wheel."""
    rotation: RotationDetector = field(default_factory=RotationDetector)
    aesthetic: AestheticModel = field(default_factory=AestheticModel)
    category: CategoryScoring = field(default_factory=CategoryScoring)


# --------------------------------------------------------------------------- thresholds
@dataclass(frozen=True, kw_only=True)
class ResolutionRule:
    min_short_side: int = 256
    """Reject images whose short side (after EXIF orientation) is below this."""
    max_aspect_ratio: float = 4.0
    """Reject images with long/short side above this."""


@dataclass(frozen=True, kw_only=True)
class DedupRule:
    max_hamming: int = 6
    """Near duplicates: pHash Hamming distance at most this (0..16). Exact: same content hash."""
    distributed: bool = False
    """Run the near-duplicate key join as a Ray Data shuffle across the cluster instead of in the
    driver (same clusters and survivors; see docs/cluster.md for when the driver's memory is too small)."""


@dataclass(frozen=True, kw_only=True)
class NsfwRule:
    max_score: float = 0.5
    """Reject when the NudeNet exposed-content score exceeds this (0..1)."""


@dataclass(frozen=True, kw_only=True)
class RotationRule:
    action: str = "discard"
    """What to do with an image the detector finds rotated: ``discard`` rejects it; ``correct``
    keeps it and sets the decision column ``rotate`` to the turn readers apply
    (``curation.table.load_image`` does)."""
    min_confidence: float = 0.9
    """Detector confidence (probability the pixels are not upright) needed to act."""


@dataclass(frozen=True, kw_only=True)
class EntropyRule:
    min_entropy: float = 1.0
    """Reject flat/blank images: grey-histogram entropy (bits, 0..8) below this."""
    max_noise: float = 0.75
    """Reject noise: 1 - neighbour-pixel correlation, max over R,G,B (0..1) above this."""


@dataclass(frozen=True, kw_only=True)
class ClipRule:
    min_score: float = 0.20
    """Reject image-caption pairs whose CLIP cosine similarity is below this (-1..1)."""


@dataclass(frozen=True, kw_only=True)
class TokenLengthRule:
    min_tokens: int = 1
    """Reject captions shorter than this many tokens."""
    max_tokens: int = 1024
    """Reject captions longer than this many tokens (the report renders prompts up to 1K tokens)."""


@dataclass(frozen=True, kw_only=True)
class QualityRule:
    max_brisque: float = 57.0
    """Reject when the no-reference BRISQUE score (lower is better, ~0..100, computed at a fixed
    analysis size) is above this. (Defaults of this section mirror ``curation.quality.DEFAULT_*``,
    calibrated there; a test keeps them equal.)"""


@dataclass(frozen=True, kw_only=True)
class AestheticRule:
    min_score: float = 5.0
    """Reject when the LAION aesthetic score (about 1..10) is below this (LAION-Aesthetics: 5, 6, 6.5)."""


@dataclass(frozen=True, kw_only=True)
class CompressionRule:
    min_jpeg_quality: float = 40.0
    """Reject JPEGs whose quality factor estimated from the quantisation tables (1..100) is below
    this; null (not a JPEG) passes."""
    max_blockiness: float = 0.35
    """Reject when the 8x8 block-edge excess of the decoded pixels (0 = none) is above this:
    catches a heavily compressed image re-saved at high quality, and non-JPEG files with JPEG
    artefacts."""


@dataclass(frozen=True, kw_only=True)
class SemDedupRule:
    eps: float = 0.05
    """Near duplicates: embedding cosine similarity >= 1 - eps (SemDeDup), within a k-means cluster."""
    n_clusters: int | None = None
    """k-means clusters; null = ``curation.semdedup``'s default, candidate rows / 1000: a fixed
    cluster size keeps the within-cluster work (rows x survivors) linear in rows, where sqrt(rows)
    clusters would make it grow as rows^1.5."""
    rank: tuple[str, ...] = ("aesthetic", "pixels", "id")
    """Survivor ranking, best first: score columns (higher wins), ``pixels`` (larger wins), ``id``
    (smaller wins, the final tie-break)."""


@dataclass(frozen=True, kw_only=True)
class BalanceRule:
    mode: str = "cap"
    """``cap``: MetaCLIP-style, keep each row with probability min(1, cap / count of its category);
    ``proportions``: keep the largest set whose category shares are ``targets``."""
    cap: int = 1000
    """Rows per category kept in expectation with ``mode: cap``."""
    targets: dict[str, float] = field(default_factory=dict)
    """Category -> target share with ``mode: proportions`` (normalised to sum 1; categories not
    listed are rejected)."""
    seed: int = 0
    """Keep draws are hash(id, seed): deterministic across reruns and workers."""


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    resolution: ResolutionRule = field(default_factory=ResolutionRule)
    dedup: DedupRule = field(default_factory=DedupRule)
    nsfw: NsfwRule = field(default_factory=NsfwRule)
    rotation: RotationRule = field(default_factory=RotationRule)
    entropy: EntropyRule = field(default_factory=EntropyRule)
    clip: ClipRule = field(default_factory=ClipRule)
    token_length: TokenLengthRule = field(default_factory=TokenLengthRule)
    quality: QualityRule = field(default_factory=QualityRule)
    aesthetic: AestheticRule = field(default_factory=AestheticRule)
    compression: CompressionRule = field(default_factory=CompressionRule)
    semdedup: SemDedupRule = field(default_factory=SemDedupRule)
    balance: BalanceRule = field(default_factory=BalanceRule)


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    stage: str = "stage1"
    """Stage name written on every row; an output table holds one stage only."""
    source: str = "web"
    """Source tag written on every row (``source`` column; the training mixture caps each source's
    share, curation/mixture.py): ``web``, ``synthetic:<kind>``, ``edit:<name>``, ... A chained stage
    keeps its parent row's tag."""
    filters: tuple[str, ...] = STAGE1_CHAIN
    """The stage's filters in chain order (names in ``curation.filters.FILTERS``; ``broken``
    first). The first failing one is a row's ``reject_reason``."""
    batch_size: int = 256
    """Items per Ray Data batch: one decode + all scorers per item, one Lance fragment per batch."""
    num_workers: int | None = None
    """Scoring actors; null = one per CPU Ray reports."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per scoring actor."""
    gpus_per_worker: float = 0.0
    """GPUs per scoring actor (CLIP/NSFW run on it when > 0)."""
    scoring: Scoring = field(default_factory=Scoring)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def score_hash(self, skipped: typing.Iterable[str]) -> str:
        return _hash({"stage": self.stage, "filters": list(self.filters),
                      "scoring": dataclasses.asdict(self.scoring), "skipped": sorted(skipped)})

    def threshold_hash(self) -> str:
        """Hash of the rules of this stage's filters only (a rule of a filter not in the chain
        decides nothing)."""
        from .filters import FILTERS

        th = dataclasses.asdict(self.thresholds)
        secs = [FILTERS[n].th(n) if n in FILTERS else n for n in self.filters]
        return _hash({sec: th[sec] for sec in secs if sec in th})

    @property
    def skippable(self) -> tuple[str, ...]:
        return tuple(f for f in self.filters if f != "broken")


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- validation
# (field path, low, high): inclusive bounds checked after load. Kept as data next to the dataclasses
# so the error names the field and the allowed range.
_RANGES: tuple[tuple[str, float, float], ...] = (
    ("batch_size", 1, 65536),
    ("cpus_per_worker", 0.0, 1024),
    ("gpus_per_worker", 0.0, 64),
    ("scoring.working_size", 16, 16384),
    ("scoring.max_pixels", 1, 10**12),
    ("scoring.store_quality", 1, 100),
    ("scoring.clip.batch_size", 1, 4096),
    ("thresholds.resolution.min_short_side", 0, 1_000_000),
    ("thresholds.resolution.max_aspect_ratio", 1.0, 1000.0),
    ("thresholds.dedup.max_hamming", 0, 16),
    ("thresholds.nsfw.max_score", 0.0, 1.0),
    ("thresholds.rotation.min_confidence", 0.0, 1.0),
    ("thresholds.entropy.min_entropy", 0.0, 8.0),
    ("thresholds.entropy.max_noise", 0.0, 1.0),
    ("thresholds.clip.min_score", -1.0, 1.0),
    ("thresholds.token_length.min_tokens", 0, 1_000_000),
    ("thresholds.token_length.max_tokens", 0, 1_000_000),
    ("thresholds.quality.max_brisque", -1000.0, 1000.0),
    ("thresholds.aesthetic.min_score", -100.0, 100.0),
    ("thresholds.compression.min_jpeg_quality", 0.0, 100.0),
    ("thresholds.compression.max_blockiness", 0.0, 1000.0),
    ("thresholds.semdedup.eps", 0.0, 1.0),
    ("thresholds.semdedup.n_clusters", 1, 10**7),
    ("thresholds.balance.cap", 1, 10**12),
)
_CHOICES = {
    "scoring.store_image": ("source", "normalized", "none"),
    "thresholds.rotation.action": ("discard", "correct"),
    "thresholds.balance.mode": ("cap", "proportions"),
}


def FILTERS_SCORE_COLUMNS() -> set[str]:  # noqa: N802 - reads as the set it returns
    from .schema import SCORE_FIELDS

    return set(SCORE_FIELDS)


def _get(cfg: object, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: StageConfig) -> StageConfig:
    for path, lo, hi in _RANGES:
        v = _get(cfg, path)
        if v is not None and not lo <= v <= hi:
            raise ConfigError(f"{path} = {v} is out of range [{lo}, {hi}]")
    for path, allowed in _CHOICES.items():
        if _get(cfg, path) not in allowed:
            raise ConfigError(f"{path} = {_get(cfg, path)!r}: expected one of {', '.join(allowed)}")
    from .filters import FILTERS, ROTATION_DETECTORS  # the presets live beside the filters

    if not cfg.filters or cfg.filters[0] != "broken":
        raise ConfigError(f"filters = {list(cfg.filters)}: the chain must start with 'broken'")
    for i, name in enumerate(cfg.filters):
        if name not in FILTERS:
            raise ConfigError(f"filters[{i}] = {name!r}: unknown filter (one of: {', '.join(FILTERS)})")
        if name in cfg.filters[:i]:
            raise ConfigError(f"filters[{i}] = {name!r}: listed twice")
    for i, key in enumerate(cfg.thresholds.semdedup.rank):
        if key not in ("pixels", "id") and key not in FILTERS_SCORE_COLUMNS():
            raise ConfigError(f"thresholds.semdedup.rank[{i}] = {key!r}: expected pixels, id or a score column")
    b = cfg.thresholds.balance
    if any(v < 0 for v in b.targets.values()) or (b.targets and sum(b.targets.values()) <= 0):
        raise ConfigError("thresholds.balance.targets: shares must be >= 0 and not all 0")
    if "balance" in cfg.filters:
        if b.mode == "proportions" and not b.targets:
            raise ConfigError("thresholds.balance.targets: required with mode 'proportions'")
        cat = cfg.scoring.category
        if not cat.taxonomy and not cat.column:
            raise ConfigError("scoring.category.taxonomy: give category prompts, or a category column "
                              "(scoring.category.column / --category-column)")
    if "aesthetic" in cfg.filters and not cfg.scoring.aesthetic.weights:
        raise ConfigError("scoring.aesthetic.weights is not set: the LAION aesthetic head's .pth path "
                          "(or --skip aesthetic)")
    if cfg.scoring.rotation.detector not in ROTATION_DETECTORS:
        raise ConfigError(f"scoring.rotation.detector = {cfg.scoring.rotation.detector!r}: expected one of "
                          f"{', '.join(ROTATION_DETECTORS)}")
    tl = cfg.thresholds.token_length
    if tl.min_tokens > tl.max_tokens:
        raise ConfigError("thresholds.token_length.min_tokens must be <= max_tokens")
    if cfg.num_workers is not None and cfg.num_workers < 1:
        raise ConfigError(f"num_workers = {cfg.num_workers} must be >= 1 or null")
    return cfg


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> StageConfig:
    """Load a YAML stage config (defaults when ``path`` is None), apply dotted overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return validate(build(StageConfig, data))


def parse_skip(text: str | None, cfg: StageConfig | None = None) -> tuple[str, ...]:
    """``--skip a,b`` -> sorted names; each must be a filter of the stage's chain other than broken."""
    if not text:
        return ()
    allowed = (cfg or StageConfig()).skippable
    names = tuple(sorted({s.strip() for s in text.split(",") if s.strip()}))
    for n in names:
        if n not in allowed:
            raise ConfigError(f"--skip: unknown filter '{n}' (one of: {', '.join(sorted(allowed))})")
    return names
