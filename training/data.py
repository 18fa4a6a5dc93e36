"""Data for the trainer: aspect buckets, caption variants, and the step -> batch mapping over the
cached-latents Lance tables.

Why the loop does not iterate a Ray Data stream: resuming "at the same data position" needs the batch
of step ``k`` to be recomputable, and Ray Data iterators cannot be restored mid-stream. So Ray Data
does the scans (building the index of buckets and caption variants from Lance, and all of
``jobs/encode_latents.py``), and each step's batch is a pure function of ``(seed, step)``: a seeded
draw of task (T2I/TI2I), bucket, rows and caption variants, fetched with Lance random access
(``take``) from the version pinned at start. Rows are drawn with replacement (a weighted i.i.d.
mixture, as large-scale stage mixtures are usually specified), so there is no epoch state to save.
"""

from __future__ import annotations

from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa
import torch

from captioning.schema import CAPTION_TYPES, caption_variants, variant_type
from training.latents_schema import T2I_KINDS, from_bytes, read_metadata

# ---------------------------------------------------------------- aspect buckets (PixArt-style)


def bucket_table(resolution: int, multiple: int = 32, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution**2 pixels, sides multiples of ``multiple``, aspect
    ratios from 1/max_ratio to max_ratio; PixArt's ASPECT_RATIO_* tables computed for any resolution."""
    area = resolution * resolution
    out: dict[int, tuple[int, int]] = {}
    for h in range(multiple, int(resolution * max_ratio**0.5) + multiple, multiple):
        w = max(multiple, round(area / h / multiple) * multiple)
        if 1 / max_ratio <= h / w <= max_ratio:
            out.setdefault(w, (h, w))  # keep the first (closest to area) h per width
    return sorted(out.values(), key=lambda hw: hw[0] / hw[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = np.log(height / width)
    return min(buckets, key=lambda hw: abs(np.log(hw[0] / hw[1]) - ar))


def resize_to_bucket(img, bucket: tuple[int, int]) -> np.ndarray:
    """PIL image -> float32 [3, h, w] in [-1, 1]: scale to cover the bucket, centre crop."""
    from PIL import Image

    bh, bw = bucket
    w, h = img.size
    s = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
    img = img.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    return (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0


# ---------------------------------------------------------------- caption variants


def image_variants(alt_text: str | None, caption_row: dict | None) -> list[tuple[str, str, str]]:
    """(kind, lang, text) for every non-empty caption of an image: the captions-table row rendered by
    ``captioning.schema.caption_variants`` (the one definition of what training reads; nothing for a
    failed or missing row), then the curated alt text as kind ``alt``."""
    out = caption_variants(caption_row) if caption_row is not None else []
    if alt_text and alt_text.strip():
        out.append(("alt", "und", alt_text.strip()))
    return out


def _draw(rng: np.random.Generator, options: list[str], weights: dict[str, float]) -> str:
    """One of ``options`` by ``weights`` renormalised over them (uniform when they all weigh 0)."""
    w = np.array([weights.get(o, 0.0) for o in options], dtype=float)
    w = w / w.sum() if w.sum() > 0 else np.full(len(options), 1 / len(options))
    return options[int(rng.choice(len(options), p=w))]


def pick_variant(available: list[tuple[int, str, str]], kinds: dict[str, float], lengths: dict[str, float],
                 langs: dict[str, float], rng: np.random.Generator, instruction: bool = False) -> int:
    """Choose one text row among ``available`` (row, kind, lang) in three draws, each renormalised over
    what this image has: the caption type by ``kinds`` (general / text / knowledge / structured /
    alt), for ``general`` its length by ``lengths`` (short / medium / dense), then the language by
    ``langs``. Types weighted 0 are drawn only when nothing else exists (then the alt text first)."""
    if instruction:
        rows = [(r, lg) for r, k, lg in available if k == "instruction"]
    else:
        by_type: dict[str, list[tuple[int, str, str]]] = {}
        for r, k, lg in available:
            if k in T2I_KINDS:
                by_type.setdefault(variant_type(k), []).append((r, k, lg))
        types = [t for t in (*CAPTION_TYPES, "alt") if t in by_type]
        weighted = [t for t in types if kinds.get(t, 0.0) > 0]
        t = _draw(rng, weighted, kinds) if weighted else ("alt" if "alt" in by_type else types[0])
        present = sorted({k for _, k, _ in by_type[t]}, key=T2I_KINDS.index)
        kind = _draw(rng, present, lengths) if t == "general" else present[0]
        rows = [(r, lg) for r, k, lg in by_type[t] if k == kind]
    lang = _draw(rng, sorted({lg for _, lg in rows}), langs)
    return next(r for r, lg in rows if lg == lang)


# ---------------------------------------------------------------- index and step -> batch


@dataclass
class LatentIndex:
    """What the sampler needs, scanned once with Ray Data: per latent row its bucket and whether it has
    a TI2I reference; per image its text rows. Holds the pinned table versions."""

    latents_uri: str
    text_uri: str
    latents_version: int
    text_version: int
    meta: dict
    bucket: np.ndarray  # [N, 2] (h, w) per latent row
    has_ref: np.ndarray  # [N] bool
    texts: list[list[tuple[int, str, str]]]  # per latent row: (text row, kind, lang)
    null_row: int

    def __post_init__(self):
        self._pools: dict[bool, tuple] = {}

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return sorted({(int(h), int(w)) for h, w in self.bucket})

    def pools(self, ti2i: bool) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Bucket keys, the eligible latent rows per bucket, and bucket probabilities (by size)."""
        if ti2i not in self._pools:
            # T2I draws rows with a caption (TI2I pair rows carry only their edit instruction);
            # TI2I draws pair rows with a reference latent and an instruction.
            kinds = ("instruction",) if ti2i else T2I_KINDS
            has_text = np.array([any(k in kinds for _, k, _ in t) for t in self.texts], dtype=bool)
            eligible = np.flatnonzero(has_text & self.has_ref if ti2i else has_text)
            if len(eligible) == 0:
                what = "TI2I rows (with ref_latent)" if ti2i else "rows with a caption"
                raise ValueError(f"data.{'ti2i' if ti2i else 't2i'}_ratio: the latent cache has no {what}")
            keys, inv, counts = np.unique(self.bucket[eligible], axis=0, return_inverse=True, return_counts=True)
            pools = [eligible[inv.reshape(-1) == b] for b in range(len(keys))]
            self._pools[ti2i] = (keys, pools, counts / counts.sum())
        return self._pools[ti2i]


def _positions(ds: lance.LanceDataset, rowaddr: np.ndarray) -> np.ndarray:
    """Row addresses (fragment_id << 32 | offset) -> global positions for ``take``. The caches are
    written once and never deleted from, so positions are contiguous per fragment."""
    starts, acc = {}, 0
    for f in ds.get_fragments():
        starts[f.fragment_id] = acc
        acc += f.count_rows()
    rowaddr = rowaddr.astype(np.int64)
    frag = rowaddr >> 32
    return np.array([starts[int(f)] for f in frag], dtype=np.int64) + (rowaddr & 0xFFFFFFFF)


def _scan(uri: str, version: int, columns: list[str]) -> pa.Table:
    import ray

    ds = ray.data.read_lance(uri, columns=columns, version=version, scanner_options={"with_row_address": True})
    refs = ds.to_arrow_refs()
    return pa.concat_tables([t for t in ray.get(refs) if t.num_rows]) if refs else None


def build_index(cache_dir: str) -> LatentIndex:
    """Scan the small columns of both tables with Ray Data, pinned to the versions opened here."""
    lat_uri, txt_uri = f"{cache_dir}/latents.lance", f"{cache_dir}/text.lance"
    try:
        lat_ds, txt_ds = lance.dataset(lat_uri), lance.dataset(txt_uri)
    except Exception as e:  # noqa: BLE001 - any open failure means the same thing to the user
        raise FileNotFoundError(f"--data: {cache_dir} has no latents.lance/text.lance (run jobs/encode_latents.py): {e}") from None
    lat = _scan(lat_uri, lat_ds.version, ["bucket_h", "bucket_w", "ref_id", "id"])
    txt = _scan(txt_uri, txt_ds.version, ["id", "kind", "lang"])
    n = lat_ds.count_rows()
    lpos = _positions(lat_ds, lat.column("_rowaddr").to_numpy())
    bucket = np.zeros((n, 2), dtype=np.int64)
    bucket[lpos, 0], bucket[lpos, 1] = lat.column("bucket_h").to_numpy(), lat.column("bucket_w").to_numpy()
    has_ref = np.zeros(n, dtype=bool)
    has_ref[lpos] = ~np.asarray(lat.column("ref_id").is_null().to_numpy(zero_copy_only=False))
    pos_of_id = dict(zip(lat.column("id").to_pylist(), lpos.tolist(), strict=True))

    tpos = _positions(txt_ds, txt.column("_rowaddr").to_numpy())
    texts: list[list[tuple[int, str, str]]] = [[] for _ in range(n)]
    null_row = -1
    for r, i, k, lg in sorted(zip(tpos.tolist(), *(txt.column(c).to_pylist() for c in ("id", "kind", "lang")), strict=True)):
        if k == "null":
            null_row = r
        elif i in pos_of_id:
            texts[pos_of_id[i]].append((r, k, lg))
    if null_row < 0:
        raise ValueError(f"--data: {txt_uri} has no null-prompt row (re-run jobs/encode_latents.py)")
    return LatentIndex(lat_uri, txt_uri, lat_ds.version, txt_ds.version, read_metadata(lat_ds.schema),
                       bucket, has_ref, texts, null_row)


@dataclass(frozen=True)
class StepPlan:
    ti2i: bool
    bucket: tuple[int, int]
    latent_rows: np.ndarray  # [global_batch]
    text_rows: np.ndarray  # [global_batch]


def plan_step(index: LatentIndex, step: int, global_batch: int, seed: int, t2i_ratio: float,
              caption_types: dict[str, float], languages: dict[str, float],
              caption_kinds: dict[str, float] | None = None) -> StepPlan:
    """The global batch of ``step``: a pure function of (index, seed, step). ``caption_types`` are the
    general caption's length ratios, ``caption_kinds`` the caption-type ratios (data config);
    None weighs every type alike."""
    rng = np.random.default_rng([seed, step])
    ti2i = bool(rng.random() >= t2i_ratio)
    keys, pools, probs = index.pools(ti2i)
    b = rng.choice(len(keys), p=probs)  # buckets in proportion to their size
    pool = pools[b]
    rows = rng.choice(pool, size=global_batch, replace=True)
    text_rows = np.array([pick_variant(index.texts[r], caption_kinds or dict.fromkeys((*CAPTION_TYPES, "alt"), 1.0), caption_types, languages, rng, instruction=ti2i) for r in rows])
    return StepPlan(ti2i, (int(keys[b][0]), int(keys[b][1])), rows, text_rows)


def fetch_batch(index: LatentIndex, latent_rows, text_rows, max_text_len: int, with_ref: bool,
                _cache: dict = {}) -> dict[str, torch.Tensor]:  # noqa: B006 - per-process dataset handle cache
    """Lance ``take`` of the rows -> tensors: latent [B, C, h, w], text [B, L, D], text_mask [B, L],
    and ref [B, C_ref, h, w] for TI2I."""
    key = (index.latents_uri, index.latents_version, index.text_uri, index.text_version)
    if key not in _cache:
        _cache[key] = (lance.dataset(index.latents_uri, version=index.latents_version),
                       lance.dataset(index.text_uri, version=index.text_version))
    lat_ds, txt_ds = _cache[key]
    cols = ["latent", "latent_shape"] + (["ref_latent"] if with_ref else [])
    lat = lat_ds.take(list(map(int, latent_rows)), columns=cols).to_pydict()
    txt = txt_ds.take(list(map(int, text_rows)), columns=["states", "length"]).to_pydict()
    x = torch.from_numpy(np.stack([from_bytes(b, s) for b, s in zip(lat["latent"], lat["latent_shape"], strict=True)]).astype(np.float32))
    out = {"latent": x}
    if with_ref:
        c, h, w = lat["latent_shape"][0]
        sem = int(index.meta.get("semantic_channels", 0))
        refs = [from_bytes(b, (c - sem, h, w)) for b in lat["ref_latent"]]
        out["ref"] = torch.from_numpy(np.stack(refs).astype(np.float32))
    out["text"], out["text_mask"] = pad_states(txt["states"], txt["length"], index.meta["text_dim"], max_text_len)
    return out


def pad_states(blobs, lengths, dim: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    arrs = [from_bytes(b, (n, dim))[:max_len] for b, n in zip(blobs, lengths, strict=True)]
    L = max(a.shape[0] for a in arrs)
    text = np.zeros((len(arrs), L, dim), dtype=np.float32)
    mask = np.zeros((len(arrs), L), dtype=bool)
    for i, a in enumerate(arrs):
        text[i, : a.shape[0]], mask[i, : a.shape[0]] = a, True
    return torch.from_numpy(text), torch.from_numpy(mask)


def null_text(index: LatentIndex, max_text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    txt = lance.dataset(index.text_uri, version=index.text_version).take([index.null_row], columns=["states", "length"]).to_pydict()
    return pad_states(txt["states"], txt["length"], index.meta["text_dim"], max_text_len)
