"""Pluggable VAE, condition encoder and (SeFi) semantic encoder, loaded by local path or model id.

Each has a cheap constructor-free ``load(path)`` used once per Ray actor, then batched ``encode``.
Real runs: diffusers ``AutoencoderKL`` (SD/FLUX-style) or ``AutoencoderKLQwenImage``; a Qwen2.5-VL /
Qwen3-VL checkpoint for the condition states (hidden states of the prompt, template tokens dropped,
as Qwen-Image does). Tests: tiny random models saved with ``save_pretrained`` and loaded through the
same functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Qwen-Image's prompt template for its Qwen2.5-VL condition encoder; the states of the template
# prefix are dropped so the DiT sees only the caption's tokens.
QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def _resolve(path: str, flag: str) -> str:
    """A local directory, or something shaped like a hub id (``org/name``), which from_pretrained
    resolves (from the local HF cache when offline); anything else fails naming the flag."""
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return path
    raise FileNotFoundError(f"{flag}: model path {path} does not exist (set {flag} to a local directory or model id)")


def _from_pretrained(flag: str, path: str, fn, *args, **kw):
    try:
        return fn(path, *args, **kw)
    except OSError as e:  # hub id not downloadable / not cached, or a directory without weights
        raise FileNotFoundError(f"{flag}: cannot load {path} ({str(e).splitlines()[0]}); set {flag} to a local "
                                "model directory or a model id in the local Hugging Face cache") from None


def _class_name(path: str) -> str | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("_class_name")
    return None


@dataclass
class VAE:
    """Normalised latents: ``(z - shift) * scale`` (per channel for the Qwen-Image VAE)."""

    model: torch.nn.Module
    kind: str
    channels: int
    factor: int
    mean: torch.Tensor
    inv_std: torch.Tensor

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype=torch.float32, flag: str = "--vae") -> VAE:
        import diffusers

        path = _resolve(path, flag)
        kind = _class_name(path) or "AutoencoderKL"
        klass = diffusers.AutoencoderKLQwenImage if kind == "AutoencoderKLQwenImage" else diffusers.AutoencoderKL
        model = _from_pretrained(flag, path, klass.from_pretrained, torch_dtype=dtype).to(device).eval()
        cfg = model.config
        if kind == "AutoencoderKLQwenImage":
            c = cfg.z_dim
            mean = torch.tensor(cfg.latents_mean)
            inv_std = 1.0 / torch.tensor(cfg.latents_std)
            factor = 2 ** len(cfg.temperal_downsample)
        else:
            c = cfg.latent_channels
            mean = torch.full((c,), float(cfg.shift_factor or 0.0))
            inv_std = torch.full((c,), float(cfg.scaling_factor))
            factor = 2 ** (len(cfg.block_out_channels) - 1)
        return cls(model, kind, c, factor, mean.view(1, c, 1, 1).to(device), inv_std.view(1, c, 1, 1).to(device))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f]; the posterior mean (mode), so
        the cache is deterministic."""
        x = images.to(self.mean.device, self.model.dtype)
        if self.kind == "AutoencoderKLQwenImage":
            z = self.model.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        else:
            z = self.model.encode(x).latent_dist.mode()
        return (z.float() - self.mean) * self.inv_std

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = (z.to(self.mean.device).float() / self.inv_std + self.mean).to(self.model.dtype)
        if self.kind == "AutoencoderKLQwenImage":
            return self.model.decode(z[:, :, None]).sample[:, :, 0].float().clamp(-1, 1)
        return self.model.decode(z).sample.float().clamp(-1, 1)


