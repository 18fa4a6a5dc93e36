"""The Ray Train loop: FSDP2 MMDiT, flow-matching loss on cached latents, AdamW, DCP checkpoints.

Reads top to bottom (nanoGPT / DiT ``train.py``): build model, parallelize, optimizer and schedule,
restore from ``ray.train.get_checkpoint()`` if any, then for each step draw the step's batch (a pure
function of the step, so a restart continues at the same data position), accumulate micro-batches,
clip, step, update the EMA, log the all-reduced loss, and every ``ckpt_every`` steps save a sharded
``torch.distributed.checkpoint`` reported as a Ray Train checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from training.config import ConfigError, TrainConfig, config_from_dict, config_to_dict
from training.data import LatentIndex, bucket_table, build_index, fetch_batch, nearest_bucket, null_text
from training.ema import EMA, clean_name
from training.flops import FlopCounter, device_peak_tflops
from training.flow import FlowArgs, draw, euler_sample, flow_loss
from training.mmdit import MMDiT, count_params, make_args
from training.monitor import Monitor, TimestepBuckets, encode_prompts
from training.parallelize import parallelize
from training.plan import MicroPlan, plan_micro_batches
from training.sefi import STATS_KEY, ensure_semantic_stats, normalize_semantic


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


def data_position(cfg: TrainConfig, index: LatentIndex, step: int) -> dict:
    """Where the data stream stands after ``step`` steps. The batch of a step is a pure function of
    (seed, step) over the index of pinned table versions, so this is the whole loader state: a resume
    from it draws exactly the batches an uninterrupted run would."""
    return {"next_step": step, "samples_consumed": step * cfg.data.global_batch_size, "seed": cfg.data.seed,
            "global_batch_size": cfg.data.global_batch_size, "latents_version": index.latents_version,
            "text_version": index.text_version}


def save_checkpoint(d: str, model, opt, sched, ema: EMA | None, step: int, extra: dict, sample: torch.Tensor | None = None) -> None:
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=False))
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    dcp.save(state, checkpoint_id=d)
    if dist.get_rank() == 0:
        Path(d, "trainer_state.json").write_text(json.dumps({"step": step, "scheduler": sched.state_dict(), **extra}))
        if sample is not None:
            np.save(Path(d, "sample_latent.npy"), sample.float().cpu().numpy())


def load_checkpoint(d: str, model, opt, sched, ema: EMA | None) -> dict:
    """Restore the shards in place; returns the checkpoint's trainer_state.json (step, data_position, ...)."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=False))
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    dcp.load(state, checkpoint_id=d)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ts = json.loads(Path(d, "trainer_state.json").read_text())
    sched.load_state_dict(ts["scheduler"])
    return ts


def load_weights(d: str, model, ema: EMA | None, from_ema: bool) -> None:
    """Stage to stage: the previous stage's EMA (or raw) weights, resharded by DCP to this run's world
    size, start both the model and this stage's EMA."""
    if from_ema:
        params = {clean_name(n): p.detach() for n, p in model.named_parameters()}
        dcp.load({"ema": params}, checkpoint_id=d)  # in place into this rank's parameter shards
    else:
        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=d)
        set_model_state_dict(model, msd)
    if ema is not None:
        ema.copy_from(model)


def checkpoint_keys(d: str) -> set[str]:
    """Top-level keys of a DCP checkpoint (model, optim, ema), from its metadata."""
    md = dcp.FileSystemReader(d).read_metadata()
    return {k.split(".", 1)[0] for k in md.state_dict_metadata}


# ---------------------------------------------------------------- the step


@dataclass
class MicroBatch:
    x1: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    refs: list[torch.Tensor] | None
    seeds: np.ndarray  # one per sample: noise, timestep and dropout (flow.draw)


def load_micro_batch(index: LatentIndex, mp: MicroPlan, keep_c: int, max_text_len: int, device, sem_stats: dict | None,
                     sem_c: int) -> MicroBatch:
    batch = fetch_batch(index, mp.latent_rows, mp.text_rows, max_text_len, with_ref=mp.ti2i)
    x1 = normalize_semantic(batch["latent"], sem_stats, sem_c)[:, :keep_c]
    return MicroBatch(x1.to(device), batch["text"].to(device), batch["text_mask"].to(device),
                      [batch["ref"].to(device)] if mp.ti2i else None, mp.sample_seeds)


