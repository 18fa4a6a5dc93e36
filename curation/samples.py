"""Sample data and tiny local models, for the demo, the tests and the benchmark.

Real photos come from packages on PyPI (scikit-image's ``skimage.data``, scikit-learn's
``load_sample_images``); corruptions, odd modes and duplicates are generated from them. Nothing is
downloaded: the tiny CLIP and tokenizer are random/trained here and saved to disk, then loaded by
the same code a real run uses (``scoring.clip.weights`` / ``scoring.tokenizer`` paths).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

CAPTIONS = [
    "an astronaut in a white suit in front of a flag", "a cup of coffee on a saucer",
    "a tabby cat looking at the camera", "a rocket on the launch pad", "a chinese temple by a lake",
    "a yellow flower in close-up", "a bowl of fruit on a table", "an old coin on a dark background",
    "a colourful hubble deep field", "a retina photograph", "a hand-drawn brick wall",
    "a grey camera man photograph",
]


def real_photos() -> list[tuple[str, Image.Image]]:
    """Named RGB photos shipped inside scikit-image and scikit-learn (no network)."""
    from skimage import data as sk
    from sklearn.datasets import load_sample_images

    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
                 "motorcycle_left", "colorwheel"):
        try:
            a = getattr(sk, name)()
        except Exception:  # an optional skimage image that needs pooch: skip it, others suffice
            continue
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        out.append((name, Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8))))
    for name in ("camera", "coins", "moon", "brick", "text", "page"):
        a = getattr(sk, name)()
        out.append((name, Image.fromarray(a.astype(np.uint8)).convert("RGB")))
    imgs = load_sample_images()
    for name, a in zip(("china", "flower"), imgs.images, strict=True):
        out.append((name, Image.fromarray(a)))
    return out


def jpeg(im: Image.Image, quality: int = 92, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming a gigapixel image (the IDAT is tiny): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk of a PNG file, in order."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def build_png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file from (type, payload) chunks, each with a correct CRC."""
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks)


def corrupt_idat_png(im: Image.Image) -> bytes:
    """A PNG whose deflate stream is damaged mid-way while every chunk CRC is valid: CRC checks
    pass, only decoding the pixels reveals it."""
    chunks = png_chunks(png(im))
    idat = b"".join(d for k, d in chunks if k == b"IDAT")
    mid = len(idat) // 2
    bad = idat[:mid] + bytes(b ^ 0xFF for b in idat[mid:mid + 256]) + idat[mid + 256:]
    head = [c for c in chunks if c[0] not in (b"IDAT", b"IEND")]
    return build_png(head + [(b"IDAT", bad), (b"IEND", b"")])


def exif_rotated_jpeg(im: Image.Image, orientation: int = 6) -> bytes:
    """The pixels of ``im`` stored turned, with the EXIF tag that tells a viewer to turn them back."""
    inverse = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(im.transpose(inverse[orientation]), exif=exif.tobytes())


def malformed_corpus(base: Image.Image) -> dict[str, bytes]:
    """file name -> bytes: broken files and every awkward mode; each must become exactly one row."""
    good = jpeg(base)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    frames = [base.resize((300, 300)), base.resize((300, 300)).rotate(90)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    bad_png = bytearray(png(base))
    bad_png[60:200] = b"\x00" * 140  # smash the start of IDAT: zlib / CRC error on decode
    return {
        "truncated.jpg": good[: len(good) // 2],
        "zero_bytes.jpg": b"",
        "not_an_image.jpg": b"this is a text file, not a JPEG\n",
        "corrupt.png": bytes(bad_png),
        "corrupt_idat_valid_crc.png": corrupt_idat_png(base),
        "bomb.png": bomb_png(),
        "cmyk.jpg": jpeg(base.convert("CMYK")),
        "grey16.png": png(Image.fromarray(grey16)),
        "palette.png": png(base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)),
        "animated.gif": gif.getvalue(),
        "rgba.png": png(rgba),
        "la.png": png(base.convert("LA")),
        "exif_rot6.jpg": exif_rotated_jpeg(base, 6),
        "png_named.jpg": png(base),  # content, not extension, picks the decoder
    }


def write_sample_folder(root: str | Path, n_extra_dups: int = 1) -> dict[str, str]:
    """A folder of real photos with sidecar captions, near/exact duplicates, filter triggers,
    malformed files and awkward file names. Returns {file name: what it tests}."""
    root = Path(root)
    (root / "nested" / "déjà vu").mkdir(parents=True, exist_ok=True)
    what: dict[str, str] = {}

    def put(rel: str, data: bytes, caption: str | None, note: str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if caption is not None:
            p.with_suffix(".txt").write_text(caption)
        what[rel] = note

    photos = real_photos()
    for i, (name, im) in enumerate(photos):
        put(f"photos/{name}.jpg", jpeg(im), CAPTIONS[i % len(CAPTIONS)], "photo")
    astro = photos[0][1]
    put("dups/astronaut_q40.jpg", jpeg(astro, 40), CAPTIONS[0], "near dup: re-encoded")
    put("dups/astronaut_small.JPG", jpeg(astro.resize((400, 400))), CAPTIONS[0], "near dup: resized")
    put("dups/astronaut_bright.jpeg", jpeg(ImageEnhance.Brightness(astro).enhance(1.15)), CAPTIONS[0],
        "near dup: brighter")
    put("dups/astronaut_copy.jpg", (root / "photos/astronaut.jpg").read_bytes(), CAPTIONS[0], "exact dup")
    put("nested/déjà vu/tiny photo (1).png", png(astro.resize((100, 100))), "a small astronaut", "resolution")
    put("nested/wide $weird 'name'.jpg", jpeg(photos[1][1].resize((1600, 200))), "a wide coffee", "aspect ratio")
    put("filters/blank.png", png(Image.new("RGB", (512, 512), (250, 250, 250))), "a white page", "entropy low")
    rng = np.random.default_rng(0)
    put("filters/noise.png", png(Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).convert("RGB")),
        "static noise", "entropy high (noise)")
    # Independent noise per channel: its grey histogram is a smooth bell (entropy ~7.3 bits, below
    # what a grey-only "too much entropy" rule would flag); only a per-channel measure sees it.
    put("filters/colour_noise.png", png(Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))),
        "colour static", "entropy high (colour noise)")
    put("filters/long_caption.jpg", jpeg(photos[1][1].transpose(Image.Transpose.FLIP_LEFT_RIGHT)), "cat " * 3000,
        "token length")
    put("filters/no_caption.jpg", jpeg(photos[3][1].rotate(180)), None, "no caption")
    for name, data in malformed_corpus(photos[2][1]).items():
        put(f"malformed/{name}", data, "a malformed file", f"malformed: {name}")
    put("UPPER/PHOTO.JPEG", jpeg(photos[4][1]), CAPTIONS[4], "upper-case extension")
    (root / "notes.md").write_text("not an image; ignored by extension")
    return what


