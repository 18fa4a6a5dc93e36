"""Dual-stream MMDiT of the Qwen-Image-2.0 report (§3.2), as one compact pure ``nn.Module``.

Each block keeps separate weights for the text and the image stream and mixes them in one joint
attention over ``concat(image, text)`` tokens. What the report specifies, and where it lives here:

* MSRoPE (Qwen-Image, Wu et al. 2025): image tokens get 3-axis rotary positions (frame, row, col)
  centred on the image; text token ``j`` sits on the diagonal at ``(m + j, m + j, m + j)`` with
  ``m = max(H, W) // 2``, so text never collides with any image position at any resolution.
* QK-norm is RMSNorm; every other norm is a LayerNorm without affine parameters (the modulation
  provides the scale).
* Modulation is purely multiplicative and bias-free (report eq. 2, ``h' = alpha * h``): each stream
  gets ``(scale_attn, gate_attn, scale_mlp, gate_mlp)`` from the timestep embedding, no shift.
  The modulation projections are zero-initialised (adaLN-Zero, DiT), so every block starts as the
  identity and the final layer outputs zeros.
* MLPs are SwiGLU (report eq. 3).

FSDP, activation checkpointing and ``torch.compile`` are applied from outside (``parallelize.py``).
The SeFi variant only changes the conditioning: ``num_timesteps=2`` embeds (t_s, t_z) separately and
sums them; the composite latent is just more input channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class MMDiTArgs:
    dim: int
    """Hidden width of both streams."""
    depth: int
    """Number of dual-stream blocks."""
    heads: int
    """Attention heads; head_dim = dim // heads."""
    mlp_hidden: int
    """SwiGLU hidden width."""
    in_channels: int = 16
    """Latent channels (texture + semantic channels for SeFi)."""
    patch_size: int = 2
    """Latent pixels per token side."""
    text_dim: int = 64
    """Hidden size of the condition encoder's states."""
    num_timesteps: int = 1
    """1 for plain flow matching, 2 for SeFi (semantic and texture timestep)."""
    rope_axes: tuple[int, int, int] | None = None
    """Rotary dims per (frame, row, col) axis; must sum to head_dim. None: head_dim split 1:3.5:3.5
    like Qwen-Image's (16, 56, 56) for head_dim 128."""
    rope_theta: float = 10000.0


# Size presets (DiT-style plain dict). Counts are for the default SwiGLU width with text_dim=3584.
#   tiny: tests; 1B / 2B: SeFi-Image's 1B and 2B scales; paper: the Qwen-Image MMDiT shape
#   (60 blocks, width 3072, 24 heads of 128), which Qwen-Image-2.0's report builds on without
#   giving its own sizes.
MMDIT_PRESETS: dict[str, dict] = {
    "tiny": dict(dim=64, depth=2, heads=4, mlp_hidden=128),
    "small": dict(dim=256, depth=4, heads=4, mlp_hidden=512),
    "1B": dict(dim=1280, depth=16, heads=10, mlp_hidden=5120),
    "2B": dict(dim=1536, depth=22, heads=12, mlp_hidden=6144),
    "paper": dict(dim=3072, depth=60, heads=24, mlp_hidden=12288),
}


def make_args(preset: str, **overrides) -> MMDiTArgs:
    if preset not in MMDIT_PRESETS:
        raise ValueError(f"model.preset: unknown preset {preset!r}; choose one of {sorted(MMDIT_PRESETS)}")
    return MMDiTArgs(**{**MMDIT_PRESETS[preset], **overrides})


# ---------------------------------------------------------------- positions (MSRoPE)


def rope_axes_for(args: MMDiTArgs) -> tuple[int, int, int]:
    head_dim = args.dim // args.heads
    if args.rope_axes is not None:
        return args.rope_axes
    f = max(2, (head_dim // 8) // 2 * 2)  # 16 of 128, like Qwen-Image
    hw = (head_dim - f) // 2 // 2 * 2
    return (head_dim - 2 * hw, hw, hw)


def msrope_positions(grids: list[tuple[int, int, int]], text_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer (frame, row, col) positions for image tokens of each grid and for text tokens.

    ``grids`` is a list of ``(frame, h, w)`` token grids (target image = frame 0, reference images of a
    TI2I sample = frame 1, 2, ...). Rows/cols are centred so that buckets of different aspect share
    their centre; text starts on the diagonal just past the largest half-extent.
    """
    img = []
    for f, h, w in grids:
        rr, cc = torch.meshgrid(torch.arange(h, device=device) - h // 2, torch.arange(w, device=device) - w // 2, indexing="ij")
        img.append(torch.stack([torch.full_like(rr, f), rr, cc], -1).reshape(-1, 3))
    m = max(max(h, w) // 2 for _, h, w in grids)
    t = torch.arange(text_len, device=device) + m
    return torch.cat(img), t[:, None].expand(text_len, 3)


def rope_cos_sin(pos: torch.Tensor, axes: tuple[int, int, int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [N, 3] int -> cos, sin [N, head_dim // 2] (one frequency band per axis, concatenated)."""
    angles = []
    for i, d in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float64) / d)
        angles.append(pos[:, i, None].double() * freqs)
    a = torch.cat(angles, -1)
    return a.cos().float(), a.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, D]; rotate consecutive pairs (x0, x1) by the per-token angle."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    return out.type_as(x)


