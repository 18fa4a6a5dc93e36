"""Training mixtures (Qwen-Image-2.0 Table 2): per training stage, one Lance table of what the
trainer reads, drawn from curated stage tables — T2I rows (stage 1/4/5/6 tables, synthetic text)
and TI2I pairs (stage-2 tables) at the stage's T2I:TI2I ratio (0.9:0.1 at 256/512 px, 0.7:0.3 at
512-2048 px), each source's share capped by its quota, every row with its lineage.

Deterministic from the seed: within each source, rows are taken in the order of hash(seed, id), so
the same config and input versions give the same table, and a larger ``rows`` is a superset.

Rows (:data:`MIXTURE_SCHEMA`, the one definition, read by ``jobs/encode_latents.py --mixture``):
``task = t2i`` — an image with its caption; ``task = ti2i`` — an edit's target image with its
``instruction`` and ``source_id``, the id of a ``task = ti2i_source`` row holding the source image
(a reference image, never a T2I sample: its caption is null). Every row: ``keep`` (true), ``source``
(tag), ``quota`` (the cap that applied), ``stage_uri`` / ``stage_version`` / ``stage_id`` (lineage).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from common.typed_config import ConfigError, build, read_yaml, set_dotted

from .schema import BLOB_META
from .stage2_schema import PAIR_SCHEMA

# What a mixture reads of a stage-2 table (its one schema module names them).
PAIR_READ_COLUMNS = tuple(c for c in ("id", "keep", "source", "source_short_side", "target_short_side", "image",
                                      "target_image", "instruction_en", "instruction_zh") if c in PAIR_SCHEMA.names)

MIXTURE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("task", pa.string(), metadata={b"doc": b"t2i | ti2i (edit target) | ti2i_source (its reference image)"}),
    pa.field("caption", pa.string(), metadata={b"doc": b"T2I text; null for TI2I images"}),
    pa.field("instruction", pa.string(), metadata={b"doc": b"TI2I: the edit instruction"}),
    pa.field("lang", pa.string(), metadata={b"doc": b"TI2I: en | zh"}),
    pa.field("source_id", pa.string(), metadata={b"doc": b"TI2I: id of the ti2i_source row"}),
    pa.field("source", pa.string(), metadata={b"doc": b"source tag: web, synthetic:text, edit:<name>, ..."}),
    pa.field("quota", pa.float32(), metadata={b"doc": b"the cap on this source's share of its task"}),
    pa.field("stage_uri", pa.string(), metadata={b"doc": b"lineage: the stage table the row came from"}),
    pa.field("stage_version", pa.int64(), metadata={b"doc": b"lineage: that table's Lance version"}),
    pa.field("stage_id", pa.string(), metadata={b"doc": b"lineage: the row's id there"}),
    pa.field("keep", pa.bool_(), metadata={b"doc": b"always true (the curated-table contract readers filter on)"}),
    pa.field("rotate", pa.int16(), metadata={b"doc": b"counter-clockwise turn to apply (from the stage table)"}),
    pa.field("image", pa.large_binary(), metadata=BLOB_META),
])


@dataclass(frozen=True, kw_only=True)
class StageMixture:
    t2i_ratio: float
    """Share of T2I rows; the rest are TI2I pairs (Table 2: 0.9 pre-training, 0.7 after)."""
    min_short_side: int = 0
    """Rows whose (both images') short side is below this are not drawn (the stage's smallest resolution)."""
    rows: int | None = None
    """T2I rows + TI2I pairs wanted; null = as many as the inputs, ratio and quotas allow."""
    t2i: tuple[str, ...] = ()
    """T2I stage tables (Lance URIs: stage 1/4/5/6 outputs, synthetic text); kept rows are drawn."""
    ti2i: tuple[str, ...] = ()
    """Stage-2 edit-pair tables (curation/stage2_schema.py); kept pairs are drawn."""
    quotas: dict[str, float] = field(default_factory=dict)
    """Source tag -> the largest share of its task's rows it may take (0..1); unlisted: 1."""


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    seed: int = 0
    """Draw order within a source is hash(seed, id): deterministic, and stable as inputs grow."""
    stages: dict[int, StageMixture] = field(default_factory=dict)
    """Training stage (1-6, §2.3 / Table 2) -> its mixture."""


