"""Keep/reject decisions from stored scores — the final pass of every stage's run and all of
``--rethreshold``. Arrow/numpy over the score columns; no image is decoded, no model runs.

The chain order is the stage's (``cfg.filters``): the first failing filter is the ``reject_reason``.
A null score means "not computed" (skipped filter, no caption) and passes its rule. The pass streams
the table twice, a fragment's batch at a time, so only the *global* filters' compact inputs are ever
held for all rows:

1. per batch, every local rule (vectorised) gives each row's first failing position; each global
   filter (dedup, semdedup, balance) collects its inputs for the rows that reach it (no earlier
   failure, not skipped, the needed score present). Then, in chain order, each global filter decides
   over its candidates minus rows an earlier global filter rejected.
2. Lance's column add (a UDF per batch, ``_rowaddr`` keyed) recomputes the local rules and writes
   the decision columns; images and scores are never rewritten.
"""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa

from .config import StageConfig
from .filters import FILTERS, Cols
from .schema import DECISION_FIELDS, DECISION_SCHEMA

_BATCH = 65_536


def input_columns(cfg: StageConfig) -> list[str]:
    """Stored columns the stage's rules read."""
    cols = ["id", "skipped"]
    for name in cfg.filters:
        f = FILTERS[name]
        cols += f.columns + f.reads + f.candidates
    return list(dict.fromkeys(cols))


def _skip_masks(v: Cols, chain) -> dict[str, np.ndarray]:
    lists = v.t.column("skipped").to_pylist()
    return {name: np.array([name in (s or ()) for s in lists], bool) for name in chain}


def local_pass(v: Cols, cfg: StageConfig) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(first failing chain position of each row by the local rules — len(chain) when none —, the
    ``rotate`` column, the skip masks)."""
    chain, th = cfg.filters, cfg.thresholds
    first = np.full(v.n, len(chain), np.int16)
    rotate = np.zeros(v.n, np.int16)
    skip = _skip_masks(v, chain)
    for p, name in enumerate(chain):
        rule = FILTERS[name].rule
        if rule is None:
            continue
        got = rule(v, getattr(th, FILTERS[name].th(name), None))
        fails, rot = got if isinstance(got, tuple) else (got, None)
        fails = np.asarray(fails, bool) & ~skip[name]
        if rot is not None:
            rotate = np.where(skip[name], 0, rot).astype(np.int16)
        first = np.where((first == len(chain)) & fails, p, first).astype(np.int16)
    return first, rotate, skip


class GlobalRejections:
    """Rows rejected by global filters, keyed by row key (``_rowaddr``): sorted arrays, so the
    second pass looks a batch up with one ``searchsorted``."""

    def __init__(self, keys, reasons, extras: dict[str, np.ndarray]):
        order = np.argsort(keys, kind="stable")
        self.keys, self.reasons = np.asarray(keys)[order], np.asarray(reasons, object)[order]
        self.extras = {k: np.asarray(v, object)[order] for k, v in extras.items()}

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(hit mask, position in the sorted arrays) for ``keys``."""
        if len(self.keys) == 0:
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.int64)
        pos = np.searchsorted(self.keys, keys).clip(0, len(self.keys) - 1)
        return self.keys[pos] == keys, pos


def global_pass(batches, cfg: StageConfig) -> GlobalRejections:
    """Stream ``(key array, record batch)`` pairs once; run the global filters in chain order."""
    chain = cfg.filters
    globals_ = [(p, n) for p, n in enumerate(chain) if FILTERS[n].decide_global is not None]
    got: dict[str, list] = {n: [] for _, n in globals_}
    for keys, rb in batches:
        if not globals_:
            break
        v = Cols(rb)
        first, _, skip = local_pass(v, cfg)
        for p, name in globals_:
            f = FILTERS[name]
            cand = (first > p) & ~skip[name]
            for c in f.candidates:
                cand &= v.valid(c)
            if cand.any():
                sel = np.flatnonzero(cand)
                got[name].append((np.asarray(keys)[sel], f.collect(Cols(rb.take(pa.array(sel))), cfg)))
    rej_keys, rej_reason, extras = [], [], {c: [] for c in ("dup_of", "semdup_of", "semdup_similarity")}
    gone: set | np.ndarray = np.zeros(0, np.uint64)
    for _, name in globals_:
        parts = got.pop(name)
        if not parts:
            continue
        keys = np.concatenate([k for k, _ in parts])
        data = {c: np.concatenate([d[c] for _, d in parts]) for c in parts[0][1]}
        alive = ~np.isin(keys, gone)  # rows an earlier global filter rejected are not candidates
        keys, data = keys[alive], {c: a[alive] for c, a in data.items()}
        rejected, cols = FILTERS[name].decide_global(data, getattr(cfg.thresholds, FILTERS[name].th(name)), cfg)
        rejected = np.asarray(rejected, bool)
        rej_keys.append(keys[rejected])
        rej_reason.append(np.full(int(rejected.sum()), name, object))
        for c in extras:
            vals = cols.get(c)
            extras[c].append(np.asarray(vals, object)[rejected] if vals is not None
                             else np.full(int(rejected.sum()), None, object))
        gone = np.concatenate([gone, keys[rejected]])
    if not rej_keys:
        return GlobalRejections(np.zeros(0, np.uint64), np.zeros(0, object), {c: np.zeros(0, object) for c in extras})
    return GlobalRejections(np.concatenate(rej_keys), np.concatenate(rej_reason),
                            {c: np.concatenate(v) for c, v in extras.items()})


