"""The Ray Train loop: FSDP2 MMDiT, flow-matching loss on cached latents, AdamW, DCP checkpoints.

Reads top to bottom (nanoGPT / DiT ``train.py``): build model, parallelize, optimizer and schedule,
restore from ``ray.train.get_checkpoint()`` if any, then for each step draw the step's batch (a pure
function of the step, so a restart continues at the same data position), accumulate micro-batches,
clip, step, update the EMA, log the all-reduced loss, and every ``ckpt_every`` steps save a sharded
``torch.distributed.checkpoint`` reported as a Ray Train checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from training.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from training.data import LatentIndex, build_index, fetch_batch, null_text, plan_step
from training.flow import FlowArgs, euler_sample, flow_loss
from training.mmdit import MMDiT, count_params, make_args
from training.parallelize import parallelize


def flow_args(cfg: TrainConfig, meta: dict) -> FlowArgs:
    f = cfg.flow
    return FlowArgs(logit_mean=f.logit_mean, logit_std=f.logit_std, shift_base_tokens=f.shift_base_tokens,
                    max_shift=f.max_shift, caption_dropout=f.caption_dropout, sefi=cfg.sefi.enabled,
                    sefi_delta=cfg.sefi.delta, semantic_channels=int(meta.get("semantic_channels", 0)) if cfg.sefi.enabled else 0,
                    semantic_loss_weight=cfg.sefi.semantic_loss_weight)


def build_model(cfg: TrainConfig, meta: dict) -> MMDiT:
    over = {"depth": cfg.model.depth} if cfg.model.depth else {}
    c = int(meta["latent_channels"]) - (0 if cfg.sefi.enabled else int(meta.get("semantic_channels", 0)))
    args = make_args(cfg.model.preset, in_channels=c, patch_size=cfg.model.patch_size,
                     text_dim=int(meta["text_dim"]), num_timesteps=2 if cfg.sefi.enabled else 1, **over)
    return MMDiT(args)


def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        p = min(1.0, (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


def check_against_cache(cfg: TrainConfig, index: LatentIndex) -> None:
    """Config/cache mismatches fail in the driver, naming the field, before workers start."""
    meta = index.meta
    if int(meta.get("resolution", -1)) != cfg.data.resolution:
        raise ConfigError(f"data.resolution: config says {cfg.data.resolution} but the latent cache was encoded at "
                          f"{meta.get('resolution')} (re-encode with jobs/encode_latents.py --resolution)")
    if cfg.sefi.enabled and int(meta.get("semantic_channels", 0)) <= 0:
        raise ConfigError("sefi.enabled: the latent cache has no semantic channels (encode with --semantic-encoder)")
    factor = int(meta.get("vae_factor", 1))
    for h, w in index.buckets:
        if (h // factor) % cfg.model.patch_size or (w // factor) % cfg.model.patch_size:
            raise ConfigError(f"model.patch_size: bucket {h}x{w} gives a latent not divisible by {cfg.model.patch_size}")
    if cfg.data.ti2i_ratio > 0:
        index.pools(True)  # raises naming data.ti2i_ratio when the cache has no TI2I rows
    index.pools(False)


# ---------------------------------------------------------------- checkpoint state


def _ema_state(model, ema):
    return {n: e for (n, _), e in zip(model.named_parameters(), ema, strict=True)}


def save_checkpoint(d: str, model, opt, sched, ema, step: int, sample: torch.Tensor | None = None) -> None:
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=False))
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = _ema_state(model, ema)
    dcp.save(state, checkpoint_id=d)
    if dist.get_rank() == 0:
        Path(d, "trainer_state.json").write_text(json.dumps({"step": step, "scheduler": sched.state_dict()}))
        if sample is not None:
            np.save(Path(d, "sample_latent.npy"), sample.float().cpu().numpy())


def load_checkpoint(d: str, model, opt, sched, ema) -> int:
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=False))
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = _ema_state(model, ema)
    dcp.load(state, checkpoint_id=d)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ts = json.loads(Path(d, "trainer_state.json").read_text())
    sched.load_state_dict(ts["scheduler"])
    return int(ts["step"])


def load_weights(d: str, model, ema) -> None:
    """Model weights only (stage to stage): resharded by DCP to this run's world size."""
    msd = get_model_state_dict(model)
    dcp.load({"model": msd}, checkpoint_id=d)
    set_model_state_dict(model, msd)
    if ema is not None:
        with torch.no_grad():
            torch._foreach_copy_(ema, [p.detach() for p in model.parameters()])