def load_mixtures(path: str | None, overrides: dict | None = None) -> MixtureConfig:
    data = read_yaml(path) if path else {}
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    cfg = build(MixtureConfig, data)
    for n, st in cfg.stages.items():
        if not 0.0 <= st.t2i_ratio <= 1.0:
            raise ConfigError(f"stages.{n}.t2i_ratio = {st.t2i_ratio}: expected 0..1")
        for s, q in st.quotas.items():
            if not 0.0 < q <= 1.0:
                raise ConfigError(f"stages.{n}.quotas.{s} = {q}: expected a share in (0, 1]")
        if st.t2i_ratio > 0 and not st.t2i:
            raise ConfigError(f"stages.{n}.t2i: no T2I table for t2i_ratio {st.t2i_ratio}")
        if st.t2i_ratio < 1 and not st.ti2i:
            raise ConfigError(f"stages.{n}.ti2i: no stage-2 pair table for a TI2I share of {1 - st.t2i_ratio:.2f}")
    return cfg


def _hash_order(ids: np.ndarray, seed: int) -> np.ndarray:
    h = [int.from_bytes(hashlib.blake2b(f"{seed}\x00{i}".encode(), digest_size=8).digest()) for i in ids]
    return np.argsort(np.array(h, np.uint64), kind="stable")


def allocate(avail: dict[str, int], quotas: dict[str, float], n: int | None) -> dict[str, int]:
    """Rows per source for ``n`` rows of one task (None: the most the quotas allow): in proportion to
    what each source has, no source above its quota share, water-filled (what a capped source
    cannot take goes to the others). The total drops when quotas cannot be met otherwise."""
    srcs = [s for s in avail if avail[s] > 0]
    cap = lambda s, total: min(avail[s], int(np.floor(quotas.get(s, 1.0) * total + 1e-9)))  # noqa: E731
    total = sum(avail[s] for s in srcs) if n is None else n
    while total > 0 and sum(cap(s, total) for s in srcs) < total:
        total = min(total - 1, sum(cap(s, total) for s in srcs))
    out, left, free = dict.fromkeys(avail, 0), total, list(srcs)
    while left > 0 and free:
        weight = sum(avail[s] - out[s] for s in free)
        give = {s: min(cap(s, total) - out[s], max(1, int(left * (avail[s] - out[s]) / max(1, weight)))) for s in free}
        for s in free:
            g = min(give[s], left)
            out[s], left = out[s] + g, left - g
        free = [s for s in free if out[s] < cap(s, total)]
    return out


def _candidates(uri: str, pairs: bool, min_side: int) -> tuple[pa.Table, int]:
    ds = lance.dataset(uri)
    names = set(ds.schema.names)
    if "keep" not in names or "id" not in names:
        raise ConfigError(f"{uri}: not a curated stage table (no id/keep columns)")
    if pairs and (missing := [c for c in PAIR_READ_COLUMNS if c not in names]):
        raise ConfigError(f"{uri}: not a stage-2 pair table (curation/stage2_schema.py): no {', '.join(missing)}")
    cols = ["id"] + [c for c in ("source", "short_side", "width", "height", "source_short_side", "target_short_side")
                     if c in names]
    t = ds.to_table(columns=cols, filter="keep = true")
    if "source" not in names:  # a table written before stage rows carried a source tag
        t = t.append_column("source", pa.array(["web"] * t.num_rows, pa.string()))
    side = None
    if pairs:
        side = np.minimum(t["source_short_side"].to_numpy(zero_copy_only=False),
                          t["target_short_side"].to_numpy(zero_copy_only=False))
    elif "short_side" in names:
        side = t["short_side"].fill_null(0).to_numpy(zero_copy_only=False)
    elif "width" in names:
        side = np.minimum(t["width"].fill_null(0).to_numpy(zero_copy_only=False),
                          t["height"].fill_null(0).to_numpy(zero_copy_only=False))
    if side is not None and min_side:
        t = t.filter(pa.array(np.asarray(side) >= min_side))
    return t.append_column("stage_uri", pa.array([uri] * t.num_rows, pa.string())), ds.version


