"""Typed, frozen configuration of the data flywheel (configs/flywheel.yaml), validated at load.

Loaded by :mod:`common.typed_config` (the one loader): a misspelt key, a wrong type or an out-of-range
value stops the job before any work, naming the dotted field. Thresholds of the attribution live here,
never inline in code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.typed_config import ConfigError, build, read_yaml, set_dotted
from curation.config import ClipModel
from flywheel.schema import SOURCES

TOKEN_ENV = "FLYWHEEL_REVIEW_TOKEN"
VECTOR_INDEXES = ("IVF_HNSW_SQ", "IVF_PQ")


@dataclass(frozen=True, kw_only=True)
class SignalSource:
    path: str
    """A file or a glob of files (.jsonl / .json / .parquet / .lance); a glob matching nothing is a
    quiet night, not an error."""
    source: str = "eval"
    """What the records are when they do not say: eval | bad_case | feedback (a record's own
    `source` field wins)."""


@dataclass(frozen=True, kw_only=True)
class FailureRule:
    eval_pass_mark: float = 0.5
    """An evaluation result with score below this failed (unless `pass_marks` names its metric)."""
    pass_marks: dict[str, float] = field(default_factory=dict)
    """Per-metric pass marks, e.g. {clip_score: 0.28, geneval: 0.5}."""
    feedback_fail_rating: float = 2.0
    """User feedback with rating at or below this failed; feedback with only a complaint failed."""


@dataclass(frozen=True, kw_only=True)
class PoolSource:
    curated: str
    """URI of a curated Lance table (curation/schema.py): ids, stage, keep, reject_reason,
    clip_embedding, caption and the image blobs the review page shows."""
    captions: str | None = None
    """URI of its captions table (captioning/schema.py); the general/knowledge captions are indexed."""
    embedding_column: str = "clip_embedding"
    """Curated column holding the L2-normalised CLIP image embedding (any dimension)."""
    category_column: str | None = "category"
    """Curated column with a category label per row (added to `categories`; ignored when the table
    has no such column)."""
    instruction_column: str | None = None
    """Edit-pair pools: column with the edit instruction; its rows are indexed as kind edit_pair."""
    base_id_column: str | None = None
    """Edit-pair pools: column with the base image's id (shown beside the edited image)."""


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    clip: ClipModel = field(default_factory=ClipModel)
    """The curated stage's CLIP (the same `scoring.clip` settings as the stage config): its text
    tower embeds captions and prompts into the space of the stored image embeddings."""
    include_reject_reasons: str = "quota,balance"
    """Comma-separated curation reject reasons whose rows are indexed anyway (rejected only by quota
    or balancing: usable to compensate a scarce concept). Kept rows are always indexed."""
    ivf_min_rows: int = 100_000
    """Build a vector index (`vector_index`) once the table has this many rows; below it, exact search
    (flat scan beats an index on small tables and needs no training)."""
    vector_index: str = "IVF_PQ"
    """Lance vector index type: IVF_PQ (product quantisation, 96 bytes per 768-d vector) or IVF_HNSW_SQ
    (an HNSW graph per IVF partition over 8-bit scalar-quantised vectors, ~960 bytes per vector with
    the graph). Measured at 1M rows (flywheel/README.md): the same CPU per query and recall@10
    (0.96), so the 9x smaller index wins; at 200k rows HNSW_SQ needed half the CPU."""
    rows_per_partition: int = 4096
    """IVF_PQ: partitions = rows / this (at least 1; 244 at 1M rows); rebuilt when the table doubles."""
    sub_vector_dim: int = 8
    """IVF_PQ: PQ sub-vector length; num_sub_vectors = dim / this (96 bytes per 768-d vector). 16 halves
    the code but its coarser distances mis-order close neighbours (lower recall before refinement)."""
    nprobes: int = 32
    """IVF_PQ: partitions probed per query (all of them below 32 x rows_per_partition rows)."""
    refine_candidates: int = 50
    """Index candidates re-ranked with exact distances from the stored float32 vectors (at least k:
    refine_factor = ceil(this / k); both index types): quantised distances mis-order near ties, so
    this is what lifts recall above 0.95 at 1M rows (IVF_PQ 0.96 from 50 on; 10 x k cost 40% more
    CPU per k=50 query for no recall gain); it also makes `_distance` exact."""
    hnsw_rows_per_partition: int = 16_384
    """IVF_HNSW_SQ: partitions = rows / this (at least 1; 61 at 1M rows). An HNSW search costs ~log of
    its partition's size, so partitions can be far larger than IVF_PQ's; the bound keeps one
    partition's graph build in memory and spreads the build over cores."""
    hnsw_nprobes: int = 24
    """IVF_HNSW_SQ: partitions searched per query (each by its HNSW graph); 24 of 61 at 1M rows: recall@10 0.96."""
    hnsw_ef: int = 0
    """IVF_HNSW_SQ: HNSW candidate-list size per searched partition; 0 = Lance's default for k
    (larger: higher recall, more CPU)."""
    hnsw_m: int = 20
    """IVF_HNSW_SQ build: graph edges per node (Lance's default)."""
    hnsw_ef_construction: int = 150
    """IVF_HNSW_SQ build: candidate-list size while inserting (the Lance dataset API's default;
    LanceDB's is 300, a slower build)."""
    query_threads: int = 2
    """Concurrent full-text queries of one batched hybrid search (`PoolIndex.hybrid_many`; Lance
    runs them outside the GIL)."""
    batch_size: int = 256
    """Captions per CLIP text batch (one Ray Data batch)."""
    num_cpus: int | None = None
    """CPUs for a local Ray started by the job (ignored on a cluster)."""

    @property
    def reject_reasons(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.include_reject_reasons.split(",") if s.strip())


