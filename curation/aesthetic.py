"""LAION improved-aesthetic-predictor (v2) on stored CLIP image embeddings.

The head is a plain MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations: the "linear"
variant; dropout is inactive at inference) over the L2-normalised OpenAI CLIP ViT-L/14 image
embedding. It reads the stored ``clip_embedding`` column, so no image is decoded and no CLIP runs
again. The lifecycle is the project's model-backed one: a cheap constructor, ``preflight()`` in the
driver (a missing or wrong file stops the job naming the setting), ``setup()`` once per actor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.typed_config import ConfigError

EMBED_DIM = 768
"""Width of the OpenAI CLIP ViT-L/14 image embedding the head was trained on."""


class AestheticMLP(nn.Module):
    """The head's layers under the names of the released state dict (``layers.N.*``)."""

    def __init__(self, dim: int = EMBED_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class AestheticHead:
    """Scores (about 1..10, LAION's ratings) of CLIP ViT-L/14 image embeddings.

    ``AestheticHead(path)(embeddings)`` -> float32 array; ``embeddings`` is (n, 768) array-like,
    any float dtype (the stored float16 is fine: rows are re-normalised in float32).
    """

    def __init__(self, weights: str | None, device: str = "cpu", batch_size: int = 8192,
                 setting: str = "scoring.aesthetic.weights"):
        self.weights, self.device, self.batch_size, self.setting = weights, device, batch_size, setting
        self.model: AestheticMLP | None = None

    def _load(self) -> AestheticMLP:
        if not self.weights:
            raise ConfigError(f"{self.setting} is not set: the path of the LAION aesthetic head "
                              "(sac+logos+ava1-l14-linearMSE.pth), or --skip aesthetic")
        path = Path(self.weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"{self.setting}: no such file: {self.weights} (or --skip aesthetic)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = AestheticMLP(state["layers.0.weight"].shape[1])
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign checkpoint: name the setting
            raise ConfigError(f"{self.setting}: {self.weights} is not the LAION aesthetic head's state "
                              f"dict: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        return model.eval().requires_grad_(False).to(self.device)

    def preflight(self) -> None:
        self._load()

    def setup(self) -> None:
        self.model = self._load()

    @property
    def dim(self) -> int:
        return self.model.layers[0].in_features

    def __call__(self, embeddings) -> np.ndarray:
        if self.model is None:
            self.setup()
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"aesthetic head expects (n, {self.dim}) CLIP ViT-L/14 image embeddings, got "
                             f"shape {x.shape} (scoring.clip must be the {self.dim}-d model)")
        out = np.empty(len(x), np.float32)
        with torch.inference_mode():  # per call: Ray runs batches on a non-main thread
            for i in range(0, len(x), self.batch_size):
                t = torch.from_numpy(np.ascontiguousarray(x[i:i + self.batch_size], np.float32)).to(self.device)
                t = nn.functional.normalize(t, dim=-1)
                out[i:i + len(t)] = self.model(t).float().cpu().numpy()
        return out