def _draw(tables: tuple[str, ...], pairs: bool, st: StageMixture, n: int | None, seed: int):
    parts, versions = [], {}
    for uri in tables:
        t, versions[uri] = _candidates(uri, pairs, st.min_short_side)
        parts.append(t.select(["id", "source", "stage_uri"]))
    t = pa.concat_tables(parts) if parts else pa.table({"id": [], "source": [], "stage_uri": []})
    src = np.asarray(t["source"].to_pylist(), object)
    avail = {s: int((src == s).sum()) for s in dict.fromkeys(src.tolist())}
    alloc = allocate(avail, st.quotas, n)
    picked = []
    for s, k in alloc.items():
        rows = np.flatnonzero(src == s)
        ids = np.asarray(t["id"].to_pylist(), object)[rows]
        picked += rows[_hash_order(ids, seed)[:k]].tolist()
    return t.take(pa.array(sorted(picked), pa.int64())), versions, alloc


def build_mixture(cfg: MixtureConfig, stage: int, output: str, progress: bool = True) -> dict:
    """Write stage ``stage``'s mixture to ``output`` (overwritten: it is a pure function of the
    config, the seed and the input table versions, recorded in the table's metadata)."""
    if stage not in cfg.stages:
        raise ConfigError(f"--stage {stage}: not in the config's stages ({', '.join(map(str, cfg.stages))})")
    st = cfg.stages[stage]
    # Feasible totals per task: the ratio fixes their proportion, the smaller side limits both.
    t2i_tab, t2i_ver, _ = _draw(st.t2i, False, st, None, cfg.seed) if st.t2i_ratio > 0 else (None, {}, {})
    ti2i_tab, ti2i_ver, _ = _draw(st.ti2i, True, st, None, cfg.seed) if st.t2i_ratio < 1 else (None, {}, {})
    n_t2i_max = t2i_tab.num_rows if t2i_tab is not None else 0
    n_ti2i_max = ti2i_tab.num_rows if ti2i_tab is not None else 0
    r = st.t2i_ratio
    total = st.rows if st.rows is not None else int(min(n_t2i_max / r if r > 0 else np.inf,
                                                        n_ti2i_max / (1 - r) if r < 1 else np.inf))
    n_t2i = round(total * r)
    n_ti2i = total - n_t2i
    if n_t2i > n_t2i_max or n_ti2i > n_ti2i_max:
        raise ConfigError(f"stages.{stage}.rows = {total}: the inputs give at most {n_t2i_max} T2I rows and "
                          f"{n_ti2i_max} TI2I pairs under the quotas (ratio {r})")
    t2i, _, a1 = _draw(st.t2i, False, st, n_t2i, cfg.seed) if n_t2i else (None, {}, {})
    ti2i, _, a2 = _draw(st.ti2i, True, st, n_ti2i, cfg.seed) if n_ti2i else (None, {}, {})
    versions = {**t2i_ver, **ti2i_ver}
    schema = MIXTURE_SCHEMA.with_metadata({b"stage": str(stage).encode(), b"seed": str(cfg.seed).encode(),
                                           b"t2i_ratio": str(r).encode(), b"min_short_side": str(st.min_short_side).encode(),
                                           b"inputs": json.dumps(versions, sort_keys=True).encode()})
    writer_batches = _rows(t2i, ti2i, st, versions)
    lance.write_dataset(writer_batches, output, schema=schema, mode="overwrite")
    return {"output": output, "stage": stage, "t2i": n_t2i, "ti2i": n_ti2i, "t2i_by_source": a1,
            "ti2i_by_source": a2, "inputs": versions}


