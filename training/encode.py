"""Ray Data pipelines that turn the curated (and optionally captioned) Lance tables into the trainer's
latent cache (``training/latents_schema.py``).

Two independent pipelines, so no work is done twice and neither holds the other's outputs:

* images: curated rows with ``keep`` -> decode JPEG, resize/crop to the nearest aspect bucket -> VAE
  latent (+ SeFi semantic channels) on an actor pool -> ``latents.lance``;
* text: every caption variant of every kept row (the captions table, ``captioning/schema.py``, read
  and rendered by ``captioning.schema.caption_variants``: general short/medium/dense, text,
  knowledge, structured, each en/zh; plus the curated alt text) and one empty prompt ->
  condition-encoder states on an actor pool -> ``text.lance``. Rows whose captioning failed (or
  that were not captioned) have only their alt text; the summary counts them.

Each table is written by one ``write_lance`` commit (workers write fragments, the driver commits
once), so a killed job leaves the previous table untouched and a rerun rewrites it whole: no lost and
no duplicated rows. A rerun with the same sources, versions and settings finds the recorded
provenance and skips the table.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from dataclasses import asdict, dataclass

import lance
import numpy as np
import pyarrow as pa
import torch

from captioning.schema import SCHEMA as CAPTIONS_SCHEMA
from captioning.schema import TRAINING_COLUMNS
from training.conditioning import edit_instructions_dataset, reads_images
from training.data import bucket_table, image_variants, nearest_bucket, resize_to_bucket
from training.encoders import VAE, SemanticEncoder, TextEncoder
from training.latents_schema import latent_schema, read_metadata, text_schema, to_bytes
from training.sefi import compute_semantic_stats, store_semantic_stats


@dataclass(frozen=True, kw_only=True)
class EncodeSettings:
    curated: str
    out: str
    vae: str
    text_encoder: str
    resolution: int
    captions: str | None = None
    edit_pairs: str | None = None
    semantic_encoder: str | None = None
    semantic_channels: int = 0
    bucket_multiple: int = 32
    text_layer: int = -1
    max_text_len: int = 512
    batch_size: int = 16
    concurrency: int = 1
    device: str = "cpu"
    limit: int | None = None


class ImageEncoder:
    """Actor: loads the VAE (and semantic encoder) once, then encodes batches bucket by bucket."""

    def __init__(self, s: EncodeSettings, curated_version: int):
        self.s = s
        # The curated image column is a Lance blob column: read through take_blobs by row address.
        self.curated = lance.dataset(s.curated, version=curated_version)
        self.vae = VAE.load(s.vae, device=s.device)
        self.sem = SemanticEncoder.load(s.semantic_encoder, s.semantic_channels, device=s.device) if s.semantic_encoder else None
        self.buckets = bucket_table(s.resolution, s.bucket_multiple)

    def _load(self, blob):
        from PIL import Image

        with blob as f:
            img = Image.open(io.BytesIO(f.readall()))
            img.load()
        return img

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows (id, _rowaddr[, ref_id, ref_addr]) -> latent rows. A TI2I pair's reference image is
        resized to the target's bucket so a batch shares one shape."""
        n = batch.num_rows
        blobs = self.curated.take_blobs("image", addresses=batch.column("_rowaddr"))
        ref_addr = batch.column("ref_addr").to_pylist() if "ref_addr" in batch.column_names else [None] * n
        has_ref = [i for i in range(n) if ref_addr[i] is not None]
        ref_blobs: list = [None] * n
        for i, b in zip(has_ref, self.curated.take_blobs("image", addresses=[ref_addr[i] for i in has_ref]) if has_ref else [], strict=True):
            ref_blobs[i] = b
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        pixels, refs = {}, {}
        for i in range(n):
            img = self._load(blobs[i])
            b = nearest_bucket(img.width, img.height, self.buckets)
            pixels[i] = resize_to_bucket(img, b)
            if ref_blobs[i] is not None:
                refs[i] = resize_to_bucket(self._load(ref_blobs[i]), b)
            groups[b].append(i)
        ids = batch.column("id").to_pylist()
        ref_ids = batch.column("ref_id").to_pylist() if "ref_id" in batch.column_names else [None] * n
        out: list[dict] = [None] * n  # type: ignore[list-item]
        for (bh, bw), idx in groups.items():
            x = torch.from_numpy(np.stack([pixels[i] for i in idx]))
            z = self.vae.encode(x)
            if self.sem is not None:
                z = torch.cat([z, self.sem.encode(x, grid=z.shape[2:]).to(z)], 1)
            # References carry VAE (texture) channels only: the model conditions on them, never denoises them.
            with_ref = [i for i in idx if i in refs]
            zr = dict(zip(with_ref, self.vae.encode(torch.from_numpy(np.stack([refs[i] for i in with_ref]))), strict=True)) if with_ref else {}
            for j, i in enumerate(idx):
                out[i] = {"id": ids[i], "bucket_h": bh, "bucket_w": bw, "latent_shape": list(z.shape[1:]),
                          "semantic_channels": self.s.semantic_channels if self.sem else 0, "ref_id": ref_ids[i],
                          "latent": to_bytes(z[j].numpy()), "ref_latent": to_bytes(zr[i].numpy()) if i in zr else None}
        return pa.Table.from_pylist(out, schema=latent_schema())