# ---------------------------------------------------------------- blocks


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 like DiT's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w3(self.w1(x) * F.silu(self.w2(x)))  # Phi1(x) * SiLU(Phi2(x)), report eq. 3


def modulate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Bias-free multiplicative modulation (report eq. 2); ``1 +`` keeps zero-init an identity."""
    return x * (1 + scale[:, None])


class StreamParams(nn.Module):
    """The per-stream half of a block: modulation, qkv/out projections, QK RMSNorm, SwiGLU."""

    def __init__(self, a: MMDiTArgs, pre_only: bool = False):
        super().__init__()
        hd = a.dim // a.heads
        # scale_attn, gate_attn, scale_mlp, gate_mlp; a pre-only stream needs only scale_attn.
        self.mod = nn.Linear(a.dim, (1 if pre_only else 4) * a.dim, bias=False)
        self.norm1 = nn.LayerNorm(a.dim, elementwise_affine=False, eps=1e-6)
        # A pre-only stream is never queried: keys and values only.
        self.qkv = nn.Linear(a.dim, (2 if pre_only else 3) * a.dim, bias=False)
        self.k_norm = nn.RMSNorm(hd, eps=1e-6)
        if not pre_only:
            self.q_norm = nn.RMSNorm(hd, eps=1e-6)
            self.proj = nn.Linear(a.dim, a.dim, bias=False)
            self.norm2 = nn.LayerNorm(a.dim, elementwise_affine=False, eps=1e-6)
            self.mlp = SwiGLU(a.dim, a.mlp_hidden)


class MMDiTBlock(nn.Module):
    """``last=True``: the text stream only supplies keys/values (SD3's ``context_pre_only``): its
    outputs would feed nothing, and parameters without gradients would be dead weight."""

    def __init__(self, a: MMDiTArgs, last: bool = False):
        super().__init__()
        self.heads, self.last = a.heads, last
        self.img, self.txt = StreamParams(a), StreamParams(a, pre_only=last)

    def _qkv(self, s: StreamParams, x, scale):
        h = s.qkv(modulate(s.norm1(x), scale))
        if not hasattr(s, "q_norm"):
            k, v = h.unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
            return None, s.k_norm(k), v
        q, k, v = h.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return s.q_norm(q), s.k_norm(k), v

    def forward(self, x, c, c_emb, rope, mask):
        """x [B, Ni, D] image tokens, c [B, Nt, D] text tokens, c_emb [B, D] conditioning vector,
        rope (cos, sin) over the joint sequence, mask [B, 1, 1, Ni+Nt] bool or None."""
        mi = self.img.mod(F.silu(c_emb)).chunk(4, -1)
        mt = self.txt.mod(F.silu(c_emb)).chunk(1 if self.last else 4, -1)
        qi, ki, vi = self._qkv(self.img, x, mi[0])
        qt, kt, vt = self._qkv(self.txt, c, mt[0])
        ni = x.shape[1]
        k, v = torch.cat((ki, kt), 2), torch.cat((vi, vt), 2)
        if self.last:  # only image queries: the text outputs of the last block feed nothing
            q = apply_rope(qi, rope[0][:ni], rope[1][:ni])
        else:
            q = apply_rope(torch.cat((qi, qt), 2), *rope)
        k = apply_rope(k, *rope)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        oi, ot = o[:, :ni], o[:, ni:]
        x = x + mi[1][:, None] * self.img.proj(oi)
        x = x + mi[3][:, None] * self.img.mlp(modulate(self.img.norm2(x), mi[2]))
        if self.last:
            return x, c
        c = c + mt[1][:, None] * self.txt.proj(ot)
        c = c + mt[3][:, None] * self.txt.mlp(modulate(self.txt.norm2(c), mt[2]))
        return x, c


class FinalLayer(nn.Module):
    def __init__(self, a: MMDiTArgs):
        super().__init__()
        self.norm = nn.LayerNorm(a.dim, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Linear(a.dim, a.dim, bias=False)
        self.linear = nn.Linear(a.dim, a.patch_size**2 * a.in_channels)

    def forward(self, x, c_emb):
        return self.linear(modulate(self.norm(x), self.mod(F.silu(c_emb))))


class MMDiT(nn.Module):
    """model(x, t, text, text_mask, refs) -> velocity with x's shape.

    x [B, C, H, W] noisy latent; t [B] or [B, num_timesteps] in [0, 1] (0 = noise, 1 = data);
    text [B, L, text_dim] condition-encoder states; text_mask [B, L] bool (True = real token) or None;
    refs: optional list of clean reference latents [B, C_ref, H', W'] for TI2I (C_ref may be fewer than
    C: they are zero-padded, SeFi refs carry texture channels only).
    """

    def __init__(self, a: MMDiTArgs):
        super().__init__()
        self.args = a
        self.rope_axes = rope_axes_for(a)
        assert sum(self.rope_axes) == a.dim // a.heads, "rope_axes must sum to head_dim"
        p = a.patch_size
        self.x_embed = nn.Linear(a.in_channels * p * p, a.dim)
        self.txt_norm = nn.RMSNorm(a.text_dim, eps=1e-6)
        self.txt_embed = nn.Linear(a.text_dim, a.dim)
        self.t_embed = nn.ModuleList(TimestepEmbedder(a.dim) for _ in range(a.num_timesteps))
        self.blocks = nn.ModuleList(MMDiTBlock(a, last=i == a.depth - 1) for i in range(a.depth))
        self.final = FinalLayer(a)
        self.init_weights()

    def init_weights(self):
        # Initialises every parameter, so it also works after ``to_empty`` (meta-device construction).
        def _xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)

        self.apply(_xavier)
        for e in self.t_embed:
            nn.init.normal_(e.mlp[0].weight, std=0.02)
            nn.init.normal_(e.mlp[2].weight, std=0.02)
        for b in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(b.img.mod.weight)
            nn.init.zeros_(b.txt.mod.weight)
        nn.init.zeros_(self.final.mod.weight)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.args.patch_size
        b, c, h, w = x.shape
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.args.patch_size, self.args.in_channels
        b = x.shape[0]
        return x.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def forward(self, x, t, text, text_mask=None, refs=None):
        a, p = self.args, self.args.patch_size
        b, _, h, w = x.shape
        t = t.reshape(b, -1)
        assert t.shape[1] == a.num_timesteps, f"expected {a.num_timesteps} timestep(s) per sample"
        c_emb = sum(e(t[:, i]) for i, e in enumerate(self.t_embed))
        tokens, grids = [self.patchify(x)], [(0, h // p, w // p)]
        for i, r in enumerate(refs or []):
            if r.shape[1] < a.in_channels:
                r = F.pad(r, (0, 0, 0, 0, 0, a.in_channels - r.shape[1]))
            tokens.append(self.patchify(r))
            grids.append((i + 1, r.shape[2] // p, r.shape[3] // p))
        dt = self.x_embed.weight.dtype  # bf16 under FSDP2 mixed precision; t stays fp32 (embedder)
        xi = self.x_embed(torch.cat(tokens, 1).to(dt))
        xt = self.txt_embed(self.txt_norm(text.to(dt)))
        pos_i, pos_t = msrope_positions(grids, text.shape[1], device=x.device)
        rope = rope_cos_sin(torch.cat([pos_i, pos_t]), self.rope_axes, a.rope_theta)
        mask = None
        if text_mask is not None and not bool(text_mask.all()):
            # Padding text tokens are never attended to; image tokens are always valid.
            full = torch.cat([text_mask.new_ones(b, xi.shape[1]), text_mask], 1)
            mask = full[:, None, None, :]
        for blk in self.blocks:
            xi, xt = blk(xi, xt, c_emb, rope, mask)
        out = self.final(xi[:, : (h // p) * (w // p)], c_emb)
        return self.unpatchify(out, h, w)


def count_params(model: nn.Module, non_embedding: bool = True) -> int:
    """Trainable parameters; ``non_embedding`` drops the input/timestep embedders and final layer
    (the usual convention for the 6*N*tokens FLOP count: N = transformer-block parameters)."""
    if not non_embedding:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in model.blocks.parameters() if p.requires_grad)


def with_overrides(a: MMDiTArgs, **kw) -> MMDiTArgs:
    return replace(a, **kw)
