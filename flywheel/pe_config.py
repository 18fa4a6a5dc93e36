"""Typed, frozen configuration of the Prompt-Enhancer jobs (configs/pe.yaml), validated at load.

Two jobs share :class:`LLMJob` (server, model, prompt set, and `client`: the captioning client's
retry / timeout / concurrency / commit settings, checked as `captioning.config.CaptionConfig` fields,
so both jobs reuse that client unchanged). :class:`PEConfig` adds the reverse-engineering data
recipe of Qwen-Image-2.0 §3.3: the strategy pool (per-category draw probabilities), the
light / medium / heavy difficulty mix and the language mix. Every error names the dotted field
before any work starts (:mod:`common.typed_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioning.config import CaptionConfig
from common.typed_config import ConfigError, build, read_yaml, set_dotted

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "pe.yaml"
PROMPT_ROOT = Path(__file__).resolve().parent / "pe_prompts"
CATEGORIES: tuple[str, ...] = ("general", "portrait", "text", "complex_text")
DIFFICULTIES: tuple[str, ...] = ("light", "medium", "heavy")
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese (简体中文)"}
# Request settings where neither configs/pe.yaml nor the caller sets them (enhance_texts from the
# flywheel): text answers are shorter than image captions, and sampling should vary between rows.
CLIENT_DEFAULTS = {"max_tokens": 1024, "temperature": 0.7, "commit_every": 64, "concurrency": 32}


@dataclass(frozen=True, kw_only=True)
class Strategy:
    instruction: str
    """What the LLM does to the fine annotation (one imperative sentence, in English)."""
    inverse: dict[str, str]
    """language -> the chain-of-thought step that undoes it; the LLM's note of what the step removed
    follows it. Needs every language of `languages`."""
    probability: dict[str, float]
    """category -> weight in [0, 1] of drawing this strategy for an annotation of that category;
    0 or absent = not applicable (e.g. text-only strategies for portraits)."""


@dataclass(frozen=True, kw_only=True)
class Difficulty:
    share: float
    """Share of annotations degraded at this difficulty (the shares of all difficulties sum to 1)."""
    min_strategies: int
    """Fewest strategies applied."""
    max_strategies: int
    """Most strategies applied (the count is drawn uniformly in [min, max])."""
    target_ratio: float
    """Length of P_short relative to P_fine the LLM is asked to aim at (the report shows the result)."""


@dataclass(frozen=True, kw_only=True)
class LLMJob:
    server: str
    """OpenAI-compatible base URL, e.g. http://host:8000/v1 (vLLM or any compatible server)."""
    model: str
    """Served model name (must be listed by GET /models)."""
    output: str
    """URI of the output Lance table (created, then updated in place by merge on `id`)."""
    prompt_version: str = "v1"
    """Prompt set: <prompt_root>/<version>/*.txt + *.json; stored on every row."""
    prompt_root: str = str(PROMPT_ROOT)
    """Directory holding the prompt-set versions."""
    client: dict[str, Any] = field(default_factory=dict)
    """Request settings: any field of captioning.config.CaptionConfig (max_tokens, temperature, seed,
    max_attempts, backoff_s, read_timeout_s, server_patience_s, concurrency, commit_every, ...)."""
    report: str | None = None
    """HTML report path; None = <output>.report.html for a local output."""
    progress: bool = True
    """Show a progress bar."""

    def caption_config(self, source: str) -> CaptionConfig:
        """The captioning client's config: the `client` section, with server/model/output from here."""
        data = {**CLIENT_DEFAULTS, **self.client,
                "input": source, "output": self.output, "model": self.model, "server": self.server}
        return build(CaptionConfig, data, "client")


