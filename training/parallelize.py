"""Apply activation checkpointing, torch.compile and FSDP2 to an MMDiT from outside the model
(torchtitan ``models/flux/infra/parallelize.py`` order: AC, then compile, then FSDP per block)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from training.config import ParallelConfig


def parallelize(model: nn.Module, cfg: ParallelConfig, distributed: bool = True) -> nn.Module:
    """In place. ``distributed=False`` (single process, e.g. the MFU benchmark without a process
    group) applies AC and compile only."""
    for i, block in enumerate(model.blocks):
        if cfg.activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)  # blocks draw no random numbers
        if cfg.compile:
            block.compile(backend=cfg.compile_backend)  # per block: FSDP2's all-gather hooks stay outside the graphs
        model.blocks[i] = block
    if not distributed:
        return model
    mp = None
    if cfg.mixed_precision == "bf16":
        # bf16 compute/all-gather of parameters, fp32 gradient reduce-scatter, fp32 master weights.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp else {}
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # The last block's parameters are needed again at the start of backward: keep them gathered.
        fully_shard(block, reshard_after_forward=i < n - 1, **kw)
    # The root must not cast its inputs: the timesteps would be rounded to bf16 (3 significant digits)
    # before the sinusoidal embedding. The model casts latents and text states itself.
    root_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fully_shard(model, **({"mp_policy": root_mp} if mp else {}))
    return model
