"""Monitoring of a long run, written by rank 0 beside ``metrics.jsonl``:

* ``validation/step_XXXXXXXX/NN.png``: the fixed validation prompts (both languages, text-rendering
  prompts included) sampled with the EMA weights and the same noise every time, decoded with the
  cache's VAE; ``validation.html`` shows every validation step as a row;
* ``tensorboard/``: TensorBoard event files with every logged scalar and the validation images;
* the loss per timestep bucket (``loss_t/<lo>-<hi>``) and MFU go into ``metrics.jsonl`` like any metric.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch


def encode_prompts(meta: dict, prompts: list[str] | tuple[str, ...], use_gpu: bool) -> list[np.ndarray]:
    """The prompts' condition states, encoded once per run in a Ray task with the cache's text encoder
    and settings (recorded in the latents table's metadata), so they match the training captions."""
    import ray

    from training.encoders import TextEncoder

    @ray.remote(num_gpus=1 if use_gpu else 0)
    def _encode(prompts):
        enc = TextEncoder.load(meta["text_encoder"], device="cuda" if use_gpu else "cpu",
                               layer=int(meta.get("text_layer", -1)), max_len=int(meta.get("max_text_len", 512)))
        return [s.astype(np.float16) for s in enc.encode(list(prompts))]

    return ray.get(_encode.remote(list(prompts)))


class TimestepBuckets:
    """Sums and counts of per-sample losses per bucket of the progress t, all-reduced at log time."""

    def __init__(self, n: int, device):
        self.n, self.device = n, device
        self.sums = torch.zeros(2, n, device=device, dtype=torch.float64)

    def add(self, t: torch.Tensor, sample_loss: torch.Tensor) -> None:
        idx = (t.double() * self.n).long().clamp(0, self.n - 1).to(self.device)
        self.sums[0].index_add_(0, idx, sample_loss.double().to(self.device))
        self.sums[1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def metrics(self, reduced: torch.Tensor) -> dict[str, float]:
        out = {}
        for i in range(self.n):
            if reduced[1, i] > 0:
                out[f"loss_t/{i / self.n:.2f}-{(i + 1) / self.n:.2f}"] = float(reduced[0, i] / reduced[1, i])
        return out

    def reset(self) -> None:
        self.sums.zero_()


class Monitor:
    """Rank 0's writer: JSON lines, TensorBoard scalars and images, validation PNGs and their page."""

    def __init__(self, log_path: str | None, tensorboard: bool, prompts: list[str] | tuple[str, ...], meta: dict):
        self.log_path = Path(log_path) if log_path else None
        self.dir = self.log_path.parent if self.log_path else None
        self.prompts, self.meta = list(prompts), meta
        self.tb = None
        if self.dir and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._vae = None

    def log(self, metrics: dict) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if self.tb:
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()

    def _decode(self, z: torch.Tensor) -> np.ndarray:
        from training.encoders import VAE

        if self._vae is None:
            self._vae = VAE.load(self.meta["vae"], device="cuda" if torch.cuda.is_available() else "cpu")
        z = z[:, : self._vae.channels]  # SeFi: the semantic channels are not decoded
        img = (self._vae.decode(z) + 1) * 127.5
        return img.round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()

    def validation_images(self, step: int, latents: torch.Tensor) -> list[Path]:
        from PIL import Image

        if not self.dir:
            return []
        out = self.dir / "validation" / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(self._decode(latents)):
            p = out / f"{i:02d}.png"
            Image.fromarray(im).save(p)
            paths.append(p)
            if self.tb:
                self.tb.add_image(f"validation/{i:02d}", im, step, dataformats="HWC")
        if self.tb:
            self.tb.flush()
        self.write_page()
        return paths

    def write_page(self) -> Path:
        """validation.html: one row per validation step (newest first), one column per prompt."""
        steps = sorted((p for p in (self.dir / "validation").glob("step_*") if p.is_dir()), reverse=True)
        head = "".join(f"<th>{i}: {html.escape(t)}</th>" for i, t in enumerate(self.prompts))
        rows = []
        for s in steps:
            cells = "".join(f"<td><img src='validation/{s.name}/{i:02d}.png' style='width:160px;image-rendering:pixelated'></td>"
                            for i in range(len(self.prompts)) if (s / f"{i:02d}.png").is_file())
            rows.append(f"<tr><th>{int(s.name[5:]):,}</th>{cells}</tr>")
        page = self.dir / "validation.html"
        page.write_text("<!doctype html><meta charset='utf-8'><title>validation samples (EMA)</title>"
                        "<body style='font-family:sans-serif'><h1>Validation samples (EMA weights, same noise every step)</h1>"
                        f"<table><tr><th>step</th>{head}</tr>{''.join(rows)}</table></body>")
        return page

    def close(self) -> None:
        if self.tb:
            self.tb.close()
