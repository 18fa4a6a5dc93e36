"""Global semantic dedup over stored embeddings, SemDeDup-style (Abbas et al. 2023).

1. **Cluster** (driver): spherical k-means (faiss) into ``sqrt(n_clusters)`` coarse clusters,
   trained on a sample, every row assigned; linear in rows.
2. **Per coarse cluster, one Ray task**: k-means again into its share of the ``n_clusters`` final
   clusters (so no step compares every row with every centroid: time grows ~linearly with rows at
   a fixed cluster size), then within each final cluster the pairwise cosine similarities in
   blocked matmuls (a block of rows x the cluster's survivors; never n x n, never m x m).
   At both levels a row near a boundary (``BOUNDARY_MARGIN``) is also placed in its second-nearest
   cluster, so near copies that k-means splits still meet (SemDeDup proper loses those).
3. **Near duplicates** are pairs at cosine >= 1 - eps. **Which rows survive** is decided greedily
   in the configured ranking order (best first; ids break ties): a row survives unless it is a near
   duplicate of an earlier *survivor*; then it is rejected with ``semdup_of`` = the best-ranked such
   survivor and the similarity to it. So every rejected row points at a kept row it is itself
   near (no chains through rejected rows), no two kept rows of a cluster are near duplicates, and a
   row linked to a survivor only through a rejected row stays (it is no copy of anything kept).
   SemDeDup proper drops a row near *any* earlier row, survivor or not, which drops such chains.

Each cluster's greedy pass returns *claims* (row, survivor, similarity); the driver applies the
same rule across clusters (a row claimed only by rows rejected elsewhere survives). Copies farther
apart than the margin across a boundary are still missed; the tests measure recall on planted ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.typed_config import ConfigError

from .config import SemDedupRule

DEFAULT_CLUSTER_SIZE = 1000
"""Mean rows per final cluster when ``n_clusters`` is not given (within-cluster cost ~ rows x this)."""
BOUNDARY_MARGIN = 0.03
"""A row whose cosine to its second-nearest centroid is within this of the nearest one is also
compared in that second cluster (at both levels): near copies split by a boundary still meet."""
_BLOCK = 1024  # rows per matmul block: block x survivors floats at a time
_SEED = 1234
_TOL = 1e-5  # float16-stored copies of one vector must count as identical at eps = 0


@dataclass
class SemDedupResult:
    keep: np.ndarray  # bool (n,)
    semdup_of: np.ndarray  # object (n,): survivor id for rejected rows, None for kept ones
    similarity: np.ndarray  # float32 (n,): cosine to the survivor, NaN for kept rows
    cluster: np.ndarray  # int64 (n,): final k-means cluster, -1 where the embedding was missing
    n_clusters: int


def semantic_dedup(ids, embeddings, rank_keys: Sequence = (), eps: float = 0.05,
                   n_clusters: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep mask, semdup_of, similarity) for ``ids`` (n,) and ``embeddings`` (n, d) (float16 or
    float32; rows are L2-normalised here; a row of NaN is "no embedding" and is kept).

    ``rank_keys``: arrays of length n, best first, deciding the survivor of a group: numeric arrays
    rank higher values first (NaN last), string arrays rank smaller values first; ``ids`` ascending
    breaks the remaining ties. ``n_clusters``: final k-means clusters (default n / 1000)."""
    r = run(ids, embeddings, rank_keys, eps, n_clusters)
    return r.keep, r.semdup_of, r.similarity