# ---------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> None:
    cfg: TrainConfig = config_from_dict(config["config"])
    index: LatentIndex = config["index"]
    log_path = config.get("log_path")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one CPU per Ray Train worker by default: don't oversubscribe
    meta = index.meta
    # A SeFi cache trains a plain model too: the semantic channels are then dropped.
    keep_c = int(meta["latent_channels"]) - (0 if cfg.sefi.enabled else int(meta.get("semantic_channels", 0)))
    fa = flow_args(cfg, meta)

    # Built on the meta device and initialised after sharding (torchtitan style), so no rank ever holds
    # the full model: the 22.5B preset would need 90 GB per rank otherwise. Each rank draws its own
    # shard's values (the init is i.i.d. per element, so seed + rank gives the same distribution;
    # on CUDA meshes DTensor's RNG tracker makes it match a full-tensor init exactly).
    with torch.device("meta"):
        model = build_model(cfg, meta)
    n_params = count_params(model)
    parallelize(model, cfg.parallel, distributed=True)
    model.to_empty(device=device)
    torch.manual_seed(cfg.data.seed + rank)
    with torch.no_grad():
        model.init_weights()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = [p.detach().clone() for p in model.parameters()] if cfg.ema_decay > 0 else None

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            start = load_checkpoint(d, model, opt, sched, ema)
    elif cfg.init_from:
        load_weights(cfg.init_from, model, ema)
    null = tuple(t.to(device) for t in null_text(index, cfg.data.max_text_len))

    per_rank = cfg.data.global_batch_size // world
    micro = cfg.data.micro_batch_size or per_rank
    n_micro = per_rank // micro
    p = cfg.model.patch_size
    t_last, last_logged = time.perf_counter(), start
    for step in range(start, cfg.steps):
        if cfg.fault_injection_step is not None and start == 0 and step == cfg.fault_injection_step and rank == min(1, world - 1):
            raise RuntimeError(f"fault_injection_step: injected worker failure before step {step}")
        plan = plan_step(index, step, cfg.data.global_batch_size, cfg.data.seed, cfg.data.t2i_ratio,
                         cfg.data.caption_types, cfg.data.languages, cfg.data.caption_kinds)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        rows, trows = plan.latent_rows[mine], plan.text_rows[mine]
        loss_sum = torch.zeros((), device=device)
        parts_sum: dict[str, torch.Tensor] = {}
        tokens = 0
        for m in range(n_micro):
            sl = slice(m * micro, (m + 1) * micro)
            batch = fetch_batch(index, rows[sl], trows[sl], cfg.data.max_text_len, with_ref=plan.ti2i)
            x1 = batch["latent"][:, :keep_c].to(device)
            refs = [batch["ref"].to(device)] if plan.ti2i else None
            # Noise, timesteps and caption dropout: a pure function of (seed, step, rank, micro-batch).
            gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.data.seed, step, rank, m]).generate_state(1)[0]))
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(m == n_micro - 1)  # reduce-scatter once per step
            loss, parts = flow_loss(model, x1, batch["text"].to(device), batch["text_mask"].to(device), fa,
                                    generator=gen, refs=refs, null_text=null)
            (loss / n_micro).backward()
            loss_sum += loss.detach() / n_micro
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v / n_micro
            img_tok = (x1.shape[2] // p) * (x1.shape[3] // p) * (2 if refs else 1)
            tokens += x1.shape[0] * (img_tok + batch["text"].shape[1])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        lr_used = opt.param_groups[0]["lr"]
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [q.detach() for q in model.parameters()], 1 - cfg.ema_decay)

        done = step + 1
        is_ckpt = done % cfg.ckpt_every == 0 or done == cfg.steps
        if not (is_ckpt or done % cfg.log_every == 0):
            continue
        # All-reduced (mean over ranks) loss for logging, like DiT's train.py.
        logged = torch.stack([loss_sum, *parts_sum.values(), torch.tensor(float(tokens), device=device)])
        dist.all_reduce(logged)
        now = time.perf_counter()
        steps_since = done - last_logged
        metrics = {"step": done, "loss": logged[0].item() / world, "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                   "lr": lr_used, "ti2i": plan.ti2i, "bucket": f"{plan.bucket[0]}x{plan.bucket[1]}",
                   "tokens_per_s": logged[-1].item() * steps_since / max(1e-9, now - t_last),
                   "samples_per_s": cfg.data.global_batch_size * steps_since / max(1e-9, now - t_last),
                   "non_embedding_params": n_params, "resumed_from": start}
        for i, k in enumerate(parts_sum):
            metrics[k] = logged[1 + i].item() / world
        t_last, last_logged = now, done
        if rank == 0:
            parts_txt = "".join(f" {k} {metrics[k]:.4f}" for k in parts_sum if k != "loss")
            print(f"[{cfg.name}] step {done}/{cfg.steps} loss {metrics['loss']:.4f}{parts_txt} grad_norm {metrics['grad_norm']:.3f} "
                  f"lr {metrics['lr']:.2e} {metrics['bucket']}{' ti2i' if plan.ti2i else ''} tokens/s {metrics['tokens_per_s']:,.0f}",
                  flush=True)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
        # Ray Train reports are a barrier across workers: only at checkpoints (the jsonl log has every
        # logged step).
        if is_ckpt:
            sample = smoke_sample(model, index, cfg, fa, device, null) if done == cfg.steps else None
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, opt, sched, ema, done, sample)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=f"step_{done:08d}")


