"""The peak-memory arithmetic: the activation count per token per block against the tensors a real
block saves for backward (bf16, CPU), and the sharded part shrinking with the number of GPUs."""

from __future__ import annotations

import pytest
import torch

from training.memory import activation_bytes_per_token_block, estimate, param_counts
from training.mmdit import MMDiTBlock, make_args, msrope_positions, rope_axes_for, rope_cos_sin


@pytest.mark.parametrize("dim,hidden,heads", [(256, 512, 4), (256, 1024, 4), (512, 2048, 4)])
def test_activation_formula_matches_the_saved_tensors_of_a_block(dim, hidden, heads):
    a = make_args("small", dim=dim, mlp_hidden=hidden, heads=heads)
    blk = MMDiTBlock(a).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in blk.parameters()}  # FSDP frees gathered weights
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    b, ti, tt = 2, 64, 16
    x, c = (torch.randn(b, n, dim, dtype=torch.bfloat16, requires_grad=True) for n in (ti, tt))
    pi, pt = msrope_positions([(0, 8, 8)], tt)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        blk(x, c, torch.randn(b, dim, dtype=torch.bfloat16), rope_cos_sin(torch.cat([pi, pt]), rope_axes_for(a), 1e4), None)
    measured = sum(saved.values()) / (b * (ti + tt))
    assert 0.9 < measured / activation_bytes_per_token_block(a) <= 1.05


def test_sharded_states_scale_with_gpus_and_sync_off_would_add_the_full_gradient():
    a = make_args("1B", in_channels=16, text_dim=3584)
    p, _ = param_counts(a)
    one, eight = (estimate(a, 256, 256, 32, n, ac=True) for n in (1, 8))
    assert one.sharded_states == pytest.approx(20 * p) and eight.sharded_states == pytest.approx(20 * p / 8)
    assert one.unsharded_grads == 4 * p
    no_ac = estimate(a, 256, 256, 32, 8, ac=False)
    assert no_ac.activations > 5 * eight.activations  # checkpointing keeps only block inputs
