"""Exponential moving average of the weights, kept sharded like the parameters (DTensors under FSDP2),
saved in every checkpoint, swapped in for sampling and validation, and exported on its own."""

from __future__ import annotations

from contextlib import contextmanager

import torch

# Wrappers that parallelize.py adds around blocks; checkpoint keys never contain them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for w in _WRAPPER_PREFIXES:
        name = name.replace(w, "")
    return name


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [clean_name(n) for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1 - self.decay)

    @torch.no_grad()
    def copy_from(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.shadow, model.parameters(), strict=True):
            e.copy_(p.detach())  # (DTensor has no _foreach_copy_ sharding rule)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Name -> tensor (sharded as the parameters are); DCP saves and loads these in place."""
        return dict(zip(self.names, self.shadow, strict=True))

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """The model holds the EMA weights inside the block (swapped in place one tensor at a time, so
        the extra memory is one parameter's shard)."""
        self._swap(model)
        try:
            yield model
        finally:
            self._swap(model)

    @torch.no_grad()
    def _swap(self, model):
        # FSDP2 keeps a block gathered after a forward without backward (the last block does not
        # reshard after forward); reshard so every parameter is its sharded DTensor again.
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
        for p, e in zip(model.parameters(), self.shadow, strict=True):
            tmp = p.detach().clone()
            p.detach().copy_(e)
            e.copy_(tmp)
