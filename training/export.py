"""Export a checkpoint's EMA (or raw) weights as one safetensors file, loadable without Ray or a
process group: ``load_exported`` returns a plain :class:`MMDiT` plus the flow settings to sample it.

DCP reads the sharded checkpoint without a process group (``no_dist``) into full tensors of a plain
model built from the model args the trainer stores in ``trainer_state.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from training.mmdit import MMDiT, MMDiTArgs


def _args(d: dict) -> MMDiTArgs:
    d = dict(d)
    if d.get("rope_axes") is not None:
        d["rope_axes"] = tuple(d["rope_axes"])
    return MMDiTArgs(**d)


def export_weights(checkpoint: str, out: str | Path, weights: str = "ema") -> Path:
    """``checkpoint``: a ``step_*`` DCP directory or a run directory (its latest ``step_*``)."""
    from training.config import ConfigError
    from training.trainer import checkpoint_keys, resolve_init_from

    if weights not in ("ema", "model"):
        raise ValueError(f"--weights: must be ema or model, not {weights!r}")
    try:
        d = resolve_init_from(checkpoint)
    except ConfigError as e:
        raise ValueError(f"--checkpoint: {str(e).split(': ', 1)[1]}") from None
    if weights not in checkpoint_keys(d):
        raise ValueError(f"--weights: {d} holds no {weights} weights (a run with ema_decay 0 keeps no EMA)")
    state = json.loads(Path(d, "trainer_state.json").read_text())
    if "model_args" not in state:
        raise ValueError(f"--checkpoint: {d} predates exportable checkpoints (no model_args in trainer_state.json)")
    model = MMDiT(_args(state["model_args"]))
    sd = {n: p.detach() for n, p in model.named_parameters()}
    dcp.load({weights: sd}, checkpoint_id=d, no_dist=not dist.is_initialized())
    meta = {"model_args": dataclasses.asdict(model.args), "flow_args": state.get("flow_args"), "weights": weights,
            "step": state["step"], "source": str(d), "semantic_stats": state.get("semantic_stats"), "vae": state.get("vae")}
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in sd.items()}, str(out), metadata={"qimg": json.dumps(meta)})
    return out


def load_exported(path: str | Path, device: str = "cpu") -> tuple[MMDiT, dict]:
    """(plain MMDiT with the exported weights, metadata: model_args, flow_args, weights, step, ...)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["qimg"])
    model = MMDiT(_args(meta["model_args"]))
    model.load_state_dict(load_file(str(path), device=device), strict=True)
    return model.to(device).eval(), meta

