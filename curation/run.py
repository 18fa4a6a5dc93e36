"""Driver of a curation run, the same for every stage: resolve the input (any reader input, or a
previous stage's table), plan which filters score and which scores are copied, preflight models,
stream items through the Ray Data scoring stage, commit Lance fragments every ``commit_every`` rows,
then decide from stored scores.

Resume is by construction: every committed row has a stable id, a rerun scores only ids not yet in
the table, and decisions (global dedup included) are made after scoring, from stored scores only,
by the same code as ``--rethreshold`` — so a run killed at any moment and started again ends with
exactly the rows and decisions of an uninterrupted run.

Lineage: a stage whose ``--input`` is a curated table reads that table's kept rows (same ids) and
their stored bytes, pinned at one Lance version, and records ``parent_uri`` / ``parent_version`` in
its own table's metadata (a resumed run reads the same parent version).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field

import lance
import numpy as np
import pyarrow as pa

from common import storage

from .config import ConfigError, StageConfig
from .decide import apply_decisions
from .filters import FILTERS, column_identities, embedding_identity, models_for
from .readers import (
    ITEM_SCHEMA,
    Columns,
    Part,
    Source,
    drop_done,
    expand_unit,
    list_folder,
    pack,
    resolve_input,
    row_ranges,
    work_units,
)
from .schema import EMBEDDING, SCORING_SCHEMA, embed_dim
from .stage import FILE_COLUMNS, PARENT_PREFIX, Plan, StageScorer, needs_actors, preflight, score_task

MAX_BLOCKS = 4096  # work-unit blocks of one run (more units: a task takes several in turn)


@dataclass(frozen=True)
class Parent:
    """A previous stage's curated table used as input, pinned at ``version``."""

    uri: str
    version: int
    meta: dict
    names: tuple[str, ...]
    fragments: tuple[int, ...]
    kept: int
    storage_options: dict | None = None

    @property
    def column_hashes(self) -> dict[str, str]:
        return json.loads(self.meta.get(b"column_hashes", b"{}"))


def open_parent(spec: str, version: int | None = None, storage_options: dict | None = None) -> Parent | None:
    """The curated table at ``spec`` (None when ``spec`` is not one: a folder, tar, Parquet, or a
    Lance table another tool wrote)."""
    if not spec or not spec.rstrip("/").endswith(".lance"):
        return None
    try:
        ds = lance.dataset(spec, version=version, storage_options=storage_options)
    except (ValueError, OSError, FileNotFoundError):
        if version is not None:
            raise ConfigError(f"--input: {spec} has no version {version} (the version this output was "
                              "started from); choose another --output") from None
        return None
    meta = ds.schema.metadata or {}
    if b"stage" not in meta or not {"keep", "id", "image"} <= set(ds.schema.names):
        return None
    kept = ds.count_rows(filter="keep = true")
    if kept == 0:
        raise ConfigError(f"--input: {spec} (version {ds.version}) has no kept rows")
    return Parent(spec, ds.version, meta, tuple(ds.schema.names),
                  tuple(f.fragment_id for f in ds.get_fragments()), kept, storage_options)


def expand_parent(parent: Parent, extra: tuple[str, ...], fragment_id: str, batch_rows: int,
                  part: tuple[int, int] | None = None):
    """Kept rows of one parent fragment (or its kept rows ``part`` = [start, stop) in fragment
    order, :func:`parent_parts`) as items (readers.ITEM_SCHEMA, the stored bytes as ``data``)
    plus ``parent.<column>`` for the columns in ``extra``."""
    ds = lance.dataset(parent.uri, version=parent.version, storage_options=parent.storage_options)
    frag = ds.get_fragment(int(fragment_id))
    cols = ["id", "uri", "caption", "image"] + [c for c in extra if c not in ("id", "uri", "caption", "image")]
    # offset/limit count the rows that pass the filter: [start, stop) of the fragment's kept rows.
    rng = {"offset": part[0], "limit": part[1] - part[0]} if part and part[0] >= 0 else {}
    scan = ds.scanner(columns=cols, filter="keep = true", fragments=[frag], batch_size=batch_rows,
                      blob_handling="all_binary", **rng)
    for rb in scan.to_batches():
        if rb.num_rows == 0:
            continue
        n = rb.num_rows
        none = pa.nulls(n, pa.string())
        missing = rb.column("image").is_null().to_pylist()
        error = pa.array(["no stored image in the parent table (its store_image was none)" if m else None
                          for m in missing], pa.string())
        items = pa.Table.from_arrays([rb.column("id"), rb.column("uri"), rb.column("caption"), none, none,
                                      rb.column("image").cast(pa.large_binary()), error], schema=ITEM_SCHEMA)
        for c in extra:
            items = items.append_column(PARENT_PREFIX + c, rb.column(c))
        yield items