def _no_ref(batch: pa.Table) -> pa.Table:
    return batch.append_column("ref_id", pa.nulls(batch.num_rows, pa.string())).append_column(
        "ref_addr", pa.nulls(batch.num_rows, pa.uint64()))


def _pairs_table(s: EncodeSettings, cur: lance.LanceDataset) -> tuple[pa.Table, pa.Table]:
    """Edit pairs (id = target, source_id, instruction[, lang]) -> rows for ImageEncoder (with row
    addresses of both images) and instruction rows for the text pipeline. A pair's latent row id is
    ``<target>|<source>`` so it never collides with the target's own T2I row."""
    import pyarrow.compute as pc

    pairs = lance.dataset(s.edit_pairs).to_table()
    need = pa.concat_arrays([pairs.column("id").combine_chunks(), pairs.column("source_id").combine_chunks()]).unique()
    found = cur.to_table(columns=["id"], filter=pc.field("id").isin(need) & (pc.field("keep") == True),  # noqa: E712
                         with_row_address=True)
    addr = dict(zip(found.column("id").to_pylist(), found.column("_rowaddr").to_pylist(), strict=True))
    rows, texts = [], []
    langs = pairs.column("lang").to_pylist() if "lang" in pairs.column_names else ["und"] * pairs.num_rows
    for t, src, ins, lg in zip(pairs.column("id").to_pylist(), pairs.column("source_id").to_pylist(),
                               pairs.column("instruction").to_pylist(), langs, strict=True):
        if t in addr and src in addr and ins:
            pid = f"{t}|{src}"
            rows.append({"id": pid, "_rowaddr": addr[t], "ref_id": src, "ref_addr": addr[src]})
            texts.append({"id": pid, "kind": "instruction", "lang": lg or "und", "text": ins})
    rs = pa.schema([("id", pa.string()), ("_rowaddr", pa.uint64()), ("ref_id", pa.string()), ("ref_addr", pa.uint64())])
    ts = pa.schema([("id", pa.string()), ("kind", pa.string()), ("lang", pa.string()), ("text", pa.string())])
    return pa.Table.from_pylist(rows, schema=rs), pa.Table.from_pylist(texts, schema=ts)


class CaptionEncoder:
    """Actor: loads the condition encoder once; encodes (id, kind, lang, text) rows."""

    def __init__(self, s: EncodeSettings):
        self.enc = TextEncoder.load(s.text_encoder, device=s.device, layer=s.text_layer, max_len=s.max_text_len)

    def __call__(self, batch: pa.Table) -> pa.Table:
        states = self.enc.encode(batch.column("text").to_pylist())
        return batch.append_column("length", pa.array([len(a) for a in states], pa.int32())).append_column(
            "states", pa.array([to_bytes(a) for a in states], pa.large_binary()))


def _explode_captions(batch: pa.Table, captions: str | None = None, captions_version: int | None = None) -> pa.Table:
    """Curated (id, caption) rows -> one row per caption variant. The captions table is merged on id
    with a Lance lookup per batch (an ``id IN (...)`` scan that uses a scalar index on ``id`` when the
    captions table has one); Ray Data's hash join needs more CPUs than a small node has."""
    import pyarrow.compute as pc

    ids_b = batch.column("id")
    rows = {}
    if captions:
        cap = lance.dataset(captions, version=captions_version).to_table(columns=list(TRAINING_COLUMNS), filter=pc.field("id").isin(ids_b))
        rows = {r["id"]: r for r in cap.to_pylist()}
    ids, kinds, langs, texts = [], [], [], []
    for i, alt in zip(ids_b.to_pylist(), batch.column("caption").to_pylist(), strict=True):
        for k, lg, t in image_variants(alt, rows.get(i)):
            ids.append(i), kinds.append(k), langs.append(lg), texts.append(t)
    return pa.table({"id": pa.array(ids, pa.string()), "kind": pa.array(kinds, pa.string()),
                     "lang": pa.array(langs, pa.string()), "text": pa.array(texts, pa.string())})