# --------------------------------------------------------------------------- tiny models
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(out_dir: str | Path) -> tuple[str, str, str]:
    """A random open_clip model saved as a checkpoint: (model name, config json, weights path)."""
    import open_clip
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip", pretrained=None)
    weights = out / "tiny-clip.pt"
    torch.save(model.state_dict(), weights)
    return "tiny-clip", str(cfg_path), str(weights)


def make_tiny_aesthetic(out_dir: str | Path, dim: int = TINY_CLIP["embed_dim"]) -> str:
    """A random head with the LAION aesthetic predictor's layer names, for the tiny CLIP's width
    (the real 768-d weights live in ../shared/models/laion-aesthetic-v2/)."""
    import torch

    from .aesthetic import AestheticMLP

    torch.manual_seed(0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tiny-aesthetic-{dim}.pth"
    torch.save(AestheticMLP(dim).state_dict(), path)
    return str(path)


def stage4_corpus(root: str | Path, side: int = 576) -> dict[str, str]:
    """Real photos at ``side`` px short side, clean and degraded the ways stage 4 must catch.
    Returns {file name: the filter that must reject it, or "" for kept}."""
    from PIL import ImageFilter

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    photos = dict(real_photos())

    def sized(name: str) -> Image.Image:
        im = photos[name]
        s = side / min(im.size)
        return im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.Resampling.LANCZOS)

    q8 = Image.open(io.BytesIO(jpeg(sized("chelsea"), 8)))
    files = {
        "clean_astronaut.jpg": (jpeg(sized("astronaut"), 95), ""),
        "clean_china.jpg": (jpeg(sized("china"), 95), ""),
        "clean_flower.png": (png(sized("flower")), ""),
        "small_rocket.jpg": (jpeg(photos["rocket"].resize((300, 450)), 95), "resolution"),
        "blur_camera.jpg": (jpeg(sized("camera").filter(ImageFilter.GaussianBlur(6)), 95), "quality"),
        "q8_chelsea.jpg": (jpeg(sized("chelsea"), 8), "compression"),
        "q8_resaved_q95_coins.jpg": (jpeg(Image.open(io.BytesIO(jpeg(sized("coins"), 8))), 95),
                                          "compression"),
        "q8_as_png_chelsea.png": (png(q8), "compression"),
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: why for name, (_, why) in files.items()}


def make_tiny_tokenizer(out_dir: str | Path) -> str:
    """A byte-level BPE trained on a few captions, saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CAPTIONS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return str(out_dir)


def write_sample_config(path: str | Path, models_dir: str | Path) -> str:
    """A stage-1 YAML pointing at the tiny local models (random CLIP: its scores mean nothing, so
    the sample config sets the CLIP and rotation thresholds so that they never fire: they only
    demonstrate the plumbing; a real run points these settings at real weights)."""
    import yaml

    name, cfg_json, weights = make_tiny_clip(Path(models_dir) / "clip")
    tok = make_tiny_tokenizer(Path(models_dir) / "tokenizer")
    cfg = {
        "stage": "stage1",
        "batch_size": 16,
        "scoring": {"clip": {"model": name, "model_config": cfg_json, "weights": weights},
                    "tokenizer": tok, "rotation": {"detector": "clip"}},
        "thresholds": {"clip": {"min_score": -1.0}, "token_length": {"max_tokens": 512},
                       "rotation": {"action": "discard", "min_confidence": 1.0}},
    }
    Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


if __name__ == "__main__":  # python -m curation.samples OUT_DIR
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "data/samples")
    notes = write_sample_folder(out / "images")
    cfg = write_sample_config(out / "stage1_sample.yaml", out / "models")
    print(f"wrote {len(notes)} sample files under {out / 'images'} and config {cfg}")
    os.sys.exit(0)