def parent_parts(parent: Parent, rows_per_unit: int) -> list[Part]:
    """Ranges of about ``rows_per_unit`` kept rows of each parent fragment, from one scan of the
    kept rows' addresses (the fragment id is an address's upper 32 bits; no other column read)."""
    ds = lance.dataset(parent.uri, version=parent.version, storage_options=parent.storage_options)
    counts: dict[int, int] = {}
    for rb in ds.scanner(columns=[], filter="keep = true", with_row_address=True).to_batches():
        frags, n = np.unique(rb.column("_rowaddr").to_numpy() >> 32, return_counts=True)
        for f, c in zip(frags.tolist(), n.tolist(), strict=True):
            counts[f] = counts.get(f, 0) + c
    return [p for f in parent.fragments for p in row_ranges(str(f), counts.get(f, 0), rows_per_unit)]


def make_plan(cfg: StageConfig, skipped: tuple[str, ...], parent: Parent | None) -> Plan:
    """Which filters score, which columns come from the parent, which models load.

    From a parent table, every score column it computed is copied (scores travel down the chain,
    so stage 6 finds stage 1's and stage 4's), except where this stage's filter would compute it
    with other settings (then it is rescored). A filter all of whose columns are copied does not
    run; pixels are decoded only if a filter that runs needs them."""
    chain = [n for n in cfg.filters if n not in skipped]
    ours = column_identities(cfg, chain)
    emb_id = embedding_identity(cfg)
    clip_skipped = "clip" in skipped  # --skip clip turns the stage's CLIP off, rotation detector included
    wants_emb = any(FILTERS[n].uses_embedding or (n == "rotation" and cfg.scoring.rotation.detector == "clip"
                                                  and not clip_skipped) for n in chain)
    carry: list[str] = []
    hashes: dict[str, str] = {}
    if parent is not None:
        carry = [c for c in FILE_COLUMNS if c in parent.names]
        for c, h in parent.column_hashes.items():
            mismatch = (c in ours and ours[c] != h) or (c == EMBEDDING and wants_emb and h != emb_id)
            if c in parent.names and not mismatch:
                carry += [c] if c not in carry else []
                hashes[c] = h
    embeddings_carried = EMBEDDING in carry and hashes.get(EMBEDDING) == emb_id
    reused = [n for n in chain if FILTERS[n].columns and all(c in carry for c in FILTERS[n].columns)]
    active = tuple(n for n in chain if n not in reused)
    decode = parent is None or any(FILTERS[n].needs_image for n in active)
    models = models_for(cfg, active, embeddings_carried, clip_skipped)
    # Luma only when nothing reads colour: no colour filter, no CLIP embedding the images (a filter
    # reading clip_embedding computes the missing ones), no normalised RGB copy stored.
    grey = decode and "clip" not in models and cfg.scoring.store_image != "normalized" and not any(
        FILTERS[n].needs_image and FILTERS[n].colour for n in active)
    hashes.update({c: h for c, h in ours.items() if c not in hashes})
    if wants_emb and EMBEDDING not in hashes:
        hashes[EMBEDDING] = emb_id
    dim = embed_dim(_parent_schema(parent)) if EMBEDDING in carry else None
    return Plan(active=active, carry=tuple(carry), models=models,
                decode=decode, grey=grey, embed_dim=dim or 768, reused=tuple(reused), column_hashes=hashes)


def _parent_schema(parent: Parent) -> pa.Schema:
    return lance.dataset(parent.uri, version=parent.version, storage_options=parent.storage_options).schema


