"""Timestep sampling, resolution shift, the SeFi mapping, and the Euler CFG sampler's direction."""

from __future__ import annotations

import pytest
import torch

from training.flow import (
    FlowArgs,
    euler_sample,
    flow_loss,
    per_channel_t,
    resolution_shift,
    sample_t,
    sefi_timesteps,
)


def test_logit_normal_timesteps_in_unit_interval_centred_without_shift():
    g = torch.Generator().manual_seed(0)
    t = sample_t(20000, FlowArgs(shift_base_tokens=256), num_tokens=256, generator=g)
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    # logit(t) ~ N(0, 1)
    assert torch.logit(t).std().item() == pytest.approx(1.0, abs=0.03)


def test_resolution_shift_moves_timesteps_towards_noise_for_more_tokens():
    a = FlowArgs(shift_base_tokens=256)
    assert resolution_shift(256, 256, 6.0) == 1.0 and resolution_shift(1024, 256, 6.0) == 2.0
    assert resolution_shift(256 * 1000, 256, 6.0) == 6.0  # clipped
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    small, big = sample_t(5000, a, 256, g1), sample_t(5000, a, 4096, g2)
    assert (big <= small + 1e-6).all()  # same draws, shifted: t = 0 is noise
    assert big.mean() < small.mean() - 0.1


def test_sefi_mapping_semantics_run_ahead_by_delta():
    t = torch.linspace(0, 1, 101)
    ts, tz = sefi_timesteps(t, 0.3)
    assert ts[0] == 0 and tz[0] == 0 and ts[-1] == 1 and tz[-1] == pytest.approx(1.0)
    assert (ts >= tz).all() and ((ts - tz) <= 0.3 + 1e-6).all()
    ts5, tz5 = sefi_timesteps(torch.tensor([0.5]), 0.3)
    assert ts5.item() == pytest.approx(0.65) and tz5.item() == pytest.approx(0.35)
    # semantics are clean from t = 1 / 1.3 on; texture is pure noise until t = 0.3 / 1.3
    ts_, tz_ = sefi_timesteps(torch.tensor([0.8, 0.2]), 0.3)
    assert ts_[0] == 1 and tz_[1] == 0
    x = torch.zeros(2, 5, 1, 1)
    m = per_channel_t(torch.tensor([0.9, 0.4]), torch.tensor([0.1, 0.2]), x, semantic_channels=2)
    assert torch.allclose(m[:, :, 0, 0], torch.tensor([[0.1, 0.1, 0.1, 0.9, 0.9], [0.2, 0.2, 0.2, 0.4, 0.4]]))


class _Oracle(torch.nn.Module):
    """The exact velocity field towards one target latent: v = (x1 - x) / (1 - t)."""

    def __init__(self, x1, patch_size=1):
        super().__init__()
        self.x1 = x1
        self.args = type("A", (), {"patch_size": patch_size})()

    def forward(self, x, t, text, mask=None, refs=None):
        t = t.reshape(x.shape[0], -1)
        if t.shape[1] == 2:  # SeFi: per-channel time
            tm = per_channel_t(t[:, 0], t[:, 1], x, 2)
        else:
            tm = t[:, 0].reshape(-1, 1, 1, 1)
        # Conditional half aims at x1, unconditional half at -x1: CFG must pick the conditional one.
        target = torch.where((text.sum((1, 2)) > 0).reshape(-1, 1, 1, 1), self.x1, -self.x1)
        return (target - x) / (1 - tm).clamp(min=1e-3)


@pytest.mark.parametrize("sefi", [False, True])
def test_euler_sampler_integrates_from_noise_to_data(sefi):
    torch.manual_seed(0)
    x1 = torch.randn(1, 4, 4, 4)
    a = FlowArgs(sefi=sefi, sefi_delta=0.3, semantic_channels=2 if sefi else 0, shift_base_tokens=4)
    text, mask = torch.ones(1, 2, 3), torch.ones(1, 2, dtype=torch.bool)
    null = (-torch.ones(1, 1, 3), torch.ones(1, 1, dtype=torch.bool))
    out = euler_sample(_Oracle(x1), torch.randn(1, 4, 4, 4), text, mask, null, a, steps=20, cfg=1.0)
    assert torch.allclose(out, x1, atol=1e-3)


def test_flow_loss_is_zero_for_the_true_velocity_and_reports_sefi_parts():
    x1 = torch.randn(3, 4, 4, 4)

    class Cheat(torch.nn.Module):  # reads the noise back out of x_t using the known x1
        args = type("A", (), {"patch_size": 1})()

        def forward(self, x, t, text, mask=None, refs=None):
            tm = per_channel_t(t[:, 0], t[:, 1], x, 2) if t.ndim == 2 else t.reshape(-1, 1, 1, 1)
            noise = (x - tm * x1) / (1 - tm)
            return x1 - noise

    text, mask = torch.randn(3, 2, 3), torch.ones(3, 2, dtype=torch.bool)
    a = FlowArgs(sefi=True, semantic_channels=2, caption_dropout=0.0)
    loss, parts = flow_loss(Cheat(), x1, text, mask, a, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-6 and set(parts) == {"loss", "loss_texture", "loss_semantic", "semantic_masked"}