@dataclass(frozen=True, kw_only=True)
class PEConfig(LLMJob):
    captions: str
    """URI of the captions Lance table (captioning/schema.py): each `ok` row gives one P_fine."""
    strategies: dict[str, Strategy]
    """The degradation strategy pool: name -> strategy (names are stored on every row)."""
    difficulty: dict[str, Difficulty]
    """light / medium / heavy -> share and strategy count (the difficulty mix)."""
    languages: dict[str, float] = field(default_factory=lambda: {"en": 0.5, "zh": 0.5})
    """language -> share of annotations rendered in it (falls back to the other language when the
    captions have none in the drawn one)."""
    seed: int = 0
    """Seed of the per-id draws (language, difficulty, strategies): a rerun draws the same."""
    meaning_retries: int = 1
    """Extra degradation requests (new seed) when the meaning check rejects P_short; then the row is
    stored as `rejected` with the reason."""
    edits: str | None = None
    """Edit annotations (.jsonl / .parquet / .lance) summarised into concise editing prompts; None = none."""
    edits_id_column: str = "id"
    """Column of `edits` with the pair id (stored as `edit:<id>`)."""
    edits_text_columns: tuple[str, ...] = ("instruction_en", "target_caption")
    """Columns of `edits` whose non-empty values, joined by blank lines, are the long edit annotation
    (the default fits the edit-pair table of curation/pair_readers.py: instruction + target caption)."""
    validation_fraction: float = 0.05
    """SFT export: share of ids (by id hash) in the validation split."""
    think_template: str = "<think>\n{cot}\n</think>\n\n{p_fine}"
    """SFT export: the assistant message from the CoT and P_fine (edit rows without CoT: P_fine only)."""

    def __post_init__(self) -> None:
        if abs(sum(self.languages.values()) - 1) > 1e-6 or any(v < 0 for v in self.languages.values()):
            raise ConfigError(f"languages: shares must be >= 0 and sum to 1, got {self.languages}")
        for lang in self.languages:
            if lang not in LANGUAGE_NAMES:
                raise ConfigError(f"languages.{lang}: unknown language (known: {', '.join(LANGUAGE_NAMES)})")
        if set(self.difficulty) != set(DIFFICULTIES):
            raise ConfigError(f"difficulty: expected exactly {', '.join(DIFFICULTIES)}, got {', '.join(self.difficulty)}")
        if abs(sum(d.share for d in self.difficulty.values()) - 1) > 1e-6:
            raise ConfigError("difficulty: the shares of light, medium and heavy must sum to 1")
        for name, d in self.difficulty.items():
            if d.share < 0 or not 1 <= d.min_strategies <= d.max_strategies or not 0 < d.target_ratio <= 1:
                raise ConfigError(f"difficulty.{name}: need share >= 0, 1 <= min_strategies <= max_strategies, "
                                  f"0 < target_ratio <= 1")
        for name, s in self.strategies.items():
            for cat, p in s.probability.items():
                if cat not in CATEGORIES:
                    raise ConfigError(f"strategies.{name}.probability.{cat}: unknown category "
                                      f"(known: {', '.join(CATEGORIES)})")
                if not 0 <= p <= 1:
                    raise ConfigError(f"strategies.{name}.probability.{cat}: {p} is out of range [0, 1]")
            for lang in self.languages:
                if not s.inverse.get(lang):
                    raise ConfigError(f"strategies.{name}.inverse.{lang}: missing (needed for the {lang} CoT)")
        most = max(d.max_strategies for d in self.difficulty.values())
        for cat in CATEGORIES:
            n = sum(1 for s in self.strategies.values() if s.probability.get(cat, 0) > 0)
            if n < most:
                raise ConfigError(f"strategies: only {n} apply to category {cat}, fewer than the "
                                  f"difficulty's max_strategies {most}")
        if not 0 <= self.validation_fraction < 1 or self.meaning_retries < 0:
            raise ConfigError("validation_fraction must be in [0, 1) and meaning_retries >= 0")


@dataclass(frozen=True, kw_only=True)
class EnhanceConfig(LLMJob):
    input: str
    """JSON-lines file of prompts: {"prompt": ..., "id": optional} per line (id defaults to a hash)."""
    plain: bool = False
    """The served model is a PE fine-tuned on our SFT export: ask in its training format (system +
    user prompt, no JSON schema) and take the text after its </think>. False: any instruction model,
    asked with the `enhance` prompt and a JSON schema (structured outputs)."""


def load(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """YAML (default configs/pe.yaml) + overrides (CLI values; None = not given; dotted keys allowed)."""
    data = read_yaml(path if path is not None else DEFAULT_CONFIG)
    if cls is EnhanceConfig:  # the enhance job shares the file's request settings, not the data recipe
        data = {k: v for k, v in data.items() if k in ("server", "model", "prompt_version", "prompt_root", "client")}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    cfg = build(cls, data)
    cfg.caption_config(getattr(cfg, "captions", getattr(cfg, "input", "")))  # `client.*` errors now, not later
    return cfg
