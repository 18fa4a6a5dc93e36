"""parallelize(): FSDP2 with the bf16 mixed-precision policy, activation checkpointing, SeFi timesteps
— in a one-rank gloo group, so it runs on CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from training.config import ParallelConfig
from training.flow import FlowArgs, flow_loss
from training.mmdit import MMDiT, make_args
from training.parallelize import parallelize


def test_fsdp2_bf16_policy_with_activation_checkpointing_trains(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = MMDiT(make_args("tiny", in_channels=4, text_dim=16, num_timesteps=2))
        m = MMDiT(make_args("tiny", in_channels=4, text_dim=16, num_timesteps=2))
        m.load_state_dict(ref.state_dict())
        parallelize(m, ParallelConfig(mixed_precision="bf16", activation_checkpointing=True), distributed=True)
        p0 = next(m.parameters())
        assert isinstance(p0, DTensor) and p0.dtype == torch.float32  # fp32 master weights, sharded
        args = (torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool))
        fa = FlowArgs(sefi=True, semantic_channels=2, caption_dropout=0.0)
        loss, parts = flow_loss(m, *args, fa, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
        ref_loss, _ = flow_loss(ref, *args, fa, generator=torch.Generator().manual_seed(0))
        # Zero-initialised outputs: the same loss in bf16 compute as in fp32, to bf16 precision.
        assert abs(loss.item() - ref_loss.item()) < 2e-2 * ref_loss.item()
    finally:
        dist.destroy_process_group()
