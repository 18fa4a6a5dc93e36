"""Scorers shared by the stage filters (``curation.filters``). Each turns decoded images (and captions) into score columns; none decides.

Model-free scorers are plain functions. Model-backed scorers are classes with a cheap constructor
and ``setup()`` that loads the model once per Ray actor (NeMo Curator's lifecycle); ``preflight()``
runs the same loading code in the driver so a missing model stops the job before any work.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image

from .config import ClipModel, ConfigError, RotationDetector

# NudeNet classes that count as NSFW; the detector also reports covered parts and faces.
NSFW_CLASSES = frozenset({
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "ANUS_EXPOSED", "BUTTOCKS_EXPOSED",
})


# --------------------------------------------------------------------------- model-free
def phash64(grey: Image.Image) -> int:
    """imagehash's pHash (DCT of a 32x32 grey thumbnail, 8x8 low frequencies above their median)
    packed into an unsigned 64-bit int. ``reducing_gap`` makes the thumbnail ~3x cheaper than
    imagehash's plain LANCZOS resize; the hash differs from ``imagehash.phash`` by a bit at most."""
    small = np.asarray(grey.resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=3.0), dtype=np.float64)
    low = scipy.fft.dct(scipy.fft.dct(small, axis=0, norm=None), axis=1, norm=None)[:8, :8]
    bits = (low > np.median(low)).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def grey_entropy(grey: Image.Image) -> float:
    """Shannon entropy (bits, 0..8) of the grey histogram: near 0 for flat or blank images."""
    hist = np.asarray(grey.histogram(), dtype=np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum())


_FLAT_VAR = 4.0  # grey levels squared


def noise_score(im: Image.Image, crop: int = 128) -> float:
    """1 - correlation of neighbouring pixels (x and y), max over R, G, B; 0..1, high = noise.

    Natural images are strongly correlated between neighbours at any scale (1/f spectrum), white
    noise is not. Per channel, because colour noise over a calm luminance is invisible in grey.
    Measured on a central crop (no resampling, which would average noise away) to stay cheap.
    """
    w, h = im.size
    cw, ch = min(w, crop), min(h, crop)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    planes = np.asarray(im.crop((x0, y0, x0 + cw, y0 + ch)), dtype=np.float32).transpose(2, 0, 1).copy()
    planes -= planes.mean(axis=(1, 2), keepdims=True)  # centred: float32 sums of squares stay exact enough
    worst = 0.0
    for plane in planes:
        flat = plane.ravel()
        # Horizontal and vertical neighbours as contiguous shifted views (BLAS dot products). The
        # horizontal one also pairs each row's end with the next row's start: 1 pair in `cw`.
        for u, v in ((flat[:-1], flat[1:]), (flat[:-cw], flat[cw:])):
            n = float(len(u))
            if n < 2:
                continue
            su, sv = float(u.sum()), float(v.sum())
            cov = float(np.dot(u, v)) - su * sv / n
            var_u = float(np.dot(u, u)) - su * su / n
            var_v = float(np.dot(v, v)) - sv * sv / n
            # A channel whose std is under ~2 grey levels is flat: what varies there is JPEG rounding,
            # which is decorrelated but invisible (a smooth gradient must not score as noise).
            if var_u > _FLAT_VAR * n and var_v > _FLAT_VAR * n:
                worst = max(worst, 1.0 - cov / np.sqrt(var_u * var_v))
    return min(max(worst, 0.0), 1.0)


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
        self.embed_dim = int(self._load()[0].visual.output_dim)

    def setup(self) -> None:
        self.model, self.preprocess, self.tokenizer = self._load()
        self.embed_dim = int(self.model.visual.output_dim)

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
        preds, probs, _ = self.detect(images, captions)
        return preds, probs

    def detect(self, images: list[Image.Image], captions: list[str | None]
               ) -> tuple[list[int], list[float], np.ndarray]:
        """(turns, probabilities not upright, the 0-degree image embeddings): the last is the
        image's CLIP embedding, so the stage stores it instead of a second forward pass."""
        turned = [im.rotate(a, expand=True) if a else im for im in images for a in self.ANGLES]
        emb = self.clip.embed_images(turned).reshape(len(images), 4, -1)
        texts = [c if c and c.strip() else self.PROMPT for c in captions]
        txt = self.clip.embed_texts(texts)
        logits = 100.0 * np.einsum("nkd,nd->nk", emb, txt)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        best = p.argmax(1)
        # rotation_pred is the counter-clockwise turn (PIL's Image.rotate) that makes the pixels
        # upright, i.e. exactly what action `correct` applies to the stored image.
        return [int(self.ANGLES[b]) for b in best], [float(1.0 - row[0]) for row in p], emb[:, 0]


class TokenCounter:
    """Caption length in tokens of the configured tokenizer (the condition encoder's)."""

    def __init__(self, ref: str):
        self.ref, self.tok = ref, None

    def _load(self):
        path = Path(self.ref).expanduser()
        if _is_local(self.ref) and not path.exists():
            raise ConfigError(f"scoring.tokenizer: no such path: {self.ref} (or run with --skip token_length)")
        try:
            if (path / "tokenizer.json").is_file():
                # The Rust tokenizer alone: no transformers import in every scoring actor.
                from tokenizers import Tokenizer

                return Tokenizer.from_file(str(path / "tokenizer.json"))
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path) if path.exists() else self.ref)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise ConfigError(f"scoring.tokenizer: cannot load '{self.ref}': {type(e).__name__}: {first} "
                              "(set scoring.tokenizer to a local tokenizer folder, or run with "
                              "--skip token_length)") from None

    def preflight(self) -> None:
        self._load()

    def setup(self) -> None:
        self.tok = self._load()

    def __call__(self, captions: list[str | None]) -> list[int | None]:
        idx = [i for i, c in enumerate(captions) if c is not None]
        out: list[int | None] = [None] * len(captions)
        if idx:
            texts = [captions[i] for i in idx]
            if hasattr(self.tok, "encode_batch"):
                lens = [len(e.ids) for e in self.tok.encode_batch(texts, add_special_tokens=False)]
            else:
                lens = [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]
            for i, n in zip(idx, lens, strict=True):
                out[i] = n
        return out
