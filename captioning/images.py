"""The image a caption request carries: within the model's pixel budget, with its real MIME type.

A VLM's processor resizes every image to at most `max_pixels` anyway (Qwen2.5-VL: 1280 x 28 x 28);
sending a 4000 px photo only costs bandwidth, base64 and server-side decoding, and beyond the
server's limits the request is refused. So images above the budget are downscaled (aspect kept,
JPEG quality 90; transparency composited on white) before they are sent; images within it go as
stored, with the MIME type of their real format. Formats a chat server may not decode (TIFF, BMP,
...) are re-encoded as PNG.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image

SENDABLE = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    mime: str
    size: tuple[int, int]
    """(width, height) of what is sent."""
    resized: bool
    image: Image.Image
    """The decoded RGB image as sent (the OCR check reads this one)."""


def prepare_image(data: bytes, max_pixels: int) -> PreparedImage:
    """Decode once; downscale to `max_pixels` when larger; raise ValueError on undecodable bytes."""
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        w, h = img.size
        scale = math.sqrt(max_pixels / (w * h)) if w * h > max_pixels else 1.0
        if scale < 1.0 and fmt == "JPEG":
            img.draft("RGB", (max(1, int(w * scale)), max(1, int(h * scale))))  # DCT-scaled decode: cheaper
        img.load()
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from None
    rgb = _rgb(img)
    if scale < 1.0:
        size = (max(1, int(w * scale)), max(1, int(h * scale)))  # floor: never above the budget
        rgb = rgb.resize(size, Image.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=90)
        return PreparedImage(buf.getvalue(), "image/jpeg", size, True, rgb)
    if fmt in SENDABLE:
        return PreparedImage(data, SENDABLE[fmt], (w, h), False, rgb)
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    return PreparedImage(buf.getvalue(), "image/png", (w, h), False, rgb)


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")
