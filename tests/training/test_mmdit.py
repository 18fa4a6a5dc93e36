"""The MMDiT: presets, shapes, gradients everywhere, MSRoPE, bias-free multiplicative modulation."""

from __future__ import annotations

import pytest
import torch

from training.mmdit import (
    MMDIT_PRESETS,
    MMDiT,
    apply_rope,
    count_params,
    make_args,
    modulate,
    msrope_positions,
    rope_cos_sin,
)


@pytest.mark.parametrize("preset,lo,hi", [("1B", 0.9e9, 1.2e9), ("2B", 1.8e9, 2.3e9), ("paper", 18e9, 24e9)])
def test_large_presets_have_their_nominal_size(preset, lo, hi):
    with torch.device("meta"):
        m = MMDiT(make_args(preset, in_channels=64, patch_size=1, text_dim=3584))
    assert lo < count_params(m) < hi


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("patch,channels,hw", [(2, 4, (8, 12)), (1, 6, (5, 3))])
def test_forward_shape_and_every_parameter_gets_a_gradient(preset, patch, channels, hw):
    """Catches dead parameters (e.g. a last block's unused text outputs) and latent-shape bugs in the
    final layer, for square and odd, non-square grids, with a TI2I reference and padded text."""
    torch.manual_seed(0)
    m = MMDiT(make_args(preset, in_channels=channels, patch_size=patch, text_dim=16, num_timesteps=2))
    for p in m.parameters():  # leave adaLN-Zero so gradients reach every weight
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, channels, *hw)
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out = m(x, torch.rand(2, 2), text, mask, refs=[torch.randn(2, channels - 2, *hw)])
    assert out.shape == x.shape
    out.square().mean().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_zero_init_makes_every_block_the_identity_and_output_zero():
    torch.manual_seed(0)
    m = MMDiT(make_args("tiny", in_channels=4, text_dim=16))
    xi, xt = torch.randn(2, 6, 64), torch.randn(2, 3, 64)
    c = torch.randn(2, 64)
    pos_i, pos_t = msrope_positions([(0, 2, 3)], 3)
    rope = rope_cos_sin(torch.cat([pos_i, pos_t]), m.rope_axes, 1e4)
    yi, yt = m.blocks[0](xi, xt, c, rope, None)
    assert torch.equal(yi, xi) and torch.equal(yt, xt)
    assert m(torch.randn(2, 4, 4, 6), torch.rand(2), torch.randn(2, 3, 16)).abs().max() == 0


def test_modulation_is_multiplicative_without_shift():
    x = torch.zeros(2, 3, 8)
    assert torch.equal(modulate(x, torch.randn(2, 8)), x)  # no beta: zero stays zero
    y = torch.randn(2, 3, 8)
    s = torch.randn(2, 8)
    assert torch.allclose(modulate(y, s), y * (1 + s[:, None]))
    m = MMDiT(make_args("tiny", in_channels=4, text_dim=16))
    assert all(b.img.mod.bias is None and b.txt.mod.bias is None for b in m.blocks)


def test_msrope_positions_centre_the_image_and_put_text_on_the_diagonal():
    img, txt = msrope_positions([(0, 4, 6), (1, 2, 2)], text_len=3)
    assert img.shape == (4 * 6 + 2 * 2, 3)
    first = img[:24]
    assert first[:, 0].eq(0).all() and img[24:, 0].eq(1).all()  # frame index per image
    assert first[:, 1].min() == -2 and first[:, 1].max() == 1 and first[:, 2].min() == -3 and first[:, 2].max() == 2
    assert txt.tolist() == [[3, 3, 3], [4, 4, 4], [5, 5, 5]]  # starts at max(4, 6) // 2 on all axes


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    axes = (4, 6, 6)
    q, k = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    pos = torch.randint(-8, 8, (5, 3))

    def scores(p):
        cos, sin = rope_cos_sin(p, axes, 1e4)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    assert torch.allclose(scores(pos), scores(pos + torch.tensor([3, -5, 7])), atol=1e-4)
    assert not torch.allclose(scores(pos), scores(pos * 2), atol=1e-3)


def test_padded_text_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    m = MMDiT(make_args("tiny", in_channels=4, text_dim=16))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 4, 4, 4), torch.rand(1)
    text = torch.randn(1, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    other = text.clone()
    other[:, 3:] = torch.randn(1, 3, 16) * 10
    assert torch.allclose(m(x, t, text, mask), m(x, t, other, mask), atol=1e-5)
    assert torch.allclose(m(x, t, text, mask), m(x, t, text[:, :3]), atol=1e-5)


def test_every_preset_is_constructible():
    for name in MMDIT_PRESETS:
        with torch.device("meta"):
            MMDiT(make_args(name, in_channels=16, text_dim=64))
    with pytest.raises(ValueError, match="model.preset"):
        make_args("huge")


def test_init_weights_sets_every_parameter_after_meta_construction():
    """The trainer builds on the meta device and calls init_weights after to_empty: nothing may be
    left as uninitialised memory."""
    with torch.device("meta"):
        m = MMDiT(make_args("tiny", in_channels=4, text_dim=16, num_timesteps=2))
    m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
        m.init_weights()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert m.txt_norm.weight.eq(1).all() and m.blocks[0].img.q_norm.weight.eq(1).all()
    assert m.blocks[1].txt.mod.weight.eq(0).all() and m.final.linear.weight.eq(0).all()
    assert m.blocks[0].img.qkv.weight.std() > 0
