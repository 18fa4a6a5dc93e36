"""Peak GPU memory of one training rank, by arithmetic: what FSDP2 shards, what it does not, and the
activations of one micro-batch with and without activation checkpointing.

    python -m training.memory                      # the README table (presets x resolutions)
    python -m training.memory --config configs/train/continual_2048.yaml

Per rank, with P parameters, N ranks, FSDP2 bf16 mixed precision and AdamW:

* sharded over N: fp32 master weights 4P, fp32 gradients 4P (reduce-scattered every micro-batch, so
  accumulation adds into the shard), Adam moments 8P, EMA 4P -> 20P / N bytes;
* FSDP working set: the bf16 all-gather of the current and the prefetched block (2 x 2 x P_block) and one
  block's unsharded fp32 gradient before its reduce-scatter (4 x P_block);
* activations, bf16, per token per block: ``44 * dim + 8 * mlp_hidden`` bytes (counted from the block's
  saved tensors: 18 dim-wide bf16 tensors, RoPE's fp32 copies of q and k, 4 SwiGLU hidden tensors; the
  CPU measurement of the saved tensors is 97-98 % of it, ``tests/training/test_memory.py``); with
  activation checkpointing only each block's bf16 inputs (2 * dim per token) stay, plus one block's
  activations while it is recomputed.

Turning gradient sync off during accumulation (the old code) kept an unsharded fp32 gradient of the
whole model on every rank between micro-steps: + 4P bytes, not divided by N.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from training.mmdit import MMDiT, MMDiTArgs, make_args

GiB = 2**30


def activation_bytes_per_token_block(a: MMDiTArgs) -> int:
    """Saved-for-backward bytes of one token in one block, bf16 compute."""
    return 44 * a.dim + 8 * a.mlp_hidden


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    sharded_states: float  # bytes: weights, grads, Adam, EMA over N ranks
    fsdp_working: float  # gathered bf16 blocks + one unsharded fp32 block gradient
    activations: float  # one micro-batch
    unsharded_grads: float  # what gradient sync off during accumulation would add

    @property
    def total(self) -> float:
        return self.sharded_states + self.fsdp_working + self.activations


def param_counts(a: MMDiTArgs) -> tuple[int, int]:
    """(all parameters, parameters of the largest block), counted on the meta device."""
    with torch.device("meta"):
        m = MMDiT(a)
    return sum(p.numel() for p in m.parameters()), max(sum(p.numel() for p in b.parameters()) for b in m.blocks)


def estimate(a: MMDiTArgs, img_tokens: int, txt_tokens: int, micro_batch: int, n_gpus: int, ac: bool,
             ema: bool = True) -> MemoryEstimate:
    p, p_block = param_counts(a)
    sharded = (4 + 4 + 8 + (4 if ema else 0)) * p / n_gpus
    working = (2 * 2 + 4) * p_block
    tokens = micro_batch * (img_tokens + txt_tokens)
    per_block = tokens * activation_bytes_per_token_block(a)
    acts = (a.depth * tokens * 2 * a.dim + per_block) if ac else a.depth * per_block
    return MemoryEstimate(p, sharded, working, acts, 4 * p)


def _row(name, a, res, vae_factor, patch, txt, mb, n, ac, ti2i=True):
    img = (res // vae_factor // patch) ** 2 * (2 if ti2i else 1)
    e = estimate(a, img, txt, mb, n, ac)
    return (f"| {name} | {res} | {img} + {txt} | {mb} | {n} | {'on' if ac else 'off'} | {e.sharded_states / GiB:.1f} | "
            f"{e.fsdp_working / GiB:.1f} | {e.activations / GiB:.1f} | **{e.total / GiB:.1f}** | {(e.total + e.unsharded_grads) / GiB:.1f} |")


def table() -> str:
    head = ("| preset | px | tokens/sample (img + text) | micro-batch | GPUs | AC | sharded states | FSDP working | "
            "activations | **peak** | with sync off (old) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, res, mb, n in [("1B", 256, 32, 1), ("1B", 256, 32, 8), ("2B", 512, 8, 8)]:
        a = make_args(name, in_channels=16, patch_size=2, text_dim=3584)
        for ac in (False, True):
            rows.append(_row(name, a, res, 8, 2, 512, mb, n, ac))
    a = make_args("paper", in_channels=64, patch_size=1, text_dim=3584)
    for res, mb in [(256, 16), (512, 8), (1024, 2), (2048, 1)]:
        for ac in (False, True):
            rows.append(_row("paper", a, res, 16, 1, 1024, mb, 64, ac))
    return "\n".join([head, *rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Peak memory per rank (GiB), by arithmetic")
    ap.add_argument("--config", help="a configs/train/*.yaml: its preset, micro-batch, workers, AC")
    ap.add_argument("--text-tokens", type=int, help="default: the config's max_text_len")
    ap.add_argument("--vae-factor", type=int, default=16)
    ap.add_argument("--latent-channels", type=int, default=64)
    a = ap.parse_args(argv)
    if not a.config:
        print(table())
        return 0
    from training.config import load_config

    c = load_config(a.config)
    args = make_args(c.model.preset, in_channels=a.latent_channels, patch_size=c.model.patch_size, text_dim=3584)
    mb = c.data.micro_batch_size or c.data.global_batch_size // c.workers
    for ti2i in (False, True):
        print(_row(c.model.preset, args, c.data.resolution, a.vae_factor, c.model.patch_size, a.text_tokens or c.data.max_text_len,
                   mb, c.workers, c.parallel.activation_checkpointing, ti2i))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