@dataclass(frozen=True, kw_only=True)
class AttributionConfig:
    search_k: int = 50
    """Hybrid-search candidates per query (vector + full text, fused by reciprocal rank)."""
    min_similarity: float = 0.8
    """A candidate is a relevant hit if its caption's cosine similarity to the prompt reaches this,
    or the full-text search matched it."""
    density_sample: int = 200
    """Pool captions sampled (deterministically) to measure the pool's typical density."""
    scarce_ratio: float = 0.25
    """Scarce when density < scarce_ratio x typical density."""
    category_scarce_ratio: float = 0.25
    """Scarce when the category's pool count < this x the median count per category."""
    neighbours: int = 8
    """Nearest pool ids stored as evidence on each route."""
    min_prompt_words: int = 4
    """Prompt rule: fewer words than this is under-specified."""
    vague_words: str = "something,thing,stuff,nice,good,beautiful,cool,whatever,it,this,that"
    """Prompt rule: comma-separated words that make a prompt vague when they carry it."""
    similar_case_similarity: float = 0.9
    """Evaluated cases whose prompt embedding is this close count as 'similar prompts'."""
    good_pass_rate: float = 0.5
    """Similar prompts pass at least this often = the capability exists."""

    @property
    def vague(self) -> frozenset[str]:
        return frozenset(s.strip().lower() for s in self.vague_words.split(",") if s.strip())


@dataclass(frozen=True, kw_only=True)
class LLMConfig:
    server: str | None = None
    """OpenAI-compatible server (vLLM) base URL, e.g. http://host:8000/v1; null = the judge and the
    prompt generaliser stay pending."""
    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    """Served model name."""
    max_tokens: int = 512
    """Generation bound per request."""
    temperature: float = 0.7
    """Sampling temperature (variants want diversity; the judge reads a schema-bound answer)."""
    max_attempts: int = 3
    """Attempts per request (429/5xx/connection errors, invalid answers), the captioning client's."""
    backoff_s: float = 0.5
    """First retry delay, doubling."""
    request_timeout_s: float = 120.0
    """Per-request read timeout."""
    server_patience_s: float = 60.0
    """How long an outage during the run is waited out before the remaining LLM steps are left
    pending for the next run."""
    concurrency: int = 8
    """Requests in flight."""


@dataclass(frozen=True, kw_only=True)
class PromptEnhancerConfig:
    server: str | None = None
    """OpenAI-compatible server serving the prompt enhancer (§3.3; trained on `jobs/build_pe_data.py`'s
    export); null = cases routed to the prompt track wait as `awaiting_enhancer`."""
    model: str = "prompt-enhancer"
    """Served PE model name (not `llm.model`: the PE is its own fine-tuned model)."""


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    neighbours: int = 16
    """Pool items retrieved per pre-training case (edit pairs included when the pool has them)."""
    max_variants: int = 6
    """Upper bound on generated prompt variants per case (after de-duplication)."""