def _provenance(s: EncodeSettings, curated_version: int, captions_version: int | None, text_dim: int,
                latent_channels: int, vae_factor: int) -> dict:
    p = {k: v for k, v in asdict(s).items() if k not in ("out", "batch_size", "concurrency", "device")}
    p.update(curated_version=curated_version, captions_version=captions_version,
             edit_pairs_version=lance.dataset(s.edit_pairs).version if s.edit_pairs else None)
    p.update(text_dim=text_dim, latent_channels=latent_channels, vae_factor=vae_factor)
    return p


def _up_to_date(uri: str, prov: dict) -> bool:
    try:
        md = read_metadata(lance.dataset(uri).schema)
    except Exception:  # noqa: BLE001 - missing or unreadable: rebuild it
        return False
    return all(md.get(k) == v for k, v in prov.items() if k not in ("text_dim", "latent_channels", "vae_factor"))


def _require_table(flag: str, uri: str, columns: set[str], hint: str = "") -> None:
    """The Lance table behind ``flag`` opens and has ``columns``; else a one-line error naming it."""
    try:
        ds = lance.dataset(uri)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{flag}: cannot open Lance table {uri}: {e}") from None
    missing = columns - set(ds.schema.names)
    if missing:
        raise ValueError(f"{flag}: {uri} lacks columns {sorted(missing)}{hint}")


def validate_settings(s: EncodeSettings) -> None:
    """One-line errors naming the flag, before any work."""
    _require_table("--curated", s.curated, {"id", "caption", "keep", "image"}, " (see curation/schema.py)")
    if s.captions:
        _require_table("--captions", s.captions, set(CAPTIONS_SCHEMA.names), " (a captions table from jobs/caption.py, captioning/schema.py; an older one gets the new columns "
                       "when jobs/caption.py runs on it again)")
    if s.edit_pairs:
        _require_table("--edit-pairs", s.edit_pairs, {"id", "source_id", "instruction"})
    if s.resolution % 16 or s.resolution < 32:
        raise ValueError("--resolution: must be a multiple of 16, >= 32")
    if bool(s.semantic_encoder) != (s.semantic_channels > 0):
        raise ValueError("--semantic-channels: set it > 0 exactly when --semantic-encoder is given")