@dataclass
class TextEncoder:
    """Hidden states of a causal (V)LM for a prompt; ``layer`` picks the hidden layer (-1: last)."""

    model: torch.nn.Module
    tokenizer: object
    template: str
    drop: int
    layer: int
    max_len: int
    dim: int

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype=torch.float32, layer: int = -1, max_len: int = 512,
             template: str | None = None, flag: str = "--text-encoder") -> TextEncoder:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = _resolve(path, flag)
        cfg = _from_pretrained(flag, path, AutoConfig.from_pretrained)
        tok = _from_pretrained(flag, path, AutoTokenizer.from_pretrained)
        model = _from_pretrained(flag, path, AutoModel.from_pretrained, dtype=dtype).to(device).eval()
        text_cfg = getattr(cfg, "text_config", cfg)
        if template is None:
            # The chat template only makes sense for tokenizers that know Qwen's special tokens.
            template = QWEN_TEMPLATE if "<|im_start|>" in tok.get_vocab() else "{}"
        drop = len(tok(template.split("{}")[0], add_special_tokens=False)["input_ids"])
        return cls(model, tok, template, drop, layer, max_len, text_cfg.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """One float32 array [L_i, dim] per text (template prefix dropped, padding removed). The empty
        prompt keeps the template's closing tokens, so it is never zero-length."""
        batch = self.tokenizer([self.template.format(t) for t in texts], padding=True, truncation=True,
                               max_length=self.max_len + self.drop, return_tensors="pt", add_special_tokens=False)
        dev = next(self.model.parameters()).device
        out = self.model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                         output_hidden_states=True)
        h = out.hidden_states[self.layer].float().cpu()
        res = []
        for i, m in enumerate(batch["attention_mask"].bool()):
            states = h[i][m][self.drop :]
            if states.shape[0] == 0:  # a template-less encoder and an empty prompt: keep one token
                states = h[i][m][-1:]
            res.append(states.numpy())
        return res


@dataclass
class SemanticEncoder:
    """SeFi semantic channels: patch features of a vision foundation model (e.g. DINOv2, SigLIP) on the
    latent grid, reduced to ``channels`` by a fixed seeded orthogonal projection.

    SeFi-Image compresses such features with a trained semantic VAE; the projection is a training-free
    stand-in that keeps the interface (image -> [B, channels, h, w] aligned with the VAE latent grid),
    so a SemVAE can be plugged in here without touching the trainer.
    """

    model: torch.nn.Module
    proj: torch.Tensor
    channels: int
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def load(cls, path: str, channels: int, device: str = "cpu", seed: int = 0, flag: str = "--semantic-encoder"):
        from transformers import AutoModel

        path = _resolve(path, flag)
        model = _from_pretrained(flag, path, AutoModel.from_pretrained).to(device).eval()
        cfg = getattr(model.config, "vision_config", model.config)
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(cfg.hidden_size, channels, generator=g))
        vcfg = getattr(model.config, "vision_config", None) or model.config
        mean = np.array(getattr(vcfg, "image_mean", None) or [0.485, 0.456, 0.406], dtype=np.float32)
        std = np.array(getattr(vcfg, "image_std", None) or [0.229, 0.224, 0.225], dtype=np.float32)
        return cls(model, q.to(device), channels, mean, std)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> [B, channels, *grid]."""
        dev = self.proj.device
        x = (images.to(dev) + 1) / 2
        x = (x - torch.tensor(self.mean, device=dev)[None, :, None, None]) / torch.tensor(self.std, device=dev)[None, :, None, None]
        cfg = self.model.config
        p = cfg.patch_size
        h, w = x.shape[2] // p * p, x.shape[3] // p * p
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False) if (h, w) != x.shape[2:] else x
        kw = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in self.model.forward.__code__.co_varnames else {}
        tokens = self.model(pixel_values=x, **kw).last_hidden_state
        n = (h // p) * (w // p)
        feats = tokens[:, -n:]  # drop CLS/register tokens in front of the patch tokens
        feats = F.layer_norm(feats.float(), feats.shape[-1:])
        feats = (feats @ self.proj).transpose(1, 2).reshape(x.shape[0], self.channels, h // p, w // p)
        return F.interpolate(feats, size=grid, mode="area" if grid[0] <= h // p else "bilinear")