def decision_batch(rb: pa.RecordBatch | pa.Table, keys: np.ndarray, cfg: StageConfig,
                   rejections: GlobalRejections) -> dict[str, pa.Array]:
    """The decision columns of one batch (DECISION_FIELDS order)."""
    v = Cols(rb)
    first, rotate, _ = local_pass(v, cfg)
    chain = np.array(list(cfg.filters) + [None], dtype=object)
    reason = chain[first]
    n = v.n
    extras = {c: np.full(n, None, object) for c in ("dup_of", "semdup_of", "semdup_similarity")}
    hit, pos = rejections.lookup(np.asarray(keys))
    if hit.any():
        reason[hit] = rejections.reasons[pos[hit]]
        for c in extras:
            extras[c][hit] = rejections.extras[c][pos[hit]]
    sim = [None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x) for x in extras["semdup_similarity"]]
    cols = {
        "keep": pa.array(reason == None, pa.bool_()),  # noqa: E711 - elementwise on object array
        "reject_reason": pa.array(reason.tolist(), pa.string()),
        "dup_of": pa.array(extras["dup_of"].tolist(), pa.string()),
        "rotate": pa.array(rotate, pa.int16()),
        "decided_config_hash": pa.array([cfg.threshold_hash()] * n, pa.string()),
        "semdup_of": pa.array(extras["semdup_of"].tolist(), pa.string()),
        "semdup_similarity": pa.array(sim, pa.float32()),
    }
    return {k: cols[k] for k in DECISION_FIELDS}


def decide(scores: pa.Table, cfg: StageConfig) -> pa.Table:
    """``DECISION_SCHEMA`` rows for an in-memory table of stored columns (tests, small tables)."""
    keys = np.arange(scores.num_rows, dtype=np.uint64)
    rej = global_pass([(keys, scores)], cfg)
    cols = decision_batch(scores, keys, cfg, rej)
    return pa.Table.from_arrays([scores.column("id")] + list(cols.values()), schema=DECISION_SCHEMA)


def apply_decisions(uri: str, cfg: StageConfig, storage_options: dict | None = None) -> tuple[dict[str, int], int, int]:
    """Decide from the stored scores and write the decision columns as a new table version.

    Decision columns are replaced with Lance's column add, streamed per batch: only the new
    columns' files are written; images and scores are not rewritten. Idempotent: a pass killed
    half-way is simply run again. Returns (reason counts with ``kept``, rows, version)."""
    ds = lance.dataset(uri, storage_options=storage_options)
    cols = input_columns(cfg)

    def scan():
        for rb in ds.to_batches(columns=cols, with_row_address=True, batch_size=_BATCH):
            yield rb.column("_rowaddr").to_numpy(), rb

    rejections = global_pass(scan(), cfg)
    stale = [c for c in DECISION_FIELDS if c in ds.schema.names]
    if stale:
        ds.drop_columns(stale)
        ds = lance.dataset(uri, storage_options=storage_options)
    out_schema = pa.schema([DECISION_SCHEMA.field(c) for c in DECISION_FIELDS])

    def udf(rb: pa.RecordBatch) -> pa.RecordBatch:
        cols_ = decision_batch(rb, rb.column("_rowaddr").to_numpy(), cfg, rejections)
        return pa.RecordBatch.from_arrays(list(cols_.values()), schema=out_schema)

    if ds.count_rows():
        ds.add_columns(udf, read_columns=cols + ["_rowaddr"], batch_size=_BATCH)
    else:
        ds.add_columns(list(out_schema))
    ds = lance.dataset(uri, storage_options=storage_options)
    return reason_counts(ds), ds.count_rows(), ds.version


def reason_counts(ds) -> dict[str, int]:
    """{reject_reason or "kept": rows} of a decided table."""
    counts: dict[str, int] = {}
    for rb in ds.to_batches(columns=["reject_reason"], batch_size=_BATCH):
        for c in rb.column("reject_reason").fill_null("kept").value_counts().to_pylist():
            counts[c["values"]] = counts.get(c["values"], 0) + c["counts"]
    return counts