def rank_order(ids: np.ndarray, rank_keys: Sequence) -> np.ndarray:
    """Position of every row in the survivor ranking (0 = best)."""
    keys = [np.unique(np.asarray(ids, dtype=object).astype(str), return_inverse=True)[1]]  # last tie-break
    for k in reversed(list(rank_keys)):
        a = np.asarray(k)
        if a.dtype.kind in "biuf":
            a = a.astype(np.float64)
            keys.append(-np.where(np.isnan(a), -np.inf, a))  # higher first, NaN last
        else:
            keys.append(np.unique(a.astype(str), return_inverse=True)[1])
    order = np.lexsort(keys)  # lexsort's primary key is the last one
    pos = np.empty(len(order), np.int64)
    pos[order] = np.arange(len(order))
    return pos


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _kmeans(x: np.ndarray, k: int, threads: int | None = None):
    """Spherical k-means of the normalised rows ``x`` trained on a sample (deterministic: fixed
    seed); returns the faiss index of its centroids (inner product), None for k <= 1."""
    import faiss

    if k <= 1:
        return None
    if threads:
        faiss.omp_set_num_threads(threads)
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=15, seed=_SEED, spherical=True, max_points_per_centroid=128,
                      verbose=False)
    rng = np.random.default_rng(_SEED)
    sample = x if len(x) <= 128 * k else x[np.sort(rng.choice(len(x), 128 * k, replace=False))]
    km.train(np.ascontiguousarray(sample))
    return km.index


def _assign(index, x: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid, second-nearest centroid or -1) per row: the second where the row lies
    within ``margin`` (cosine) of the boundary, so near copies split by it still meet there."""
    if index is None:
        return np.zeros(len(x), np.int64), np.full(len(x), -1, np.int64)
    first = np.empty(len(x), np.int64)
    second = np.full(len(x), -1, np.int64)
    kk = 2 if index.ntotal > 1 else 1
    for i in range(0, len(x), 65536):
        d, lab = index.search(np.ascontiguousarray(x[i:i + 65536], np.float32), kk)
        first[i:i + 65536] = lab[:, 0]
        if kk == 2:
            second[i:i + 65536] = np.where(d[:, 0] - d[:, 1] <= margin, lab[:, 1], -1)
    return first, second


def dedup_cluster(e: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy survivors of one cluster whose normalised rows ``e`` are in ranking order (best first).
    Returns (absorbed_by: position of the survivor or -1, similarity to it)."""
    m = len(e)
    by = np.full(m, -1, np.int64)
    sim = np.zeros(m, np.float32)
    surv = np.empty((m, e.shape[1]), np.float32)  # survivors' rows so far, in ranking order
    surv_pos = np.empty(m, np.int64)
    n_surv = 0
    for s in range(0, m, _BLOCK):
        b = e[s:s + _BLOCK]
        gone = np.zeros(len(b), bool)
        if n_surv:  # against the survivors of earlier (better-ranked) blocks
            sv = b @ surv[:n_surv].T
            hit = sv >= threshold
            gone = hit.any(1)
            first = hit.argmax(1)  # the best-ranked survivor it is near
            rows = np.flatnonzero(gone)
            by[s + rows] = surv_pos[first[rows]]
            sim[s + rows] = sv[rows, first[rows]]
        # Within the block, in order: only rows with a later near row need the sequential pass.
        sb = b @ b.T
        near = np.triu(sb >= threshold, 1)
        for i in np.flatnonzero(near.any(1)):
            if gone[i]:
                continue
            js = np.flatnonzero(near[i] & ~gone)
            gone[js] = True
            by[s + js] = s + i
            sim[s + js] = sb[i, js]
        keep = np.flatnonzero(~gone)
        surv[n_surv:n_surv + len(keep)] = b[keep]
        surv_pos[n_surv:n_surv + len(keep)] = s + keep
        n_surv += len(keep)
    return by, sim


