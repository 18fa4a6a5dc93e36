"""Rectified-flow objective and Euler CFG sampler, apart from the network (minRF ``rf.py`` style).

Convention (SeFi-Image's): ``t = 0`` is pure noise, ``t = 1`` the clean latent,
``x_t = t * x1 + (1 - t) * noise`` and the network predicts the velocity ``x1 - noise``.

* Timesteps: logit-normal (SD3), then a resolution-dependent shift (SD3 §5.3.2): with
  ``sigma = 1 - t`` the noise level, ``sigma' = s * sigma / (1 + (s - 1) * sigma)`` with
  ``s = sqrt(tokens / shift_base_tokens)`` so larger images spend more steps at high noise.
* SeFi semantic-first: the composite latent ``[texture ; semantic]`` channels is noised with two
  timesteps from one ``t``: ``t_s = min(1, t (1 + delta))`` (semantics run ahead and are clean first)
  and ``t_z = max(0, t (1 + delta) - delta)``. ``t`` is drawn so both reach their full range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class FlowArgs:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_base_tokens: int = 256
    """Image-token count at which the shift is 1 (no shift)."""
    max_shift: float = 6.0
    caption_dropout: float = 0.1
    sefi: bool = False
    sefi_delta: float = 0.3
    semantic_channels: int = 0
    """Trailing channels of the composite latent that are semantic (SeFi)."""
    semantic_loss_weight: float = 1.0


def resolution_shift(num_tokens: int, base_tokens: int, max_shift: float) -> float:
    return float(min(max_shift, max(1.0, math.sqrt(num_tokens / base_tokens))))


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift towards noise (t = 0): sigma' = s sigma / (1 + (s - 1) sigma), sigma = 1 - t."""
    sigma = 1 - t
    return 1 - shift * sigma / (1 + (shift - 1) * sigma)