@dataclass(frozen=True, kw_only=True)
class ReviewConfig:
    token: str | None = None
    """Sign-in token; the environment variable FLYWHEEL_REVIEW_TOKEN overrides it. Without either the
    review server refuses to start."""
    page_size: int = 24
    """Items per page."""
    thumb_px: int = 192
    """Thumbnail long side in pixels."""
    tables: dict[str, str] = field(default_factory=dict)
    """Extra tables to browse: name -> Lance URI (stage tables, captions tables). The pools are
    always browsable under their names."""


@dataclass(frozen=True, kw_only=True)
class FlywheelConfig:
    workdir: str
    """LanceDB database URI holding the flywheel tables (flywheel/schema.py)."""
    signals: dict[str, SignalSource] = field(default_factory=dict)
    """Named signal inputs (evaluation results, bad cases, user feedback)."""
    pools: dict[str, PoolSource] = field(default_factory=dict)
    """Named curated pools the retrieval index covers."""
    failure: FailureRule = field(default_factory=FailureRule)
    index: IndexConfig = field(default_factory=IndexConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt_enhancer: PromptEnhancerConfig = field(default_factory=PromptEnhancerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    report: str | None = None
    """HTML report path of the nightly run; null = <workdir>/report.html (./flywheel_report.html when
    workdir is an object-store URI)."""

    def attribution_hash(self) -> str:
        """What a routing decision depends on (a changed threshold re-routes on the next run)."""
        d = {k: dataclasses.asdict(getattr(self, k)) for k in ("failure", "attribution")}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def report_path(self) -> str:
        if self.report:
            return self.report
        return "flywheel_report.html" if "://" in self.workdir else os.path.join(self.workdir, "report.html")

    def review_token(self) -> str | None:
        return os.environ.get(TOKEN_ENV) or self.review.token


_POSITIVE = ("index.ivf_min_rows", "index.rows_per_partition", "index.sub_vector_dim", "index.nprobes",
             "index.refine_candidates", "index.hnsw_rows_per_partition", "index.hnsw_nprobes", "index.hnsw_m",
             "index.hnsw_ef_construction", "index.batch_size", "attribution.search_k", "attribution.density_sample",
             "attribution.neighbours", "llm.max_tokens", "llm.max_attempts", "llm.concurrency",
             "pretrain.neighbours", "review.page_size", "review.thumb_px")
_UNIT = ("attribution.scarce_ratio", "attribution.category_scarce_ratio", "attribution.good_pass_rate")
_COSINE = ("attribution.min_similarity", "attribution.similar_case_similarity")


def _get(cfg: object, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: FlywheelConfig) -> FlywheelConfig:
    for p in _POSITIVE:
        if _get(cfg, p) < 1:
            raise ConfigError(f"{p} = {_get(cfg, p)} must be >= 1")
    for p in _UNIT:
        if not 0.0 <= _get(cfg, p) <= 1.0:
            raise ConfigError(f"{p} = {_get(cfg, p)} is out of range [0, 1]")
    for p in _COSINE:
        if not -1.0 <= _get(cfg, p) <= 1.01:
            raise ConfigError(f"{p} = {_get(cfg, p)} is out of range [-1, 1.01]")
    if cfg.index.vector_index not in VECTOR_INDEXES:
        raise ConfigError(f"index.vector_index = {cfg.index.vector_index!r}: expected one of {', '.join(VECTOR_INDEXES)}")
    if cfg.index.hnsw_ef < 0:
        raise ConfigError(f"index.hnsw_ef = {cfg.index.hnsw_ef} must be >= 0 (0 = Lance's default)")
    if cfg.pretrain.max_variants < 0:
        raise ConfigError(f"pretrain.max_variants = {cfg.pretrain.max_variants} must be >= 0")
    for name, s in cfg.signals.items():
        if s.source not in SOURCES:
            raise ConfigError(f"signals.{name}.source = {s.source!r}: expected one of {', '.join(SOURCES)}")
    for name, url in (("llm.server", cfg.llm.server), ("prompt_enhancer.server", cfg.prompt_enhancer.server)):
        if url is not None and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{name} = {url!r}: expected an http(s) URL or null")
    for name in [*cfg.pools, *cfg.review.tables]:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"pools/review.tables name {name!r}: letters, digits, - and _ only (used in URLs)")
    return cfg


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> FlywheelConfig:
    """YAML file + dotted overrides (``--set attribution.scarce_ratio=0.3``) -> validated config."""
    data = read_yaml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    if "workdir" not in data:
        raise ConfigError("workdir: required field is missing")
    return validate(build(FlywheelConfig, data))