def _coarse_task(emb, members: np.ndarray, guests: np.ndarray, rank_pos: np.ndarray, k: int,
                 threshold: float, margin: float):
    """One coarse cluster: its rows (``members``) and the boundary rows of neighbouring clusters
    (``guests``) are split into ``k`` sub-clusters (trained on members only; boundary rows go to
    their two nearest), then the greedy rule runs in every sub-cluster. Returns the members'
    sub-cluster labels and the claims (row, survivor row, similarity) the driver resolves."""
    rows = np.concatenate([members, guests])
    x = _normalise(emb[rows])
    first, second = _assign(_kmeans(x[:len(members)], k, threads=1), x, margin)
    inst_row = np.concatenate([np.arange(len(rows)), np.flatnonzero(second >= 0)])
    inst_sub = np.concatenate([first, second[second >= 0]])
    order = np.lexsort((rank_pos[rows[inst_row]], inst_sub))  # by sub-cluster, then global ranking
    claims = []
    for part in np.split(order, np.flatnonzero(np.diff(inst_sub[order])) + 1):
        local = inst_row[part]
        by, s = dedup_cluster(x[local], threshold)
        hit = by >= 0
        claims.append((rows[local[hit]], rows[local[by[hit]]], s[hit]))
    a, b, s = (np.concatenate(c) for c in zip(*claims, strict=True))
    return first[:len(members)], a, b, s


def _resolve(claims: tuple[np.ndarray, np.ndarray, np.ndarray], rank_pos: np.ndarray, n: int):
    """Apply the greedy rule across clusters: in ranking order, a claimed row is rejected in favour
    of the best-ranked claimant that is itself kept; a row whose claimants were all rejected
    elsewhere survives. Returns (keep, survivor row or -1, similarity)."""
    row, by, sim = claims
    keep = np.ones(n, bool)
    of = np.full(n, -1, np.int64)
    best = np.full(n, np.nan, np.float32)
    order = np.lexsort((rank_pos[by], rank_pos[row]))  # claimed rows in ranking order, best claimant first
    row, by, sim = row[order], by[order], sim[order]
    # A survivor always ranks above the rows it claims, so its own fate is settled before theirs.
    for r, b, s in zip(row.tolist(), by.tolist(), sim.tolist(), strict=True):
        if keep[r] and keep[b] and of[r] < 0:
            keep[r], of[r], best[r] = False, b, s
    return keep, of, best