def pairs_mixture(stage2_uri: str, output: str, min_short_side: int = 0, seed: int = 0) -> dict:
    """Every kept pair of a stage-2 table as a TI2I-only mixture (``ti2i`` + ``ti2i_source`` rows,
    lineage included): how ``jobs/encode_latents.py --stage2`` reads edit pairs without a mixture
    config. Rebuilt unless the table there was made from this stage-2 version with the same seed and
    minimum short side (all recorded in its metadata)."""
    version = lance.dataset(stage2_uri).version
    try:
        md = lance.dataset(output).schema.metadata or {}
        recorded = {k: md.get(k.encode()) for k in ("t2i_ratio", "seed", "min_short_side")}
        wanted = {"t2i_ratio": b"0.0", "seed": str(seed).encode(), "min_short_side": str(min_short_side).encode()}
        if json.loads(md.get(b"inputs", b"{}")) == {stage2_uri: version} and recorded == wanted:
            return {"output": output, "reused": True, "inputs": {stage2_uri: version}}
    except (ValueError, OSError):  # no table there yet
        pass
    cfg = MixtureConfig(seed=seed, stages={2: StageMixture(t2i_ratio=0.0, min_short_side=min_short_side,
                                                           ti2i=(stage2_uri,))})
    return build_mixture(cfg, 2, output)


def _rows(t2i: pa.Table | None, ti2i: pa.Table | None, st: StageMixture, versions: dict[str, int]):
    """Record batches of the mixture, one stage table at a time (images fetched with ``take``)."""
    def quota(s):
        return st.quotas.get(s, 1.0)

    for tab, kind in ((t2i, "t2i"), (ti2i, "ti2i")):
        if tab is None:
            continue
        for uri in dict.fromkeys(tab["stage_uri"].to_pylist()):
            ds = lance.dataset(uri, version=versions[uri])
            sel = tab.filter(pa.compute.equal(tab["stage_uri"], uri))
            ids = sel["id"].to_pylist()
            for i in range(0, len(ids), 256):
                chunk = ids[i:i + 256]
                yield _batch(ds, uri, versions[uri], chunk, kind, quota)


def _batch(ds, uri: str, version: int, ids: list[str], kind: str, quota) -> pa.RecordBatch:
    names = set(ds.schema.names)
    img = "image" if "image" in names else "image_bytes"  # the synthetic-text table's (curation/synthetic_schema.py)
    want = ["id", img] + [c for c in ("caption", "source", "rotate", "target_image", "instruction_en",
                                          "instruction_zh") if c in names]
    t = ds.scanner(columns=want, filter=pa.compute.field("id").isin(ids), blob_handling="all_binary").to_table()
    if img != "image":
        t = t.rename_columns(["image" if c == img else c for c in t.column_names])
    recs = []
    for r in t.to_pylist():
        src = r.get("source") or "web"
        base = {"source": src, "quota": quota(src), "stage_uri": uri, "stage_version": version, "stage_id": r["id"],
                "keep": True, "rotate": r.get("rotate") or 0}
        if kind == "t2i":
            recs.append({**base, "id": r["id"], "task": "t2i", "caption": r.get("caption"), "image": r["image"]})
        else:
            en, zh = r.get("instruction_en"), r.get("instruction_zh")
            sid = f"{r['id']}.source"
            recs.append({**base, "id": sid, "task": "ti2i_source", "image": r["image"]})
            recs.append({**base, "id": f"{r['id']}.target", "task": "ti2i", "image": r["target_image"],
                         "instruction": en or zh, "lang": "en" if en else "zh", "source_id": sid})
    return pa.RecordBatch.from_pylist(recs, schema=MIXTURE_SCHEMA)