@dataclass
class RunSummary:
    output: str
    version: int
    rows: int
    scored_now: int
    seconds: float
    scoring_seconds: float
    reasons: dict[str, int] = field(default_factory=dict)
    reused: tuple[str, ...] = ()
    parent: str | None = None
    report: str | None = None

    def text(self) -> str:
        kept = self.reasons.get("kept", 0)
        lines = [f"output {self.output} (version {self.version}): {self.rows} rows, {kept} kept, "
                 f"{self.rows - kept} rejected"]
        for k, v in sorted(self.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {k:<14} {v:>9}  {100.0 * v / max(1, self.rows):5.1f}%")
        rate = self.scored_now / self.scoring_seconds if self.scoring_seconds > 0 else 0.0
        lines.append(f"scored {self.scored_now} rows this run in {self.scoring_seconds:.1f}s "
                     f"({rate:.1f} img/s); total {self.seconds:.1f}s")
        if self.parent:
            lines.append(f"input: {self.parent} (kept rows; scores copied for: {', '.join(self.reused) or 'none'})")
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def _table_meta(cfg: StageConfig, score_hash: str, skipped: tuple[str, ...], plan: Plan,
                parent: Parent | None) -> dict[bytes, bytes]:
    meta = {b"stage": cfg.stage.encode(), b"score_config_hash": score_hash.encode(),
            b"skipped": json.dumps(list(skipped)).encode(), b"store_image": cfg.scoring.store_image.encode(),
            b"filters": json.dumps(list(cfg.filters)).encode(),
            b"column_hashes": json.dumps(plan.column_hashes, sort_keys=True).encode()}
    if parent is not None:
        meta[b"parent_uri"], meta[b"parent_version"] = parent.uri.encode(), str(parent.version).encode()
    return meta


def check_output(uri: str, cfg: StageConfig, score_hash: str, storage_options: dict | None = None,
                 schema: pa.Schema = SCORING_SCHEMA) -> int:
    """Rows already in ``uri`` (0 if absent); ConfigError if it holds another schema, stage or
    scoring config (mixing would make its scores incomparable)."""
    ds = _open(uri, storage_options)
    if ds is None:
        if os.path.exists(uri) and os.listdir(uri):
            raise ConfigError(f"--output: {uri} exists and is not a Lance table")
        return 0
    missing = [n for n in schema.names if n not in ds.schema.names]
    if missing:
        raise ConfigError(f"--output: {uri} holds a table with another schema (missing columns: "
                          f"{', '.join(missing[:5])}); choose another --output")
    meta = ds.schema.metadata or {}
    stage = meta.get(b"stage", b"").decode()
    if stage != cfg.stage:
        raise ConfigError(f"--output: {uri} holds stage '{stage}' rows, this run is '{cfg.stage}'; "
                          "choose another --output")
    old = meta.get(b"score_config_hash", b"").decode()
    if old != score_hash and ds.count_rows() > 0:
        raise ConfigError(f"--output: {uri} was scored with another scoring config or --skip "
                          f"(hash {old}, this run {score_hash}); rerun with the same config and --skip, "
                          "use --rethreshold to change thresholds only, or choose another --output")
    return ds.count_rows()


def folder_items(source: Source, done: pa.Array | None, batch_rows: int, parallelism: int):
    """A folder's not-yet-committed items (paths; the scoring worker reads the bytes) as a Ray
    Dataset, and the folder's size."""
    import ray

    items = list_folder(source.root)
    todo = drop_done(items, done)
    # One batch per block, so idle actors pick up work until the very end (load balance).
    step = max(1, min(batch_rows, -(-todo.num_rows // max(1, parallelism * 4))))
    blocks = [todo.slice(i, step) for i in range(0, todo.num_rows, step)] or [todo]
    return ray.data.from_arrow(blocks), items.num_rows


def unit_dataset(parts: list[Part], rows_per_unit: int):
    """One row per work unit (``parts``: JSON list of (unit, start, stop), :func:`readers.pack`),
    one block per unit (up to MAX_BLOCKS), so each unit is a task of its own that reads, scores and
    writes it: no read stage of its own (none to compete with an actor pool for CPUs, nor to fuse
    a whole shard into one task) and no image bytes in Ray's object store."""
    import ray

    work = pack(parts, rows_per_unit)
    return ray.data.from_items([{"parts": json.dumps(w)} for w in work],
                               override_num_blocks=max(1, min(len(work), MAX_BLOCKS))), len(work)


def _parent_of_output(output: str, storage_options: dict | None) -> tuple[str, int] | None:
    ds = _open(output, storage_options)
    meta = (ds.schema.metadata or {}) if ds is not None else {}
    if b"parent_uri" not in meta:
        return None
    return meta[b"parent_uri"].decode(), int(meta[b"parent_version"])


def run_stage(input_spec: str, output: str, cfg: StageConfig, skipped: tuple[str, ...] = (),
              commit_every: int = 10_000, columns: Columns | None = None, progress: bool = True,
              report: bool = True, storage_options: dict | None = None, num_cpus: int | None = None) -> RunSummary:
    import ray
    from ray.data import DataContext

    t0 = time.time()
    storage_options = storage_options if storage_options is not None else storage.storage_options(output)
    if commit_every < 1:
        raise ConfigError(f"--commit-every must be >= 1, got {commit_every}")
    # A resumed chained run reads the parent version it started from, whatever the parent has now.
    pinned = _parent_of_output(output, storage_options)
    if pinned and os.path.abspath(pinned[0]) != os.path.abspath(input_spec) and pinned[0] != input_spec:
        raise ConfigError(f"--output: {output} was started from --input {pinned[0]}, not {input_spec}; "
                          "choose another --output")
    parent = open_parent(input_spec, pinned[1] if pinned else None, storage_options)
    source = None if parent is not None else resolve_input(input_spec, columns or Columns())
    if cfg.scoring.category.column and "balance" in cfg.filters:
        if parent is None:
            raise ConfigError("--category-column needs a previous stage's table as --input")
        if cfg.scoring.category.column not in parent.names:
            raise ConfigError(f"--category-column: column '{cfg.scoring.category.column}' not in {input_spec} "
                              f"({', '.join(parent.names)})")
    plan = make_plan(cfg, skipped, parent)
    score_hash = cfg.score_hash(skipped)
    existing = check_output(output, cfg, score_hash, storage_options)
    facts = preflight(cfg, plan)  # a missing model stops here, before any data is read
    if "embed_dim" in facts and EMBEDDING not in plan.carry:
        plan = Plan(**{**plan.__dict__, "embed_dim": facts["embed_dim"]})
    if "aesthetic_dim" in facts and facts["aesthetic_dim"] != plan.embed_dim:
        raise ConfigError(f"scoring.aesthetic.weights: the head reads {facts['aesthetic_dim']}-d embeddings, "
                          f"the stage's CLIP (scoring.clip) gives {plan.embed_dim}-d")

    schema = plan.schema.with_metadata(_table_meta(cfg, score_hash, skipped, plan, parent))
    if existing == 0 and _open(output, storage_options) is None:
        lance.write_dataset(schema.empty_table(), output, schema=schema, mode="create",
                            storage_options=storage_options)
    ds_out = lance.dataset(output, storage_options=storage_options)
    done = ds_out.to_table(columns=["id"]).column("id").combine_chunks() if existing else None

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, log_to_driver=progress, include_dashboard=False,
                 ignore_reinit_error=True)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_progress = False
    cpus = ray.available_resources().get("CPU", 1.0)
    workers = cfg.num_workers or max(1, int(cpus // max(cfg.cpus_per_worker, 1e-3)))

    # Work units (about batch_size rows each) are planned here from metadata; each is a Ray task
    # that reads, scores and writes it. Resume: a unit's already-committed ids are dropped there.
    done_ref = ray.put(done) if done is not None and len(done) else None
    read = None
    if parent is not None:
        extra = tuple(c for c in plan.carry) + ((cfg.scoring.category.column,) if cfg.scoring.category.column
                                                and "balance" in plan.active else ())
        read = functools.partial(expand_parent, parent, extra)
        (items, n_units), n_items = unit_dataset(parent_parts(parent, cfg.batch_size), cfg.batch_size), parent.kept
    elif source.kind == "folder":
        items, n_items = folder_items(source, done, cfg.batch_size, workers)
        n_units, done_ref = None, None
    else:
        read = functools.partial(expand_unit, source)
        (items, n_units), n_items = unit_dataset(work_units(source, cfg.batch_size), cfg.batch_size), None
    kwargs = {"cfg": cfg, "skipped": skipped, "plan": plan, "output_uri": output, "score_hash": score_hash,
              "storage_options": storage_options, "read": read, "done_ref": done_ref}
    batch = cfg.batch_size if read is None else 1  # a folder's items, or one work unit per call
    if needs_actors(plan):
        scored = items.map_batches(
            StageScorer, batch_size=batch, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker or None, fn_constructor_kwargs=kwargs)
    else:
        scored = items.map_batches(score_task, batch_size=batch, batch_format="pyarrow",
                                   num_cpus=cfg.cpus_per_worker, fn_kwargs=kwargs)
    if n_units is not None:
        print(f"[{cfg.stage}] {n_units} work units of about {cfg.batch_size} rows", flush=True)

    t_score = time.time()
    scored_now = 0
    if (n_items is None or n_items > existing) and n_units != 0:
        _, scored_now = commit_fragments(scored, output, ds_out.version, commit_every, storage_options, cfg.stage)
    scoring_seconds = time.time() - t_score

    counts, total, version = apply_decisions(output, cfg, storage_options)
    if n_items is not None and total != n_items:
        raise RuntimeError(f"row count mismatch: {n_items} input items, {total} output rows")
    summary = RunSummary(output, version, total, scored_now, time.time() - t0, scoring_seconds, counts,
                         reused=plan.reused, parent=f"{parent.uri}@{parent.version}" if parent else None)
    if report:
        from .report import write_report

        summary.report = write_report(output, cfg, summary, storage_options)
    return summary


def commit_fragments(written, output: str, read_version: int, commit_every: int,
                     storage_options: dict | None = None, label: str = "stage") -> tuple[int, int]:
    """Driver side of "workers write, the driver commits": ``written`` is a Ray Dataset whose rows
    are (``fragment`` JSON, ``rows``) from workers that wrote Lance fragments; they are committed
    with ``LanceOperation.Append`` every ``commit_every`` rows. A kill loses only uncommitted
    fragments (orphans Lance ignores). Returns (table version, rows committed). Every job that
    writes through Ray workers (stages, synthetic renders) commits through this."""
    from lance.fragment import FragmentMetadata

    version, pending, pending_rows, committed = read_version, [], 0, 0

    def commit() -> None:
        nonlocal version, pending, pending_rows, committed
        if pending:
            ds = lance.LanceDataset.commit(output, lance.LanceOperation.Append(pending), read_version=version,
                                           storage_options=storage_options)
            version, committed = ds.version, committed + pending_rows
            print(f"[{label}] committed {committed} rows this run (table version {version})", flush=True)
            pending, pending_rows = [], 0

    for batch in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        for frag, rows in zip(batch.column("fragment").to_pylist(), batch.column("rows").to_pylist(), strict=True):
            pending.append(FragmentMetadata.from_json(frag))
            pending_rows += rows
        if pending_rows >= commit_every:
            commit()
    commit()
    return version, committed


def rethreshold(output: str, cfg: StageConfig, report: bool = True,
                storage_options: dict | None = None) -> RunSummary:
    """Re-decide keep/reject_reason from the stored scores with ``cfg.thresholds``: no decoding,
    no models; a new table version."""
    t0 = time.time()
    storage_options = storage_options if storage_options is not None else storage.storage_options(output)
    try:
        ds = lance.dataset(output, storage_options=storage_options)
    except (ValueError, OSError, FileNotFoundError):
        raise ConfigError(f"--output: no Lance table at {output} to rethreshold") from None
    stage = (ds.schema.metadata or {}).get(b"stage", b"").decode()
    if stage != cfg.stage:
        raise ConfigError(f"--output: {output} holds stage '{stage}' rows, the config is for '{cfg.stage}'")
    stored = json.loads((ds.schema.metadata or {}).get(b"filters", b"null"))
    if stored is not None and list(cfg.filters) != stored:
        raise ConfigError(f"filters = {list(cfg.filters)}: {output} was scored for {stored}; rethreshold "
                          "changes thresholds only")
    counts, total, version = apply_decisions(output, cfg, storage_options)
    summary = RunSummary(output, version, total, 0, time.time() - t0, 0.0, counts)
    if report:
        from .report import write_report

        summary.report = write_report(output, cfg, summary, storage_options)
    return summary


def _open(uri: str, storage_options: dict | None):
    try:
        return lance.dataset(uri, storage_options=storage_options)
    except (ValueError, OSError, FileNotFoundError):
        return None