def run(ids, embeddings, rank_keys: Sequence = (), eps: float = 0.05, n_clusters: int | None = None,
        num_cpus: int | None = None, progress: bool = False) -> SemDedupResult:
    """:func:`semantic_dedup` with the cluster of every row (what the standalone job stores)."""
    import ray

    ids = np.asarray(ids, dtype=object)
    emb = np.asarray(embeddings)
    n = len(ids)
    if emb.ndim != 2 or len(emb) != n:
        raise ValueError(f"embeddings must be (n={n}, d), got shape {emb.shape}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if emb.dtype not in (np.float16, np.float32):
        emb = emb.astype(np.float32)
    valid = ~np.isnan(emb).any(1) if emb.dtype.kind == "f" else np.ones(n, bool)
    rows = np.flatnonzero(valid)
    k_total = max(1, n_clusters or math.ceil(len(rows) / DEFAULT_CLUSTER_SIZE))
    keep = np.ones(n, bool)
    semdup_of = np.full(n, None, dtype=object)
    similarity = np.full(n, np.nan, np.float32)
    cluster = np.full(n, -1, np.int64)
    if len(rows) < 2:
        cluster[rows] = 0
        return SemDedupResult(keep, semdup_of, similarity, cluster, 1)
    rank_pos = rank_order(ids, rank_keys)

    # Coarse level in the driver: k-means on a sample, every row assigned (chunks, normalised).
    k_coarse = max(1, min(k_total, round(math.sqrt(k_total))))
    margin = BOUNDARY_MARGIN
    index = _kmeans(_normalise(emb[rows[np.sort(np.random.default_rng(_SEED).choice(
        len(rows), min(len(rows), 128 * k_coarse), replace=False))]]), k_coarse)
    first, second = np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    for i in range(0, len(rows), 65536):
        x = _normalise(emb[rows[i:i + 65536]])
        first[i:i + 65536], second[i:i + 65536] = _assign(index, x, margin)
    k_coarse = int(first.max()) + 1
    groups = [(rows[first == c], rows[second == c]) for c in range(k_coarse)]
    groups = [g for g in groups if len(g[0])]
    subs = [max(1, round(k_total * len(m) / len(rows))) for m, _ in groups]

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    task = ray.remote(num_cpus=1)(_coarse_task)
    emb_ref, rank_ref = ray.put(emb), ray.put(rank_pos)  # one copy each in the object store (zero-copy reads)
    threshold = 1.0 - eps - _TOL
    futures = [task.remote(emb_ref, m, g, rank_ref, k, threshold, margin) for (m, g), k in zip(groups, subs, strict=True)]
    offsets = np.concatenate([[0], np.cumsum(subs)])
    where = {f: i for i, f in enumerate(futures)}
    pending, done_rows, claims = list(futures), 0, []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        i = where[ready[0]]
        sub, *claim = ray.get(ready[0])
        cluster[groups[i][0]] = offsets[i] + sub
        claims.append(claim)
        done_rows += len(groups[i][0])
        if progress:
            print(f"[semdedup] {len(futures) - len(pending)}/{len(futures)} coarse clusters done "
                  f"({done_rows}/{len(rows)} rows)", flush=True)
    keep, of, sim = _resolve(tuple(np.concatenate(c) for c in zip(*claims, strict=True)), rank_pos, n)
    semdup_of[~keep] = ids[of[~keep]]
    similarity[~keep] = sim[~keep]
    offset = int(offsets[-1])
    return SemDedupResult(keep, semdup_of, similarity, cluster, offset)


# --------------------------------------------------------------------------- standalone job
@dataclass(frozen=True, kw_only=True)
class SemDedupJobConfig:
    """``jobs/semantic_dedup.py``: global semantic dedup of any Lance table with ``id`` + an embedding."""

    embedding_column: str = "clip_embedding"
    """Fixed-size list column of image embeddings (any width; null = no embedding, row kept)."""
    filter: str | None = None
    """Lance SQL filter on the input rows to dedup, e.g. ``keep = true`` for a stage's kept rows;
    null = every row. Rows outside it are not in the output."""
    dedup: SemDedupRule = field(default_factory=SemDedupRule)
    """eps, n_clusters and the survivor ranking: the same rule the stage filter uses."""
    batch_rows: int = 65536
    """Rows per Arrow batch while reading the input."""


# The output table: one row per input id (the one definition, for the job and its readers).
OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False, metadata={b"doc": b"the input row's id"}),
    pa.field("keep", pa.bool_(), metadata={b"doc": b"false for a near copy of a kept row"}),
    pa.field("reject_reason", pa.string(), metadata={b"doc": b"'semdup' when rejected, else null"}),
    pa.field("semdup_of", pa.string(), metadata={b"doc": b"id of the kept survivor this row is a near copy of"}),
    pa.field("semdup_similarity", pa.float32(), metadata={b"doc": b"cosine similarity to that survivor"}),
    pa.field("semdup_cluster", pa.int32(), metadata={b"doc": b"k-means cluster; null without an embedding"}),
    pa.field("config_hash", pa.string(), metadata={b"doc": b"hash of the SemDedupJobConfig that decided"}),
    pa.field("input_uri", pa.string(), metadata={b"doc": b"the table the embeddings were read from"}),
    pa.field("input_version", pa.int64(), metadata={b"doc": b"its Lance version (pinned while reading)"}),
])


def load_job_config(path: str | None, overrides: dict | None = None) -> SemDedupJobConfig:
    """YAML (optional) + dotted overrides -> a checked config; errors name the field."""
    from common.typed_config import build, read_yaml, set_dotted

    data = read_yaml(path) if path else {}
    for k, v in (overrides or {}).items():
        set_dotted(data, k, v)
    cfg = build(SemDedupJobConfig, data)
    if not 0.0 <= cfg.dedup.eps < 1.0:
        raise ConfigError(f"dedup.eps: must be in [0, 1), got {cfg.dedup.eps}")
    if cfg.dedup.n_clusters is not None and cfg.dedup.n_clusters < 1:
        raise ConfigError(f"dedup.n_clusters: must be >= 1 or null, got {cfg.dedup.n_clusters}")
    if cfg.batch_rows < 1:
        raise ConfigError(f"batch_rows: must be >= 1, got {cfg.batch_rows}")
    return cfg


