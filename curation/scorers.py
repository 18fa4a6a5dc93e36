"""Stage-1 scorers. Each turns decoded images (and captions) into score columns; none decides.

Model-free scorers are plain functions. Model-backed scorers are classes with a cheap constructor
and ``setup()`` that loads the model once per Ray actor (NeMo Curator's lifecycle); ``preflight()``
runs the same loading code in the driver so a missing model stops the job before any work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

from .config import ClipModel, ConfigError, RotationDetector

# NudeNet classes that count as NSFW; the detector also reports covered parts and faces.
NSFW_CLASSES = frozenset({
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "ANUS_EXPOSED", "BUTTOCKS_EXPOSED",
})


# --------------------------------------------------------------------------- model-free
def phash64(im: Image.Image) -> int:
    """imagehash's pHash (DCT of a 32x32 grey thumbnail) packed into an unsigned 64-bit int."""
    bits = imagehash.phash(im).hash.ravel()
    return int(np.packbits(bits).view(">u8")[0])


def entropy_and_noise(im: Image.Image) -> tuple[float, float]:
    """Grey-histogram entropy in bits (low = flat/blank) and a noise score in 0..1 (high = noise).

    Noise is 1 - correlation of neighbouring pixels, averaged over x and y and taken as the max over
    R, G and B: natural images are strongly correlated at any scale (1/f spectrum), white noise is
    not, and colour noise over a smooth luminance shows up in one channel even when grey looks calm.
    Being a correlation it does not depend on contrast or on how far the image was downscaled.
    """
    a = np.asarray(im, dtype=np.float32)
    grey = np.asarray(im.convert("L"))
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / grey.size
    entropy = float(-(p * np.log2(p)).sum())
    noise = 0.0
    for c in range(3):
        ch = a[..., c]
        for x, y in ((ch[:, :-1], ch[:, 1:]), (ch[:-1, :], ch[1:, :])):
            x = x - x.mean()
            y = y - y.mean()
            denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
            if denom > 1e-6 * x.size:  # a flat channel has no noise
                noise = max(noise, 1.0 - float((x * y).sum()) / denom)
    return entropy, min(max(noise, 0.0), 1.0)


# --------------------------------------------------------------------------- model-backed
def _is_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(ref))


class NsfwScorer:
    """NudeNet's ONNX detector (shipped inside the ``nudenet`` wheel): score = max confidence over
    exposed-content classes, 0 when none is detected."""

    def __init__(self, model_path: str | None = None, batch_size: int = 16):
        self.model_path, self.batch_size, self.detector = model_path, batch_size, None

    def preflight(self) -> None:
        if self.model_path and not Path(self.model_path).expanduser().is_file():
            raise ConfigError(f"scoring.nsfw_model: no such file: {self.model_path} "
                              "(set scoring.nsfw_model, leave it null for NudeNet's model, or --skip nsfw)")
        import nudenet  # noqa: F401 - import error is the message

    def setup(self) -> None:
        from nudenet import NudeDetector

        self.detector = NudeDetector(model_path=self.model_path)

    def __call__(self, images: list[Image.Image]) -> list[float]:
        # NudeNet's reader converts RGBA->BGR; hand it RGBA arrays of our already decoded pixels.
        arrays = [np.asarray(im.convert("RGBA")) for im in images]
        out = self.detector.detect_batch(arrays, batch_size=self.batch_size)
        return [max((d["score"] for d in dets if d["class"] in NSFW_CLASSES), default=0.0) for dets in out]


