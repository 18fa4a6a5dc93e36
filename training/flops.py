"""Training FLOPs of the dual-stream MMDiT and the device peak, for MFU (the trainer's log and the
benchmarks share this one count).

Each token is charged only the weights it passes through: an image token the image stream's linear
layers, a text token the text stream's; N = transformer-block weights (no embedders, no per-sample
modulation), plus the attention matmuls (4 * Tq * Tk * dim per block), times 3 for forward + backward.
The naive ``6 * N * T`` charges every token both streams' weights and roughly doubles the figure for a
dual-stream model; it is returned for comparison only. Activation checkpointing's recomputation is not
counted (MFU counts useful model FLOPs, as in PaLM's definition).
"""

from __future__ import annotations

import os

import torch

from training.mmdit import MMDiT, count_params

# Dense bf16 peak of common accelerators (TFLOP/s, no sparsity), matched on the device name in order.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def cpu_peak_tflops() -> float:
    """Stated CPU peak: cores x 2.5 GHz x 32 fp32 FLOP/cycle (two 8-lane AVX2 FMA units)."""
    return (os.cpu_count() or 1) * 2.5e9 * 32 / 1e12


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Peak of one device: ``override``, the GPU table by name, or the stated CPU peak; None if unknown."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    return cpu_peak_tflops()


def train_flops_per_sample(model: MMDiT, t_img: int, t_txt: int) -> tuple[float, float, float]:
    """(training FLOPs, of which attention, naive 6*N*T) for one sample with ``t_img`` image tokens
    (target plus any reference) and ``t_txt`` text tokens."""
    a = model.args
    matmul = attn = 0.0
    for b in model.blocks:
        def tok_params(s):  # weights applied per token (modulation is per sample, norms ~free)
            return sum(m.weight.numel() for n, m in s.named_modules() if isinstance(m, torch.nn.Linear) and n != "mod")

        matmul += 2 * (tok_params(b.img) * t_img + tok_params(b.txt) * t_txt)
        t_q = t_img if getattr(b, "last", False) else t_img + t_txt
        attn += 4 * t_q * (t_img + t_txt) * a.dim  # QK^T and PV, 2 FLOPs per MAC each
    naive = 6 * count_params(model) * (t_img + t_txt) + 3 * attn
    return 3 * (matmul + attn), 3 * attn, naive


class FlopCounter:
    """Cached per-(t_img, t_txt) FLOPs of one sample for a model (the blocks' weights are counted once;
    works on sharded and checkpoint-wrapped models because it reads full parameter shapes)."""

    def __init__(self, model: torch.nn.Module):
        a = model.args
        d, h = a.dim, a.mlp_hidden
        full = 3 * d * d + d * d + 3 * d * h  # qkv, out proj, SwiGLU (w1, w2, w3)
        pre_only = 2 * d * d  # the last block's text stream: keys and values only
        self.dim, self.depth = d, a.depth
        self.img = a.depth * full
        self.txt = (a.depth - 1) * full + pre_only

    def __call__(self, t_img: int, t_txt: int) -> float:
        matmul = 2 * (self.img * t_img + self.txt * t_txt)
        t_all = t_img + t_txt
        attn = 4 * ((self.depth - 1) * t_all + t_img) * t_all * self.dim
        return 3 * (matmul + attn)