def run_encode(s: EncodeSettings, progress: bool = True) -> dict:
    """Build (or confirm up to date) ``<out>/latents.lance`` and ``<out>/text.lance``; returns a summary."""
    import ray

    validate_settings(s)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    t0 = time.time()
    cur = lance.dataset(s.curated)
    cap_ver = lance.dataset(s.captions).version if s.captions else None
    pair_rows, pair_texts = _pairs_table(s, cur) if s.edit_pairs else (None, None)
    pair_rows = pair_rows if pair_rows is not None and pair_rows.num_rows else None
    lat_uri, txt_uri = f"{s.out}/latents.lance", f"{s.out}/text.lance"
    summary = {"latents": lat_uri, "text": txt_uri, "curated_version": cur.version, "skipped": []}
    base = _provenance(s, cur.version, cap_ver, 0, 0, 0)
    lat_done, txt_done = _up_to_date(lat_uri, base), _up_to_date(txt_uri, base)
    if not (lat_done and txt_done):
        # Load the models once here to learn their shapes (and fail on a bad path before Ray work).
        vae = VAE.load(s.vae)
        enc = TextEncoder.load(s.text_encoder, layer=s.text_layer, max_len=s.max_text_len)
        prov = _provenance(s, cur.version, cap_ver, enc.dim, vae.channels + s.semantic_channels, vae.factor)
        null_states = enc.encode([""])[0]
        del vae, enc

    keep = "keep = true"
    gpus = 1 if s.device.startswith("cuda") else 0  # one GPU per encoder actor
    limit = (lambda d: d.limit(s.limit)) if s.limit else (lambda d: d)
    if lat_done:
        summary["skipped"].append("latents")
    else:
        ds = limit(ray.data.read_lance(s.curated, columns=["id"], filter=keep, version=cur.version,
                                       scanner_options={"with_row_address": True}))
        if pair_rows is not None:
            ds = ds.map_batches(_no_ref, batch_format="pyarrow").union(ray.data.from_arrow(pair_rows))
        ds = ds.map_batches(ImageEncoder, fn_constructor_args=(s, cur.version), batch_size=s.batch_size, batch_format="pyarrow",
                            concurrency=s.concurrency, num_gpus=gpus)
        ds.write_lance(lat_uri, schema=latent_schema(prov), mode="overwrite")
        if s.semantic_channels:  # SeFi: per-channel statistics for the trainer's normalisation (training/sefi.py)
            store_semantic_stats(lat_uri, compute_semantic_stats(lat_uri))
    if txt_done:
        summary["skipped"].append("text")
    else:
        ds = limit(ray.data.read_lance(s.curated, columns=["id", "caption"], filter=keep, version=cur.version))
        ds = ds.map_batches(_explode_captions, batch_format="pyarrow",
                            fn_kwargs={"captions": s.captions, "captions_version": cap_ver})
        # Edit instructions are read with their source image by a VLM encoder (report §3.2,
        # training/conditioning.py); a text-only encoder reads them as plain text.
        with_image = pair_texts is not None and pair_texts.num_rows and reads_images(s.text_encoder)
        if pair_texts is not None and pair_texts.num_rows and not with_image:
            ds = ds.union(ray.data.from_arrow(pair_texts))
        ds = ds.map_batches(CaptionEncoder, fn_constructor_args=(s,), batch_size=s.batch_size, batch_format="pyarrow",
                            concurrency=s.concurrency, num_gpus=gpus)
        if with_image:
            ds = ds.union(edit_instructions_dataset(s, cur.version, pair_texts, pair_rows, gpus))
        null = pa.table({"id": [""], "kind": ["null"], "lang": ["und"], "text": [""], "length": pa.array([len(null_states)], pa.int32()),
                         "states": pa.array([to_bytes(null_states)], pa.large_binary())})
        ds = ds.union(ray.data.from_arrow(null))
        ds.write_lance(txt_uri, schema=text_schema(prov), mode="overwrite")
    lat, txt = lance.dataset(lat_uri), lance.dataset(txt_uri)
    summary.update(images=lat.count_rows(), captions=txt.count_rows() - 1,
                   edit_pairs=0 if pair_rows is None else pair_rows.num_rows, latents_version=lat.version,
                   text_version=txt.version, **caption_counts(lat, txt, s.captions and lance.dataset(s.captions, version=cap_ver)),
                   seconds=round(time.time() - t0, 1))
    return summary


def caption_counts(lat: lance.LanceDataset, txt: lance.LanceDataset, cap: lance.LanceDataset | None) -> dict:
    """What reached the text table: variants per kind/lang; the T2I images by captioning outcome
    (``captioned``: caption variants encoded; ``failed``: captioning failed; ``missing``: not in the
    captions table); ``alt_text_fallback``: failed or missing images that train on their alt text;
    ``no_text``: images with neither, which T2I never draws."""
    import duckdb

    con = duckdb.connect()
    con.register("lat", lat.to_table(columns=["id"], filter="ref_id IS NULL"))
    con.register("txt", txt.to_table(columns=["id", "kind", "lang"]))
    con.register("cap", cap.to_table(columns=["id", "caption_status"]) if cap is not None
                 else pa.table({"id": pa.array([], pa.string()), "caption_status": pa.array([], pa.string())}))
    variants = con.sql("SELECT kind || '/' || lang, count(*) FROM txt WHERE kind <> 'null' GROUP BY 1 ORDER BY 1").fetchall()
    outcome = con.sql("""
        WITH per AS (
            SELECT l.id, any_value(c.caption_status) AS status,
                   count(t.kind) FILTER (WHERE t.kind <> 'alt') AS captions, count(t.kind) FILTER (WHERE t.kind = 'alt') AS alt
            FROM lat l LEFT JOIN cap c USING (id) LEFT JOIN txt t USING (id) GROUP BY l.id)
        SELECT CASE WHEN captions > 0 THEN 'captioned' WHEN status IS NULL THEN 'missing' ELSE 'failed' END,
               count(*), count(*) FILTER (WHERE captions = 0 AND alt > 0), count(*) FILTER (WHERE captions = 0 AND alt = 0)
        FROM per GROUP BY 1""").fetchall()
    by_outcome = dict.fromkeys(("captioned", "failed", "missing"), 0) | {o: n for o, n, _, _ in outcome}
    return {"caption_variants": dict(variants), "images_by_caption": by_outcome,
            "alt_text_fallback": sum(f for _, _, f, _ in outcome), "no_text": sum(x for _, _, _, x in outcome)}
