"""Typed, frozen training config, loaded from YAML plus ``key.path=value`` overrides and validated
at load (torchtitan ``configs.py`` style, by the shared :mod:`common.typed_config`): a misspelt or mistyped key fails at once with a one-line
error naming the field, before Ray or torch start anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from common.typed_config import ConfigError, build, parse_assignment, read_yaml, set_dotted
from training.mmdit import MMDIT_PRESETS


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    preset: str = "tiny"
    """Size preset from ``training.mmdit.MMDIT_PRESETS`` (tiny, small, 1B, 2B, paper)."""
    patch_size: int = 2
    """Latent pixels per token side (2 for an f8 VAE; 1 for an f16 VAE like Qwen-Image-2.0's)."""
    depth: int | None = None
    """Override the preset's number of blocks (e.g. a shallow 1B-width model for a smoke run)."""


@dataclass(frozen=True, kw_only=True)
class SeFiConfig:
    enabled: bool = False
    """Train SeFi's semantic-first variant; needs a latent cache with semantic channels."""
    delta: float = 0.3
    """How far semantics run ahead: t_s = min(1, t(1+delta)), t_z = max(0, t(1+delta) - delta)."""
    semantic_loss_weight: float = 1.0
    """Weight of the velocity loss on the semantic channels (texture channels weigh 1)."""


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    logit_std: float = 1.0
    """Std of the logit-normal timestep density."""
    shift_base_tokens: int = 256
    """Image-token count with shift 1; shift = sqrt(tokens / this), clipped to [1, max_shift]."""
    max_shift: float = 6.0
    """Upper bound of the resolution-dependent shift."""
    caption_dropout: float = 0.1
    """Probability of replacing the caption by the empty prompt (report: uncond. dropout 0.1)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    resolution: int = 256
    """Stage resolution: the latent cache must be encoded at this resolution (checked)."""
    global_batch_size: int = 8
    """Samples per optimizer step over all workers."""
    micro_batch_size: int | None = None
    """Samples per forward/backward per worker; the rest is gradient accumulation. None: all."""
    caption_kinds: dict[str, float] = field(default_factory=lambda: {
        "general": 0.65, "text": 0.1, "knowledge": 0.1, "structured": 0.1, "alt": 0.05})
    """Sampling ratios of caption types (captioning/README.md): general, text, knowledge, structured,
    and the curated alt text; types an image lacks are dropped and the rest renormalised; an image
    with no captions (captioning failed or not run) uses its alt text."""
    caption_types: dict[str, float] = field(default_factory=lambda: {"short": 0.2, "medium": 0.3, "dense": 0.5})
    """Sampling ratios of the general caption's lengths; lengths missing for an image are dropped and
    the rest renormalised."""
    languages: dict[str, float] = field(default_factory=lambda: {"en": 0.8, "zh": 0.2})
    """Sampling ratios of caption languages (same fallback rule)."""
    t2i_ratio: float = 0.9
    """Fraction of steps that are text-to-image."""
    ti2i_ratio: float = 0.1
    """Fraction of steps that are text+image-to-image (edit pairs with a reference latent)."""
    max_text_len: int = 512
    """Condition-encoder states are cut to this many tokens."""
    seed: int = 0
    """Seed of the step -> batch mapping (a pure function of seed and step, so resume is exact)."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.001
    """Report Table 2: 0.001 in all stages."""
    grad_clip: float = 1.0
    """Max global grad norm (report: 1.0)."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr."""
    schedule: str = "constant"
    """After warmup: constant or cosine (down to min_lr_ratio * lr at the last step)."""
    min_lr_ratio: float = 0.1


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    mixed_precision: str = "fp32"
    """bf16: FSDP2 keeps fp32 master weights, computes in bf16 and reduces gradients in fp32. fp32 for
    CPU/gloo."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~1/3 more compute)."""
    compile: bool = False
    """torch.compile each block (per-block so FSDP2's hooks stay outside the graph)."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (GPU runs); aot_eager traces the same graphs (Dynamo + AOTAutograd)
    without Inductor's code generation, which takes minutes on CPU (tests)."""


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    placement_strategy: str = "PACK"
    """Ray placement-group strategy of the worker bundles (Ray Train's ScalingConfig): PACK (Ray's
    default: as few nodes as possible, spill over when full), SPREAD (over nodes where possible),
    STRICT_PACK (all on one node), STRICT_SPREAD (one worker per node; the run waits until there are
    ``workers`` nodes with the resources)."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray Train worker reserves (its bundle); GPUs are one per worker with use_gpu."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with use_gpu, gloo otherwise), gloo or nccl. Both
    rendezvous over TCP at rank 0's node (MASTER_ADDR/MASTER_PORT set by Ray Train); gloo also moves
    the tensors over TCP, so every node must reach every other on Ray's worker ports."""
    timeout_s: int = 1800
    """Timeout of process-group collectives: a rank blocked this long in a collective raises."""


# Fixed validation prompts: both languages, plain scenes and text rendering (quoted text to draw).
VALIDATION_PROMPTS: tuple[str, ...] = (
    "A red fox sitting in fresh snow at sunrise, soft light, detailed fur",
    "A poster with the words \"OPEN 24 HOURS\" in bold white letters on a blue background",
    "A hand-written note on yellow paper that says \"Meet me at 7pm\"",
    "一只橘猫躺在窗台上晒太阳，水彩画风格",
    "一家咖啡店的招牌，上面写着“欢迎光临”，木质背景",
    "一张海报，标题为“春节快乐”，红色背景，金色汉字",
)


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    every: int = 0
    """Sample the validation prompts with the EMA weights every this many steps (and at the last step);
    0 disables. Images go to <run>/validation/step_*/ and validation.html."""
    prompts: tuple[str, ...] = VALIDATION_PROMPTS
    """Fixed prompts (encoded once per run with the cache's condition encoder)."""
    euler_steps: int = 20
    """Euler steps of the validation sampler."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale of the validation sampler."""
    seed: int = 0
    """Noise seed: the same noise at every validation step, so images are comparable across steps."""


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to <run>/tensorboard/ beside metrics.jsonl (rank 0)."""
    timestep_buckets: int = 4
    """Log the loss per timestep bucket: [0, 1) cut into this many equal bins of the progress t."""
    peak_tflops: float | None = None
    """Per-device peak for MFU; None: looked up from the GPU name (bf16 dense), or the stated CPU peak."""
    log_consumed: bool = False
    """Append each rank's latent and text rows of every step to <run>/consumed/rank_R.jsonl (an audit
    of the data position across restarts; tests). About 8 bytes per sample per step: off for long runs."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    name: str
    """Run name: checkpoints and logs go to <storage>/<name>; rerunning the same name resumes."""
    stage: str = ""
    """Which row of the report's Table 2 this reproduces (free text, for the logs)."""
    steps: int
    """Optimizer steps of this stage."""
    log_every: int = 10
    ckpt_every: int = 1000
    """Checkpoint every this many steps (and at the last step)."""
    keep_checkpoints: int = 2
    ema_decay: float = 0.0
    """EMA of the weights kept in the checkpoint; 0 disables."""
    workers: int = 1
    """Ray Train workers (one per GPU with use_gpu)."""
    use_gpu: bool = False
    max_failures: int = 3
    """Worker failures Ray Train recovers from (FailureConfig): the whole worker group restarts from
    the latest checkpoint, at that checkpoint's data position. -1: retry without limit."""
    init_from: str | None = None
    """A previous stage's checkpoint directory (or run dir: its latest step_*): its weights start this
    stage; the optimizer and schedule start fresh. Ignored when this run resumes from its own checkpoint."""
    init_from_ema: bool = True
    """Start from init_from's EMA weights (the EMA also starts there); false: its raw model weights.
    A checkpoint without an EMA fails naming this field."""
    fault_injection_step: int | None = None
    """Testing failure recovery: rank 1 raises before this step on a run that did not resume."""
    min_step_seconds: float = 0.0
    """Testing: every step lasts at least this long (the rest is slept), so that a test can kill a
    worker mid-run however fast the machine is; 0 in real runs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sefi: SeFiConfig = field(default_factory=SeFiConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self):
        validate(self)


def _check(cond: bool, name: str, msg: str):
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _ratios(d: dict[str, float], name: str, allowed: tuple[str, ...]):
    for k, v in d.items():
        _check(k in allowed, f"{name}.{k}", f"unknown key; allowed: {', '.join(allowed)}")
        _check(v >= 0, f"{name}.{k}", "ratio must be >= 0")
    _check(abs(sum(d.values()) - 1) < 1e-6, name, f"ratios must sum to 1 (got {sum(d.values()):g})")


def validate(c: TrainConfig):
    _check(c.model.preset in MMDIT_PRESETS, "model.preset", f"unknown preset {c.model.preset!r}; choose one of {sorted(MMDIT_PRESETS)}")
    _check(c.model.patch_size >= 1, "model.patch_size", "must be >= 1")
    _check(c.steps > 0, "steps", "must be > 0")
    _check(c.log_every > 0, "log_every", "must be > 0")
    _check(c.ckpt_every > 0, "ckpt_every", "must be > 0")
    _check(c.workers >= 1, "workers", "must be >= 1")
    _check(0 <= c.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    _check(c.sefi.delta >= 0, "sefi.delta", "must be >= 0")
    _check(c.sefi.semantic_loss_weight >= 0, "sefi.semantic_loss_weight", "must be >= 0")
    _check(0 <= c.flow.caption_dropout < 1, "flow.caption_dropout", "must be in [0, 1)")
    _check(c.flow.logit_std > 0, "flow.logit_std", "must be > 0")
    _check(c.flow.max_shift >= 1, "flow.max_shift", "must be >= 1")
    d = c.data
    _check(d.resolution % 16 == 0 and d.resolution >= 32, "data.resolution", "must be a multiple of 16, >= 32")
    _check(d.global_batch_size % c.workers == 0, "data.global_batch_size",
           f"{d.global_batch_size} is not divisible by workers={c.workers}")
    per = d.global_batch_size // c.workers
    if d.micro_batch_size is not None:
        _check(d.micro_batch_size > 0 and per % d.micro_batch_size == 0, "data.micro_batch_size",
               f"must divide the per-worker batch {per}")
    _ratios(d.caption_kinds, "data.caption_kinds", ("general", "text", "knowledge", "structured", "alt"))
    _ratios(d.caption_types, "data.caption_types", ("short", "medium", "dense"))
    _ratios(d.languages, "data.languages", ("en", "zh"))
    _check(d.t2i_ratio >= 0 and d.ti2i_ratio >= 0, "data.t2i_ratio", "ratios must be >= 0")
    _check(abs(d.t2i_ratio + d.ti2i_ratio - 1) < 1e-6, "data.ti2i_ratio", "t2i_ratio + ti2i_ratio must be 1")
    _check(d.max_text_len > 0, "data.max_text_len", "must be > 0")
    o = c.optim
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(o.schedule in ("constant", "cosine"), "optim.schedule", "must be 'constant' or 'cosine'")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.grad_clip > 0, "optim.grad_clip", "must be > 0")
    _check(c.parallel.mixed_precision in ("bf16", "fp32"), "parallel.mixed_precision", "must be 'bf16' or 'fp32'")
    _check(c.parallel.compile_backend in ("inductor", "aot_eager", "eager"), "parallel.compile_backend",
           "must be inductor, aot_eager or eager")
    k = c.cluster
    _check(k.placement_strategy in PLACEMENT_STRATEGIES, "cluster.placement_strategy",
           f"unknown strategy {k.placement_strategy!r}; choose one of {', '.join(PLACEMENT_STRATEGIES)}")
    _check(k.cpus_per_worker >= 0, "cluster.cpus_per_worker", "must be >= 0")
    _check(k.backend in ("auto", "gloo", "nccl"), "cluster.backend", "must be auto, gloo or nccl")
    _check(k.backend != "nccl" or c.use_gpu, "cluster.backend", "nccl needs use_gpu (CPU runs use gloo)")
    _check(k.timeout_s > 0, "cluster.timeout_s", "must be > 0")
    _check(c.min_step_seconds >= 0, "min_step_seconds", "must be >= 0")
    _check(c.max_failures >= -1, "max_failures", "must be >= 0, or -1 for no limit")
    v = c.validation
    _check(v.every >= 0, "validation.every", "must be >= 0 (0 disables)")
    _check(len(v.prompts) > 0 or v.every == 0, "validation.prompts", "needs at least one prompt")
    _check(v.euler_steps > 0, "validation.euler_steps", "must be > 0")
    _check(c.monitor.timestep_buckets >= 1, "monitor.timestep_buckets", "must be >= 1")
    _check(c.monitor.peak_tflops is None or c.monitor.peak_tflops > 0, "monitor.peak_tflops", "must be > 0")
    if c.parallel.mixed_precision == "bf16":
        _check(c.use_gpu, "parallel.mixed_precision", "bf16 needs use_gpu (CPU/gloo runs use fp32)")


# ---------------------------------------------------------------- loading


def apply_override(d: dict, item: str) -> None:
    """``optim.lr=3e-4`` -> d["optim"]["lr"] = 3e-4 (value parsed as YAML)."""
    set_dotted(d, *parse_assignment(item))


def config_from_dict(d: dict) -> TrainConfig:
    return build(TrainConfig, d)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    d = read_yaml(path)
    for o in overrides:
        apply_override(d, o)
    return config_from_dict(d)


def config_to_dict(c: TrainConfig) -> dict:
    def conv(v):
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(c))