def sample_t(n: int, a: FlowArgs, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal t in (0, 1) (0 = noise), shifted for the resolution."""
    u = torch.randn(n, generator=generator) * a.logit_std + a.logit_mean
    t = 1 - torch.sigmoid(u)  # logit-normal is symmetric; 1 - keeps sigma = sigmoid(u) like SD3
    return shift_t(t, resolution_shift(num_tokens, a.shift_base_tokens, a.max_shift))


def sefi_timesteps(t: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SeFi-Image's mapping of one progress variable t in [0, 1] to (t_semantic, t_texture)."""
    u = t * (1 + delta)
    return u.clamp(max=1.0), (u - delta).clamp(min=0.0)


def _broadcast(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def per_channel_t(ts: torch.Tensor, tz: torch.Tensor, x: torch.Tensor, semantic_channels: int) -> torch.Tensor:
    """[B, C, 1, 1] timestep map: texture channels get t_z, the trailing semantic ones t_s."""
    c = x.shape[1]
    is_sem = (torch.arange(c, device=x.device) >= c - semantic_channels).to(x.dtype)[None, :, None, None]
    return _broadcast(tz, x) * (1 - is_sem) + _broadcast(ts, x) * is_sem


@dataclass(frozen=True)
class FlowDraw:
    """The random inputs of one loss evaluation: noise [B, C, H, W], progress t [B], caption dropout [B]."""

    noise: torch.Tensor
    t: torch.Tensor
    drop: torch.Tensor


def draw(x1_shape, a: FlowArgs, num_tokens: int, seeds) -> FlowDraw:
    """Noise, timestep and dropout per sample, each from its own seed, so a sample's draw does not
    depend on how the batch is split into micro-batches or over ranks (gradient accumulation then
    gives the same step as one big batch)."""
    noise, t, drop = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn(tuple(x1_shape[1:]), generator=g))
        t.append(sample_t(1, a, num_tokens, g))
        drop.append(torch.rand(1, generator=g) < a.caption_dropout)
    return FlowDraw(torch.stack(noise), torch.cat(t), torch.cat(drop))


def flow_loss(model, x1, text, text_mask, a: FlowArgs, generator=None, refs=None, null_text=None,
              fixed: FlowDraw | None = None, record: dict | None = None):
    """One flow-matching loss on clean latents x1 [B, C, H, W].

    ``null_text`` (states, mask) of the empty prompt replaces the caption with probability
    ``caption_dropout`` (unconditional dropout for CFG). The random inputs are ``fixed`` (see
    :func:`draw`) or drawn from ``generator``. Returns (loss, parts dict of detached scalars); a
    ``record`` dict receives the per-sample progress ``t`` and loss ``sample_loss`` (for the loss per
    timestep bucket).

    SeFi: where ``t_s`` is clamped to 1 the semantic channels enter clean, so their target
    ``x1 - noise`` is pure unpredictable noise (about 11 % of samples at shift 1, delta 0.3); those
    channels get no loss (masked: they add 0 to the semantic MSE, which stays a mean over all samples,
    so splitting a batch into micro-batches gives the same gradient). The sampler
    never uses that velocity either: its semantic step ``dt_s`` is 0 once ``t_s = 1``. Texture clamped
    at ``t_z = 0`` keeps its loss: the input is then the noise itself, so the target is the ordinary
    ``t = 0`` flow-matching target, and the sampler uses it on the first texture step.
    """
    b = x1.shape[0]
    p = model.args.patch_size if hasattr(model, "args") else 2
    tokens = (x1.shape[2] // p) * (x1.shape[3] // p)
    if fixed is None:
        noise = torch.randn(x1.shape, generator=generator)
        t = sample_t(b, a, tokens, generator)
        drop = torch.rand(b, generator=generator) < a.caption_dropout
        fixed = FlowDraw(noise, t, drop)
    noise, t = fixed.noise.to(x1), fixed.t.to(x1.device)
    if null_text is not None and a.caption_dropout > 0:
        drop = fixed.drop.to(x1.device)
        L = max(text.shape[1], null_text[0].shape[1])
        text, text_mask = _pad_text(text, text_mask, L)
        null_text = _pad_text(*null_text, L)
        text = torch.where(drop[:, None, None], null_text[0].expand_as(text), text)
        text_mask = torch.where(drop[:, None], null_text[1].expand_as(text_mask), text_mask)
    if a.sefi:
        ts, tz = sefi_timesteps(t, a.sefi_delta)
        tmap = per_channel_t(ts, tz, x1, a.semantic_channels)
        t_in = torch.stack([ts, tz], 1)
    else:
        tmap, t_in = _broadcast(t, x1), t
    xt = tmap * x1 + (1 - tmap) * noise
    v = model(xt, t_in, text, text_mask, refs)
    err = (v.float() - (x1 - noise).float()) ** 2
    if not a.sefi:
        per = err.flatten(1).mean(1)
        loss = per.mean()
        parts = {"loss": loss.detach()}
    else:
        sc = a.semantic_channels
        tex_s = err[:, :-sc].flatten(1).mean(1)
        keep = (ts < 1).float()  # semantic channels whose timestep is not clamped to 1
        sem_s = err[:, -sc:].flatten(1).mean(1) * keep
        tex = tex_s.mean()
        sem = sem_s.mean()  # masked samples count 0: a sum over samples, so micro-batching is exact
        loss = tex + a.semantic_loss_weight * sem
        per = tex_s + a.semantic_loss_weight * sem_s
        parts = {"loss": loss.detach(), "loss_texture": tex.detach(), "loss_semantic": sem.detach(),
                 "semantic_masked": 1 - keep.mean()}
    if record is not None:
        record["t"], record["sample_loss"] = t.detach(), per.detach()
    return loss, parts


@torch.no_grad()
def euler_sample(model, noise, text, text_mask, null_text, a: FlowArgs, steps: int = 30, cfg: float = 4.0, refs=None):
    """Euler integration from t = 0 (noise) to t = 1 with classifier-free guidance.

    The time grid is the same resolution shift as training, applied to a uniform grid. For SeFi the
    grid is over the progress variable t; both (t_s, t_z) reach 1 at t = 1.
    """
    x = noise
    b = x.shape[0]
    p = model.args.patch_size
    shift = resolution_shift((x.shape[2] // p) * (x.shape[3] // p), a.shift_base_tokens, a.max_shift)
    grid = shift_t(torch.linspace(0, 1, steps + 1), shift)
    un_text = null_text[0].expand(b, -1, -1)
    un_mask = null_text[1].expand(b, -1)
    for i in range(steps):
        t0, t1 = grid[i].item(), grid[i + 1].item()
        tt = torch.full((b,), t0, device=x.device)
        if a.sefi:
            ts, tz = sefi_timesteps(tt, a.sefi_delta)
            t_in = torch.stack([ts, tz], 1)
            ts1, tz1 = sefi_timesteps(torch.full((b,), t1, device=x.device), a.sefi_delta)
            dt = per_channel_t(ts1 - ts, tz1 - tz, x, a.semantic_channels)
        else:
            t_in, dt = tt, t1 - t0
        # Unconditional and conditional in one batch; text lengths are padded to match.
        L = max(text.shape[1], un_text.shape[1])
        ct, cm = _pad_text(text, text_mask, L)
        ut, um = _pad_text(un_text, un_mask, L)
        v = model(torch.cat([x, x]), torch.cat([t_in, t_in]), torch.cat([ct, ut]), torch.cat([cm, um]),
                  [torch.cat([r, r]) for r in refs] if refs else None)
        vc, vu = v.chunk(2)
        x = x + dt * (vu + cfg * (vc - vu))
    return x


def _pad_text(text, mask, length):
    pad = length - text.shape[1]
    if pad == 0:
        return text, mask
    return (torch.nn.functional.pad(text, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad), value=False))
