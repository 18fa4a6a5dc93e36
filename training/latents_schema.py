"""Schema of the trainer's cached-latents tables, written by ``jobs/encode_latents.py``.

A cache directory holds two Lance tables:

* ``latents.lance``: one row per kept curated image, its VAE latent at the aspect bucket it was
  resized to (plus, for TI2I rows, the reference image's latent at the same bucket).
* ``text.lance``: one row per (image, caption variant): the condition encoder's hidden states of that
  caption. Variants are ``kind`` x ``lang``: from the captions table (rendered by
  ``captioning.schema.caption_variants``, the one definition) the general caption's ``short`` /
  ``medium`` / ``dense`` and the ``text``, ``knowledge`` and ``structured`` captions, each ``en`` /
  ``zh``; ``alt`` for the curated alt text (lang ``und``); ``instruction`` for TI2I edit
  instructions. One row with ``kind == "null"`` holds the empty prompt used for caption dropout
  and classifier-free guidance.

Keeping text apart lets the trainer pick a caption variant per step by the stage's ratios without
reading the other variants' (large) states. Tensors are stored as raw little-endian float16 bytes
with their shape in separate columns because latents change shape per bucket, which a
fixed-size-list column cannot hold. Provenance (source table URI and version, encoders, resolution)
goes in the schema metadata of both tables under ``qimg.*`` keys.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from captioning.schema import VARIANT_KINDS

# Caption-variant kinds. "null" is the single empty-prompt row.
T2I_KINDS = (*VARIANT_KINDS, "alt")
KINDS = (*T2I_KINDS, "instruction", "null")

LATENT_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "curated row id (same as curation's id)"),
    "bucket_h": (pa.int32(), "pixel height of the aspect bucket the image was resized/cropped to"),
    "bucket_w": (pa.int32(), "pixel width of the aspect bucket"),
    "latent_shape": (pa.list_(pa.int32(), 3), "(C, h, w) of the latent; C includes semantic channels"),
    "semantic_channels": (pa.int32(), "trailing channels of latent that are SeFi semantic channels (0: none)"),
    "ref_id": (pa.string(), "TI2I: id of the reference (source) image; null for T2I-only rows"),
}
LATENT_BLOBS = ("latent", "ref_latent")

TEXT_FIELDS: dict[str, tuple[pa.DataType, str]] = {
    "id": (pa.string(), "image id this caption belongs to ('' for the null prompt)"),
    "kind": (pa.string(), "one of KINDS"),
    "lang": (pa.string(), "en / zh / und (alt text: language unknown)"),
    "text": (pa.string(), "the caption text that was encoded"),
    "length": (pa.int32(), "number of encoder tokens (rows of states)"),
}
TEXT_BLOBS = ("states",)


def _schema(fields, blobs, metadata: dict | None) -> pa.Schema:
    out = [pa.field(n, t, nullable=(n != "id")) for n, (t, _) in fields.items()]
    # Plain large_binary, not Lance blob encoding: the trainer reads these with ``take`` and wants the
    # bytes back directly; Lance is columnar, so index scans of the small columns never touch them.
    out += [pa.field(n, pa.large_binary(), nullable=True) for n in blobs]
    md = {f"qimg.{k}".encode(): json.dumps(v).encode() for k, v in (metadata or {}).items()}
    return pa.schema(out, metadata=md or None)


def latent_schema(metadata: dict | None = None) -> pa.Schema:
    return _schema(LATENT_FIELDS, LATENT_BLOBS, metadata)


def text_schema(metadata: dict | None = None) -> pa.Schema:
    return _schema(TEXT_FIELDS, TEXT_BLOBS, metadata)


def read_metadata(schema: pa.Schema) -> dict:
    md = schema.metadata or {}
    return {k.decode()[5:]: json.loads(v) for k, v in md.items() if k.startswith(b"qimg.")}


def to_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f2").tobytes()


def from_bytes(b: bytes, shape) -> np.ndarray:
    return np.frombuffer(b, dtype="<f2").reshape(tuple(shape))