def config_hash(cfg: SemDedupJobConfig) -> str:
    return hashlib.sha1(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _storage_options(uri: str) -> dict | None:
    try:
        from common.storage import storage_options
    except ImportError:  # object-store settings come with common.storage; local paths need none
        return None
    return storage_options(uri)


def _open(uri: str, flag: str, version: int | None = None):
    try:
        return lance.dataset(uri, version=version, storage_options=_storage_options(uri))
    except (ValueError, OSError, FileNotFoundError):
        raise ConfigError(f"{flag}: no Lance table at {uri}") from None


def read_embeddings(uri: str, cfg: SemDedupJobConfig, progress: bool = True):
    """(ids, embeddings float16 (n, d) with NaN rows for nulls, rank key arrays, used rank names,
    version) of the rows of ``uri`` selected by ``cfg.filter``; only the needed columns are read."""
    ds = _open(uri, "--input")
    names = ds.schema.names
    col = cfg.embedding_column
    if "id" not in names:
        raise ConfigError(f"--input: {uri} has no 'id' column")
    if col not in names:
        raise ConfigError(f"--embedding-column: no column '{col}' in {uri} (columns: {', '.join(names)})")
    typ = ds.schema.field(col).type
    if not pa.types.is_fixed_size_list(typ) or not pa.types.is_floating(typ.value_type):
        raise ConfigError(f"--embedding-column: '{col}' must be a fixed-size list of floats, got {typ}")
    dim = typ.list_size
    rank_cols = {k: k for k in cfg.dedup.rank if k in names and k != "id"}
    if "pixels" in cfg.dedup.rank and "pixels" not in names and {"width", "height"} <= set(names):
        rank_cols["pixels"] = None  # width * height
    missing = [k for k in cfg.dedup.rank if k != "id" and k not in rank_cols]
    if missing and progress:
        print(f"[semdedup] ranking keys not in the input, ignored: {', '.join(missing)}", flush=True)
    read = ["id", col] + [c for c in rank_cols.values() if c] + (
        ["width", "height"] if "pixels" in rank_cols and rank_cols["pixels"] is None else [])
    try:
        n = ds.count_rows(filter=cfg.filter) if cfg.filter else ds.count_rows()
        scanner = ds.scanner(columns=list(dict.fromkeys(read)), filter=cfg.filter, batch_size=cfg.batch_rows)
    except Exception as e:  # noqa: BLE001 - Lance's SQL parser error: the user's filter is at fault
        raise ConfigError(f"filter: cannot apply {cfg.filter!r} to {uri}: {str(e).splitlines()[0][:200]}") from None
    ids = np.empty(n, dtype=object)
    emb = np.full((n, dim), np.nan, np.float16)
    keys = {k: np.full(n, np.nan) for k in rank_cols}
    i = 0
    for batch in scanner.to_batches():
        m = batch.num_rows
        ids[i:i + m] = batch.column("id").to_numpy(zero_copy_only=False)
        e = batch.column(col)
        valid = e.is_valid().to_numpy(zero_copy_only=False)
        emb[i:i + m][valid] = e.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        for k, c in rank_cols.items():
            if c:
                keys[k][i:i + m] = batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
            else:
                w = batch.column("width").to_numpy(zero_copy_only=False).astype(np.float64)
                keys[k][i:i + m] = w * batch.column("height").to_numpy(zero_copy_only=False).astype(np.float64)
        i += m
        if progress:
            print(f"[semdedup] read {i}/{n} rows", flush=True)
    ranked = [k for k in cfg.dedup.rank if k in keys]
    return ids[:i], emb[:i], [keys[k][:i] for k in ranked], ranked, ds.version


@dataclass
class JobSummary:
    output: str
    version: int
    rows: int
    rejected: int
    no_embedding: int
    clusters: int
    seconds: float
    reused: bool

    def text(self) -> str:
        head = "up to date (same input version and config): nothing recomputed\n" if self.reused else ""
        return (f"{head}output {self.output} (version {self.version}): {self.rows} rows, "
                f"{self.rows - self.rejected} kept, {self.rejected} rejected as semdup "
                f"({100.0 * self.rejected / max(1, self.rows):.1f}%), {self.no_embedding} without an embedding "
                f"(kept); {self.clusters} clusters; {self.seconds:.1f}s")


def _summary_of(ds, output: str, t0: float, reused: bool) -> JobSummary:
    t = ds.to_table(columns=["keep", "semdup_cluster"])
    keep = t.column("keep").to_numpy(zero_copy_only=False)
    cl = t.column("semdup_cluster")
    clusters = pc.count_distinct(cl).as_py() if t.num_rows else 0
    return JobSummary(output, ds.version, t.num_rows, int((~keep).sum()), cl.null_count, clusters,
                      time.time() - t0, reused)


def run_job(input_uri: str, output: str, cfg: SemDedupJobConfig, progress: bool = True,
            num_cpus: int | None = None) -> JobSummary:
    """Read the embeddings, dedup, write one row per input id in one Lance commit. A rerun with the
    same input version and config finds the table complete and returns it unchanged; after a kill
    (nothing committed) or with a new config or input version it recomputes and overwrites, so the
    table never holds duplicates or a mix of runs."""
    t0 = time.time()
    h = config_hash(cfg)
    src = _open(input_uri, "--input")
    prior = None
    try:
        prior = lance.dataset(output, storage_options=_storage_options(output))
    except (ValueError, OSError, FileNotFoundError):
        if os.path.exists(output) and os.listdir(output):
            raise ConfigError(f"--output: {output} exists and is not a Lance table") from None
    if prior is not None:
        if not set(OUTPUT_SCHEMA.names) <= set(prior.schema.names):
            raise ConfigError(f"--output: {output} holds another table (not a semantic dedup output); "
                              "choose another --output")
        meta = prior.schema.metadata or {}
        same = (meta.get(b"config_hash") == h.encode() and meta.get(b"input_uri") == input_uri.encode()
                and meta.get(b"input_version") == str(src.version).encode())
        n_in = src.count_rows(filter=cfg.filter) if cfg.filter else src.count_rows()
        if same and prior.count_rows() == n_in:
            return _summary_of(prior, output, t0, reused=True)
    ids, emb, keys, _, version = read_embeddings(input_uri, cfg, progress)
    if len(np.unique(ids.astype(str))) != len(ids):
        raise ConfigError(f"--input: {input_uri} has duplicate ids; dedup needs one row per id")
    r = run(ids, emb, keys, cfg.dedup.eps, cfg.dedup.n_clusters, num_cpus=num_cpus, progress=progress)
    n = len(ids)
    table = pa.table({
        "id": pa.array(ids.astype(str), pa.string()),
        "keep": pa.array(r.keep),
        "reject_reason": pa.array(np.where(r.keep, None, "semdup"), pa.string()),
        "semdup_of": pa.array(r.semdup_of, pa.string()),
        "semdup_similarity": pa.array(r.similarity, pa.float32(), mask=np.isnan(r.similarity)),
        "semdup_cluster": pa.array(r.cluster.astype(np.int32), pa.int32(), mask=r.cluster < 0),
        "config_hash": pa.array([h] * n, pa.string()),
        "input_uri": pa.array([input_uri] * n, pa.string()),
        "input_version": pa.array(np.full(n, version, np.int64)),
    }, schema=OUTPUT_SCHEMA)
    meta = {b"config_hash": h.encode(), b"input_uri": input_uri.encode(), b"input_version": str(version).encode(),
            b"config": json.dumps(dataclasses.asdict(cfg)).encode()}
    table = table.replace_schema_metadata(meta)
    ds = lance.write_dataset(table, output, mode="overwrite" if prior is not None else "create",
                             storage_options=_storage_options(output))
    return _summary_of(ds, output, t0, reused=False)
