"""Training-step throughput and MFU of the MMDiT on cached-latent-shaped inputs (plain PyTorch, one
device, no Ray).

    python benchmarks/train_mfu.py                 # CUDA: 1B preset, 256 px, bf16; else tiny on CPU
    python benchmarks/train_mfu.py --preset 2B --batch 16 --text-len 512

A step is forward + backward + AdamW on random latents/states of the cache's shapes (the data path is
not timed here). bf16 autocast over fp32 master weights (what FSDP2's bf16 MixedPrecisionPolicy
computes), blocks compiled with torch.compile as parallelize.py does.

FLOPs are counted honestly for a dual-stream model: ``6 * N * tokens`` where each token is charged
only the parameters it passes through (an image token the image stream's weights, a text token the
text stream's), N = transformer-block weights (no embedders, no per-sample modulation), plus the
attention matmuls (3 x 4 * Tq * Tk * dim per block). Charging every token all N (the naive 6*N*T for a
model whose streams split the weights) would double the figure; that number is printed for
comparison only. Last line: ``mfu: X.XX``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.config import ParallelConfig  # noqa: E402
from training.flops import GPU_PEAK_TFLOPS, cpu_peak_tflops, train_flops_per_sample  # noqa: E402
from training.flow import FlowArgs, flow_loss  # noqa: E402
from training.mmdit import MMDiT, count_params, make_args  # noqa: E402
from training.parallelize import parallelize  # noqa: E402


def run(model, opt, batch, fa, steps, device, dtype):
    x1, text, mask = batch
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = flow_loss(model, x1, text, mask, fa)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1B" if cuda else "tiny")
    ap.add_argument("--resolution", type=int, default=256, help="pixels; latent = resolution / vae-factor")
    ap.add_argument("--vae-factor", type=int, default=8)
    ap.add_argument("--channels", type=int, default=16, help="latent channels (f8c16 VAE)")
    ap.add_argument("--patch-size", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=256, help="condition-encoder tokens per sample")
    ap.add_argument("--text-dim", type=int, default=3584 if cuda else 64, help="condition-encoder width (Qwen2.5-VL-7B: 3584)")
    ap.add_argument("--batch", type=int, default=32 if cuda else 4)
    ap.add_argument("--steps", type=int, default=20 if cuda else 3)
    ap.add_argument("--warmup", type=int, default=5 if cuda else 1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--peak-tflops", type=float, help="override the device's peak (bf16 on GPU, fp32 on CPU)")
    a = ap.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name()
        peak = a.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
        if peak is None:
            print(f"error: --peak-tflops: unknown peak for {name}; pass it", file=sys.stderr)
            return 2
    else:
        name = f"CPU ({os.cpu_count()} cores)"
        peak = a.peak_tflops or cpu_peak_tflops()
    compile_ = cuda and not a.no_compile
    lat = a.resolution // a.vae_factor
    torch.manual_seed(0)
    model = MMDiT(make_args(a.preset, in_channels=a.channels, patch_size=a.patch_size, text_dim=a.text_dim)).to(device)
    parallelize(model, ParallelConfig(activation_checkpointing=a.ac, compile=compile_), distributed=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001, fused=cuda)
    t_img, t_txt = (lat // a.patch_size) ** 2, a.text_len
    batch = (torch.randn(a.batch, a.channels, lat, lat, device=device), torch.randn(a.batch, t_txt, a.text_dim, device=device),
             torch.ones(a.batch, t_txt, dtype=torch.bool, device=device))
    fa = FlowArgs(caption_dropout=0.0)

    run(model, opt, batch, fa, a.warmup, device, dtype)
    times = run(model, opt, batch, fa, a.steps, device, dtype)
    step_s = sorted(times)[len(times) // 2]  # median step
    flops, attn, naive = train_flops_per_sample(model, t_img, t_txt)
    tokens = a.batch * (t_img + t_txt)
    achieved = flops * a.batch / step_s
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    print(f"device: {name}; preset {a.preset}: {count_params(model) / 1e6:,.1f}M non-embedding params; "
          f"{a.resolution}px -> {t_img} image + {t_txt} text tokens x batch {a.batch}; "
          f"{'bf16 autocast' if cuda else 'fp32'}, compile={compile_}, ac={a.ac}{mem}")
    print(f"step: {step_s * 1e3:.1f} ms (median of {a.steps}); tokens/s: {tokens / step_s:,.0f}; samples/s: {a.batch / step_s:.1f}")
    print(f"FLOPs/step: {flops * a.batch / 1e12:.4g} TFLOP (attention {attn / flops:.1%}); achieved {achieved / 1e12:.4g} TFLOP/s "
          f"of {peak:.4g} peak{' (stated CPU peak: cores x 2.5 GHz x 32 FLOP/cycle)' if not cuda and not a.peak_tflops else ''}")
    print(f"naive 6*N*T count (every token charged both streams) would claim mfu {naive * a.batch / step_s / (peak * 1e12):.2f}")
    print(f"mfu: {achieved / (peak * 1e12):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