class ClipScorer:
    """open_clip image-text cosine similarity. Also embeds the four rotations of an image for the
    zero-shot rotation detector, so the model is loaded once for both."""

    def __init__(self, cfg: ClipModel, device: str = "cpu"):
        self.cfg, self.device = cfg, device
        self.model = self.preprocess = self.tokenizer = None

    def _load(self):
        import open_clip
        import torch

        cfg = self.cfg
        if cfg.model_config:
            path = Path(cfg.model_config).expanduser()
            if not path.is_file():
                raise ConfigError(f"scoring.clip.model_config: no such file: {path}")
            open_clip.add_model_config(path)
        if cfg.weights is None:
            raise ConfigError("scoring.clip.weights is not set: give a local checkpoint path or an "
                              "open_clip pretrained tag (or run with --skip clip)")
        if _is_local(cfg.weights) and not Path(cfg.weights).expanduser().is_file():
            raise ConfigError(f"scoring.clip.weights: no such file: {cfg.weights} (or run with --skip clip)")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=os.path.expanduser(cfg.weights), device=self.device)
        except ConfigError:
            raise
        except Exception as e:  # unknown arch, unreachable hub, bad checkpoint
            raise ConfigError(f"scoring.clip: cannot load model '{cfg.model}' with weights "
                              f"'{cfg.weights}': {type(e).__name__}: {e}") from None
        model.eval().requires_grad_(False)
        return model, preprocess, open_clip.get_tokenizer(cfg.model)

    def preflight(self) -> None:
        self._load()

    def setup(self) -> None:
        self.model, self.preprocess, self.tokenizer = self._load()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(images), self.cfg.batch_size):
            x = torch.stack([self.preprocess(im) for im in images[i:i + self.cfg.batch_size]]).to(self.device)
            with torch.inference_mode():  # per call: Ray runs batches on a non-main thread
                e = self.model.encode_image(x).float()
            out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            e = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
        return torch.nn.functional.normalize(e, dim=-1).cpu().numpy()

    def similarity(self, images: list[Image.Image], captions: list[str | None]) -> list[float | None]:
        """Cosine similarity per pair; None where there is no caption (not a rejection)."""
        idx = [i for i, c in enumerate(captions) if c and c.strip()]
        out: list[float | None] = [None] * len(images)
        if idx:
            img = self.embed_images([images[i] for i in idx])
            txt = self.embed_texts([captions[i] for i in idx])
            for k, i in enumerate(idx):
                out[i] = float((img[k] * txt[k]).sum())
        return out


class ClipRotationDetector:
    """Zero-shot rotation detector: embed the image turned by 0/90/180/270 degrees, and ask which
    turn CLIP finds most like "an upright photo" (or the caption when there is one). Returns the
    predicted rotation of the *pixels* and the probability that they are not upright."""

    ANGLES = (0, 90, 180, 270)
    PROMPT = "a photo, upright, correctly oriented"

    def __init__(self, clip: ClipScorer, cfg: RotationDetector):
        self.clip, self.cfg = clip, cfg

    def __call__(self, images: list[Image.Image], captions: list[str | None]) -> tuple[list[int], list[float]]:
        turned = [im.rotate(a, expand=True) for im in images for a in self.ANGLES]
        emb = self.clip.embed_images(turned).reshape(len(images), 4, -1)
        texts = [c if c and c.strip() else self.PROMPT for c in captions]
        txt = self.clip.embed_texts(texts)
        logits = 100.0 * np.einsum("nkd,nd->nk", emb, txt)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        best = p.argmax(1)
        # rotation_pred is the counter-clockwise turn (PIL's Image.rotate) that makes the pixels
        # upright, i.e. exactly what action `correct` applies to the stored image.
        return [int(self.ANGLES[b]) for b in best], [float(1.0 - row[0]) for row in p]


class TokenCounter:
    """Caption length in tokens of the configured tokenizer (the condition encoder's)."""

    def __init__(self, ref: str):
        self.ref, self.tok = ref, None

    def _load(self):
        from transformers import AutoTokenizer

        if _is_local(self.ref) and not Path(self.ref).expanduser().exists():
            raise ConfigError(f"scoring.tokenizer: no such path: {self.ref} (or run with --skip token_length)")
        try:
            return AutoTokenizer.from_pretrained(os.path.expanduser(self.ref))
        except Exception as e:
            raise ConfigError(f"scoring.tokenizer: cannot load '{self.ref}': {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''} (set scoring.tokenizer to a "
                              "local tokenizer folder, or run with --skip token_length)") from None

    def preflight(self) -> None:
        self._load()

    def setup(self) -> None:
        self.tok = self._load()

    def __call__(self, captions: list[str | None]) -> list[int | None]:
        idx = [i for i, c in enumerate(captions) if c is not None]
        out: list[int | None] = [None] * len(captions)
        if idx:
            enc = self.tok([captions[i] for i in idx], add_special_tokens=False)["input_ids"]
            for i, ids in zip(idx, enc, strict=True):
                out[i] = len(ids)
        return out


def read_json_caption(raw: bytes) -> str | None:
    """Caption from a WebDataset/img2dataset ``.json`` sidecar (``caption`` or ``text`` key)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict):
        for k in ("caption", "text", "prompt"):
            if isinstance(obj.get(k), str):
                return obj[k]
    return None
