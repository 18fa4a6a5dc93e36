"""The trainer's real step (training.trainer.train_step: FSDP2, bf16 mixed precision, torch.compile,
activation checkpointing per preset, AdamW, grad clip, EMA) for a fixed number of steps on one device,
on cached-latent-shaped random inputs. Prints peak memory, the arithmetic estimate of it
(training/memory.py) and, on the last line, ``mfu: X.XX``.

    python benchmarks/train_gpu_step.py                                  # CUDA: 1B preset, 256 px, batch 32
    python benchmarks/train_gpu_step.py --preset 2B --micro-batch 16 --n-micro 2
    python benchmarks/train_gpu_step.py --device cpu --preset tiny       # what the test runs

FSDP2 runs in a one-rank process group (nccl on CUDA, gloo on CPU), so the step is the one a Ray Train
worker runs, sharding hooks included. MFU counts model FLOPs (training/flops.py; AC's recompute is not
counted) against the device's dense bf16 peak (CPU: the stated fp32 peak).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from training.config import ParallelConfig  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.flops import FlopCounter, device_peak_tflops  # noqa: E402
from training.flow import FlowArgs  # noqa: E402
from training.memory import GiB, estimate  # noqa: E402
from training.mmdit import MMDiT, count_params, make_args  # noqa: E402
from training.parallelize import parallelize  # noqa: E402
from training.trainer import MicroBatch, train_step  # noqa: E402

# Activation checkpointing per preset, as the stage configs set it (1B fits batch 32 at 256 px without).
AC_BY_PRESET = {"tiny": False, "small": False, "1B": False, "2B": True, "paper": True}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--preset", default="1B")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--vae-factor", type=int, default=8)
    ap.add_argument("--channels", type=int, default=16, help="latent channels (f8c16 VAE)")
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--text-dim", type=int, default=3584, help="condition-encoder width (Qwen2.5-VL-7B: 3584)")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--n-micro", type=int, default=1, help="gradient-accumulation micro-batches per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--ac", action=argparse.BooleanOptionalAction, default=None, help="default: per preset")
    ap.add_argument("--peak-tflops", type=float)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not cuda:
        print("error: --device: CUDA is not available (use --device cpu --preset tiny)", file=sys.stderr)
        return 2
    device = torch.device(a.device)
    compile_ = a.device == "cuda" if a.compile is None else a.compile
    ac = AC_BY_PRESET.get(a.preset, True) if a.ac is None else a.ac
    peak = device_peak_tflops(device, a.peak_tflops)
    if peak is None:
        print(f"error: --peak-tflops: unknown peak for {torch.cuda.get_device_name()}; pass it", file=sys.stderr)
        return 2
    if cuda and a.device == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    tmp = tempfile.mkdtemp()
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    try:
        with torch.device("meta"):
            model = MMDiT(make_args(a.preset, in_channels=a.channels, patch_size=a.patch_size, text_dim=a.text_dim))
        flops = FlopCounter(model)
        pc = ParallelConfig(mixed_precision="bf16" if a.device == "cuda" else "fp32", activation_checkpointing=ac,
                            compile=compile_, compile_backend=a.compile_backend)
        parallelize(model, pc, distributed=True)
        model.to_empty(device=device)
        torch.manual_seed(0)
        with torch.no_grad():
            model.init_weights()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ema = EMA(model, 0.9999)
        lat = a.resolution // a.vae_factor
        g = torch.Generator().manual_seed(0)
        mbs = [MicroBatch(torch.randn(a.micro_batch, a.channels, lat, lat, generator=g).to(device),
                          torch.randn(a.micro_batch, a.text_len, a.text_dim, generator=g).to(device),
                          torch.ones(a.micro_batch, a.text_len, dtype=torch.bool, device=device), None,
                          np.arange(a.micro_batch) + m * a.micro_batch) for m in range(a.n_micro)]
        fa = FlowArgs(caption_dropout=0.0)
        t_img = (lat // a.patch_size) ** 2

        def step():
            res = train_step(model, opt, sched, ema, mbs, fa, None, 1.0, flops=flops)
            float(res["loss"])  # sync
            return res

        t0 = time.perf_counter()
        for _ in range(a.warmup):
            step()
        warm_s = time.perf_counter() - t0
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            res = step()
            if a.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_s = float(np.median(times))
        achieved = res["flops"] / step_s
        if a.device == "cuda":
            mem = f"peak memory {torch.cuda.max_memory_allocated() / GiB:.1f} GiB allocated, {torch.cuda.max_memory_reserved() / GiB:.1f} GiB reserved"
            name = torch.cuda.get_device_name()
        else:
            mem = f"peak memory (process max RSS) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
            name = f"CPU ({os.cpu_count()} cores)"
        est = estimate(model.args, t_img, a.text_len, a.micro_batch, 1, ac)
        samples = a.micro_batch * a.n_micro
        print(f"device: {name}; preset {a.preset}: {count_params(model) / 1e6:,.1f}M non-embedding params; {a.resolution}px -> "
              f"{t_img} image + {a.text_len} text tokens; micro-batch {a.micro_batch} x {a.n_micro}; "
              f"{pc.mixed_precision}, compile={compile_} ({a.compile_backend}), ac={ac}, FSDP2 (1 rank), EMA")
        print(f"warmup ({a.warmup} steps, includes compilation): {warm_s:.1f} s")
        print(f"step: {step_s * 1e3:.1f} ms (median of {a.steps}); samples/s {samples / step_s:.1f}; "
              f"tokens/s {res['tokens'] / step_s:,.0f}; {achieved / 1e12:.4g} TFLOP/s of {peak:.4g} peak")
        print(f"{mem}; arithmetic estimate (training/memory.py) {est.total / GiB:.1f} GiB")
        print(f"mfu: {achieved / (peak * 1e12):.2f}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