def train_step(model, opt, sched, ema: EMA | None, micro_batches: list[MicroBatch], fa: FlowArgs, null, grad_clip: float,
               buckets: TimestepBuckets | None = None, flops: FlopCounter | None = None, on_micro=None) -> dict:
    """Forward/backward over the micro-batches, clip, AdamW step, EMA update. Returns the rank-local
    loss (mean over micro-batches), its parts, the grad norm, the lr used, tokens and FLOPs.

    Gradient sync stays on for every micro-batch: FSDP2 reduce-scatters each micro-batch's gradient
    and adds it into the sharded ``.grad``, so between micro-steps a rank holds only its gradient
    shard (4P/N bytes), never the full fp32 gradient (4P). The price is one reduce-scatter per
    micro-batch instead of one per step (README, "Memory"). ``on_micro(m, model)`` runs after each
    micro-batch's backward (tests inspect the gradients there).
    """
    n = len(micro_batches)
    p = model.args.patch_size
    out: dict = {"loss": 0.0, "tokens": 0, "flops": 0.0}
    for m, mb in enumerate(micro_batches):
        rec: dict = {}
        img_tok = (mb.x1.shape[2] // p) * (mb.x1.shape[3] // p)
        fixed = draw(mb.x1.shape, fa, img_tok, mb.seeds)
        loss, parts = flow_loss(model, mb.x1, mb.text, mb.text_mask, fa, refs=mb.refs, null_text=null, fixed=fixed, record=rec)
        (loss / n).backward()
        for k, v in parts.items():
            out[k] = out.get(k, 0.0) + v / n
        if buckets is not None:
            buckets.add(rec["t"], rec["sample_loss"])
        all_img = img_tok * (1 + len(mb.refs or []))
        out["tokens"] += mb.x1.shape[0] * (all_img + mb.text.shape[1])
        if flops is not None:
            out["flops"] += mb.x1.shape[0] * flops(all_img, mb.text.shape[1])
        if on_micro is not None:
            on_micro(m, model)
    out["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    out["lr"] = opt.param_groups[0]["lr"]
    sched.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    return out


def _full(x) -> float:
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


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
    sem_c = int(meta.get("semantic_channels", 0))
    # A SeFi cache trains a plain model too: the semantic channels are then dropped.
    keep_c = int(meta["latent_channels"]) - (0 if cfg.sefi.enabled else sem_c)
    sem_stats = meta.get(STATS_KEY) if cfg.sefi.enabled else None
    fa = flow_args(cfg, meta)

    # Built on the meta device and initialised after sharding (torchtitan style), so no rank ever holds
    # the full model: the 22.5B preset would need 90 GB per rank otherwise. Each rank draws its own
    # shard's values (the init is i.i.d. per element, so seed + rank gives the same distribution;
    # on CUDA meshes DTensor's RNG tracker makes it match a full-tensor init exactly).
    with torch.device("meta"):
        model = build_model(cfg, meta)
    n_params = count_params(model)
    flops = FlopCounter(model)
    parallelize(model, cfg.parallel, distributed=True)
    model.to_empty(device=device)
    torch.manual_seed(cfg.data.seed + rank)
    with torch.no_grad():
        model.init_weights()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            ts = load_checkpoint(d, model, opt, sched, ema)
        start = int(ts["step"])
        pos, now = ts.get("data_position"), data_position(cfg, index, start)
        if rank == 0:
            # A rerun with another seed, batch size or cache version resumes the weights but draws
            # another data stream from here: say so (a restart after a failure never does).
            same = pos is None or pos == now
            print(f"[{cfg.name}] resumed from step {start} at data position {now}"
                  + ("" if same else f"; the checkpoint's data position was {pos}: the data stream differs"), flush=True)
    elif cfg.init_from:
        load_weights(cfg.init_from, model, ema, cfg.init_from_ema)
    null = tuple(t.to(device) for t in null_text(index, cfg.data.max_text_len))
    consumed = Path(log_path).parent / "consumed" / f"rank_{rank}.jsonl" if log_path and cfg.monitor.log_consumed else None
    if consumed is not None:
        consumed.parent.mkdir(parents=True, exist_ok=True)
    extra = {"model_args": dataclasses.asdict(model.args), "flow_args": dataclasses.asdict(fa), "semantic_stats": sem_stats,
             "vae": meta.get("vae"), "config": config["config"]}

    per_rank = cfg.data.global_batch_size // world
    micro = cfg.data.micro_batch_size or per_rank
    n_micro = per_rank // micro
    d = cfg.data
    mon = Monitor(log_path if rank == 0 else None, cfg.monitor.tensorboard, cfg.validation.prompts, meta)
    buckets = TimestepBuckets(cfg.monitor.timestep_buckets, device)
    peak = device_peak_tflops(device, cfg.monitor.peak_tflops)
    window = {"time": 0.0, "steps": 0, "tokens": 0.0, "flops": 0.0, "ti2i": 0.0}
    for step in range(start, cfg.steps):
        if cfg.fault_injection_step is not None and start == 0 and step == cfg.fault_injection_step and rank == min(1, world - 1):
            raise RuntimeError(f"fault_injection_step: injected worker failure before step {step}")
        t0 = time.perf_counter()
        plans = plan_micro_batches(index, step, global_batch=d.global_batch_size, micro=micro, seed=d.seed,
                                   t2i_ratio=d.t2i_ratio, caption_kinds=d.caption_kinds, caption_types=d.caption_types,
                                   languages=d.languages)
        mine = plans[rank * n_micro:(rank + 1) * n_micro]
        mbs = [load_micro_batch(index, mp, keep_c, d.max_text_len, device, sem_stats, sem_c) for mp in mine]
        res = train_step(model, opt, sched, ema, mbs, fa, null, o.grad_clip, buckets, flops)
        if consumed is not None:
            line = json.dumps({"step": step + 1, "resumed_from": start, "latent_rows": [int(r) for mp in mine for r in mp.latent_rows],
                               "text_rows": [int(r) for mp in mine for r in mp.text_rows]}) + "\n"
            fd = os.open(consumed, os.O_WRONLY | os.O_CREAT | os.O_APPEND)  # one write per line: a kill leaves whole lines
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        window["time"] += time.perf_counter() - t0
        window["steps"] += 1
        window["tokens"] += res["tokens"]
        window["flops"] += res["flops"]
        window["ti2i"] += sum(mp.ti2i for mp in plans) / len(plans)
        if cfg.min_step_seconds:
            time.sleep(max(0.0, cfg.min_step_seconds - (time.perf_counter() - t0)))

        done = step + 1
        is_ckpt = done % cfg.ckpt_every == 0 or done == cfg.steps
        every = cfg.validation.every
        if every and (done % every == 0 or done == cfg.steps):
            with ema.applied(model) if ema is not None else contextlib.nullcontext():
                lat = validation_sample(model, cfg, fa, device, null, config["validation_states"], config["validation_bucket"],
                                        int(meta.get("vae_factor", 8)), rank, world)
            if rank == 0:
                mon.validation_images(done, lat)
        if not (is_ckpt or done % cfg.log_every == 0):
            continue
        # All-reduced (mean over ranks) loss for logging, like DiT's train.py.
        part_keys = [k for k in res if k.startswith("loss") or k == "semantic_masked"]
        logged = torch.tensor([float(res[k]) for k in part_keys] + [window["tokens"], window["flops"], window["time"]],
                              device=device, dtype=torch.float64)
        dist.all_reduce(logged)
        dist.all_reduce(buckets.sums)
        secs = logged[-1].item() / world  # mean wall time of the training steps since the last log
        metrics = {"step": done, **{k: logged[i].item() / world for i, k in enumerate(part_keys)},
                   "grad_norm": _full(res["grad_norm"]), "lr": res["lr"], "ti2i_fraction": window["ti2i"] / window["steps"],
                   "tokens_per_s": logged[-3].item() / secs, "samples_per_s": d.global_batch_size * window["steps"] / secs,
                   "tflops_per_s_per_device": logged[-2].item() / secs / world / 1e12,
                   "non_embedding_params": n_params, "resumed_from": start, **buckets.metrics(buckets.sums)}
        if peak:
            metrics["mfu"] = metrics["tflops_per_s_per_device"] / peak
        buckets.reset()
        window = dict.fromkeys(window, 0.0)
        if rank == 0:
            parts_txt = "".join(f" {k} {metrics[k]:.4f}" for k in part_keys if k != "loss")
            mfu_txt = f" mfu {metrics['mfu']:.3f}" if "mfu" in metrics else ""
            print(f"[{cfg.name}] step {done}/{cfg.steps} loss {metrics['loss']:.4f}{parts_txt} grad_norm {metrics['grad_norm']:.3f} "
                  f"lr {metrics['lr']:.2e} ti2i {metrics['ti2i_fraction']:.2f} tokens/s {metrics['tokens_per_s']:,.0f}"
                  f"{mfu_txt}", flush=True)
            mon.log(metrics)
        # Ray Train reports are a barrier across workers: only at checkpoints (the jsonl log has every
        # logged step).
        if is_ckpt:
            sample = None
            if done == cfg.steps:
                with ema.applied(model) if ema is not None else contextlib.nullcontext():
                    sample = smoke_sample(model, index, cfg, fa, device, null)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, model, opt, sched, ema, done, {**extra, "data_position": data_position(cfg, index, done)}, sample)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{done:08d}")
    mon.close()


def validation_sample(model, cfg: TrainConfig, fa: FlowArgs, device, null, states: list[np.ndarray], bucket: tuple[int, int],
                      vae_factor: int, rank: int, world: int) -> torch.Tensor | None:
    """The validation prompts, split over the ranks (FSDP needs every rank in each forward), sampled
    with the same per-prompt noise every time; the latents are gathered on rank 0."""
    n = len(states)
    k = -(-n // world)
    mine = [min(i, n - 1) for i in range(rank * k, (rank + 1) * k)]  # the last rank pads with repeats
    L = max(len(states[i]) for i in mine)
    text = torch.zeros(k, L, states[0].shape[1])
    mask = torch.zeros(k, L, dtype=torch.bool)
    for j, i in enumerate(mine):
        text[j, : len(states[i])] = torch.from_numpy(states[i].astype(np.float32))
        mask[j, : len(states[i])] = True
    shape = (model.args.in_channels, bucket[0] // vae_factor, bucket[1] // vae_factor)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(cfg.validation.seed * 100003 + i)) for i in mine])
    model.eval()
    x = euler_sample(model, noise.to(device), text.to(device), mask.to(device), null, fa,
                     steps=cfg.validation.euler_steps, cfg=cfg.validation.cfg_scale)
    model.train()
    gathered = [None] * world
    dist.all_gather_object(gathered, x.float().cpu())
    if rank != 0:
        return None
    return torch.cat(gathered)[[r * k + j for r in range(world) for j in range(k) if r * k + j < n]]


def smoke_sample(model, index: LatentIndex, cfg: TrainConfig, fa: FlowArgs, device, null) -> torch.Tensor:
    """A 2-image Euler/CFG sample of the first caption at the most common bucket (all ranks run it:
    FSDP needs every rank in each forward); the caller swaps the EMA weights in."""
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
    """Check the config against the cache (and init_from), build the index (Ray Data), encode the
    validation prompts, and run the TorchTrainer. Rerunning with the same ``storage`` and ``cfg.name``
    resumes from the latest checkpoint."""
    if cfg.init_from:
        cfg = dataclasses.replace(cfg, init_from=resolve_init_from(cfg.init_from))
        if cfg.init_from_ema and "ema" not in checkpoint_keys(cfg.init_from):
            raise ConfigError(f"init_from_ema: {cfg.init_from} holds no EMA weights (its run had ema_decay 0); "
                              "set init_from_ema=false to start from its raw weights")
    if cfg.sefi.enabled:
        try:
            ensure_semantic_stats(f"{data}/latents.lance")  # caches encoded before the statistics existed
        except (OSError, ValueError):
            pass  # no cache there: build_index names --data
    index = build_index(data)
    check_against_cache(cfg, index)
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    loop_config = {"config": config_to_dict(cfg), "index": index, "log_path": log_path}
    if cfg.validation.every:
        loop_config["validation_states"] = encode_prompts(index.meta, cfg.validation.prompts, cfg.use_gpu)
        loop_config["validation_bucket"] = nearest_bucket(1, 1, bucket_table(cfg.data.resolution, int(index.meta.get("bucket_multiple", 32))))
    k = cfg.cluster
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=None if k.backend == "auto" else k.backend, timeout_s=k.timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, placement_strategy=k.placement_strategy,
                                     resources_per_worker={"CPU": k.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        # A lost worker (process killed, node gone) fails the worker group; Ray Train then restarts
        # all workers from the latest reported checkpoint, which holds the data position.
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