def smoke_sample(model, index: LatentIndex, cfg: TrainConfig, fa: FlowArgs, device, null) -> torch.Tensor:
    """A 2-image Euler/CFG sample of the first caption at the most common bucket (all ranks run it:
    FSDP needs every rank in each forward)."""
    keys, pools, probs = index.pools(False)
    b = int(np.argmax(probs))
    r = int(pools[b][0])
    text_row = index.texts[r][0][0]
    batch = fetch_batch(index, [r, r], [text_row, text_row], cfg.data.max_text_len, with_ref=False)
    g = torch.Generator().manual_seed(cfg.data.seed)
    shape = (2, model.args.in_channels, *batch["latent"].shape[2:])
    noise = torch.randn(shape, generator=g).to(device)
    model.eval()
    x = euler_sample(model, noise, batch["text"].to(device), batch["text_mask"].to(device), null, fa, steps=8, cfg=4.0)
    model.train()
    return x


# ---------------------------------------------------------------- driver


def resolve_init_from(path: str) -> str:
    """A checkpoint dir (has DCP ``.metadata``) or a run dir: its latest ``step_*`` checkpoint."""
    p = Path(path)
    if (p / ".metadata").is_file():
        return str(p)
    steps = sorted(q for q in p.glob("step_*") if (q / ".metadata").is_file())
    if not steps:
        raise ConfigError(f"init_from: no checkpoint at {path} (neither a DCP checkpoint nor a run dir with step_*)")
    return str(steps[-1])


def fit(cfg: TrainConfig, data: str, storage: str, log_path: str | None = None):
    """Build the index (Ray Data), check it against the config, and run the TorchTrainer. Rerunning
    with the same ``storage`` and ``cfg.name`` resumes from the latest checkpoint."""
    if cfg.init_from:
        cfg = dataclasses.replace(cfg, init_from=resolve_init_from(cfg.init_from))
    index = build_index(data)
    check_against_cache(cfg, index)
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_to_dict(cfg), "index": index, "log_path": log_path},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=cfg.name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    return trainer.fit()


def write_sample_png(checkpoint_dir: str, data: str, out: Path) -> str | None:
    """Decode the final checkpoint's smoke-sample latents with the cache's VAE into a PNG strip."""
    import lance
    from PIL import Image

    from training.encoders import VAE
    from training.latents_schema import read_metadata

    f = Path(checkpoint_dir, "sample_latent.npy")
    if not f.is_file():
        return None
    meta = read_metadata(lance.dataset(f"{data}/latents.lance").schema)
    z = torch.from_numpy(np.load(f))
    z = z[:, : z.shape[1] - int(meta.get("semantic_channels", 0))]  # SeFi: decode the texture channels
    try:
        vae = VAE.load(meta["vae"])
    except FileNotFoundError:
        return None
    img = ((vae.decode(z) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(img), 1)).save(out)
    return str(out)
