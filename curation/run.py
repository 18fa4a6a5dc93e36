"""Driver of a curation run: resolve input, preflight models, stream items through the Ray Data
scoring stage, commit Lance fragments every ``commit_every`` rows, then decide from stored scores.

Resume is by construction: every committed row has a stable id, a rerun scores only ids not yet in
the table, and decisions (global dedup included) are made after scoring, from stored scores only,
by the same code as ``--rethreshold`` — so a run killed at any moment and started again ends with
exactly the rows and decisions of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import lance
import pyarrow as pa

from .config import ConfigError, StageConfig
from .decide import apply_decisions
from .readers import Columns, Source, drop_done, expand_unit, list_folder, resolve_input
from .schema import SCORING_SCHEMA
from .stage1 import Stage1Scorer, needs_actors, preflight, score_task


@dataclass
class RunSummary:
    output: str
    version: int
    rows: int
    scored_now: int
    seconds: float
    scoring_seconds: float
    reasons: dict[str, int] = field(default_factory=dict)
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
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


def _table_meta(cfg: StageConfig, score_hash: str, skipped: tuple[str, ...]) -> dict[bytes, bytes]:
    return {b"stage": cfg.stage.encode(), b"score_config_hash": score_hash.encode(),
            b"skipped": json.dumps(list(skipped)).encode(), b"store_image": cfg.scoring.store_image.encode()}


def check_output(uri: str, cfg: StageConfig, score_hash: str, storage_options: dict | None = None) -> int:
    """Rows already in ``uri`` (0 if absent); ConfigError if it holds another schema, stage or
    scoring config (mixing would make its scores incomparable)."""
    try:
        ds = lance.dataset(uri, storage_options=storage_options)
    except (ValueError, OSError, FileNotFoundError):
        if os.path.exists(uri) and os.listdir(uri):
            raise ConfigError(f"--output: {uri} exists and is not a Lance table") from None
        return 0
    missing = [n for n in SCORING_SCHEMA.names if n not in ds.schema.names]
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


def _expand(batch: dict, source: Source, done_ref, batch_rows: int):
    import ray

    done = ray.get(done_ref) if done_ref is not None else None
    for unit in batch["unit"]:
        for rows in expand_unit(source, str(unit), batch_rows):
            rows = drop_done(rows, done)
            if rows.num_rows:
                yield rows


def build_items(source: Source, done: pa.Array | None, batch_rows: int, parallelism: int):
    """A Ray Dataset of not-yet-committed items (readers.ITEM_SCHEMA) and, for folders, its size."""
    import ray

    if source.kind == "folder":
        items = list_folder(source.root)
        todo = drop_done(items, done)
        # One batch per block, so idle actors pick up work until the very end (load balance).
        step = max(1, min(batch_rows, -(-todo.num_rows // max(1, parallelism * 4))))
        blocks = [todo.slice(i, step) for i in range(0, todo.num_rows, step)] or [todo]
        return ray.data.from_arrow(blocks), items.num_rows
    units = ray.data.from_items([{"unit": u} for u in source.units], override_num_blocks=len(source.units))
    done_ref = ray.put(done) if done is not None and len(done) else None
    return units.map_batches(_expand, batch_size=1, fn_kwargs={"source": source, "done_ref": done_ref,
                                                                "batch_rows": batch_rows}), None


def run_stage(input_spec: str, output: str, cfg: StageConfig, skipped: tuple[str, ...] = (),
              commit_every: int = 10_000, columns: Columns | None = None, progress: bool = True,
              report: bool = True, storage_options: dict | None = None, num_cpus: int | None = None) -> RunSummary:
    import ray
    from ray.data import DataContext

    t0 = time.time()
    if commit_every < 1:
        raise ConfigError(f"--commit-every must be >= 1, got {commit_every}")
    source = resolve_input(input_spec, columns or Columns())
    score_hash = cfg.score_hash(skipped)
    existing = check_output(output, cfg, score_hash, storage_options)
    preflight(cfg, skipped)  # a missing model stops here, before any data is read

    schema = SCORING_SCHEMA.with_metadata(_table_meta(cfg, score_hash, skipped))
    if existing == 0 and not _exists(output, storage_options):
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

    items, n_items = build_items(source, done, cfg.batch_size, workers)
    kwargs = {"cfg": cfg, "skipped": skipped, "output_uri": output, "score_hash": score_hash,
              "storage_options": storage_options}
    if needs_actors(skipped):
        scored = items.map_batches(
            Stage1Scorer, batch_size=cfg.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker or None, fn_constructor_kwargs=kwargs)
    else:
        scored = items.map_batches(score_task, batch_size=cfg.batch_size, batch_format="pyarrow",
                                   num_cpus=cfg.cpus_per_worker, fn_kwargs=kwargs)

    t_score = time.time()
    version, pending, pending_rows, scored_now = ds_out.version, [], 0, 0

    def commit() -> None:
        nonlocal version, pending, pending_rows, scored_now
        if pending:
            ds = lance.LanceDataset.commit(output, lance.LanceOperation.Append(pending), read_version=version,
                                           storage_options=storage_options)
            version, scored_now = ds.version, scored_now + pending_rows
            print(f"[{cfg.stage}] committed {scored_now} rows this run (table version {version})", flush=True)
            pending, pending_rows = [], 0

    from lance.fragment import FragmentMetadata

    if n_items is None or n_items > existing:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            for frag, rows in zip(batch.column("fragment").to_pylist(), batch.column("rows").to_pylist(),
                                  strict=True):
                pending.append(FragmentMetadata.from_json(frag))
                pending_rows += rows
            if pending_rows >= commit_every:
                commit()
        commit()
    scoring_seconds = time.time() - t_score

    decisions, version = apply_decisions(output, cfg, storage_options)
    total = decisions.num_rows
    if n_items is not None and total != n_items:
        raise RuntimeError(f"row count mismatch: {n_items} input items, {total} output rows")
    summary = RunSummary(output, version, total, scored_now, time.time() - t0, scoring_seconds,
                         reason_counts(decisions))
    if report:
        from .report import write_report

        summary.report = write_report(output, cfg, summary, storage_options)
    return summary


def rethreshold(output: str, cfg: StageConfig, report: bool = True,
                storage_options: dict | None = None) -> RunSummary:
    """Re-decide keep/reject_reason from the stored scores with ``cfg.thresholds``: no decoding,
    no models; a new table version."""
    t0 = time.time()
    try:
        ds = lance.dataset(output, storage_options=storage_options)
    except (ValueError, OSError, FileNotFoundError):
        raise ConfigError(f"--output: no Lance table at {output} to rethreshold") from None
    stage = (ds.schema.metadata or {}).get(b"stage", b"").decode()
    if stage != cfg.stage:
        raise ConfigError(f"--output: {output} holds stage '{stage}' rows, the config is for '{cfg.stage}'")
    decisions, version = apply_decisions(output, cfg, storage_options)
    summary = RunSummary(output, version, decisions.num_rows, 0, time.time() - t0, 0.0,
                         reason_counts(decisions))
    if report:
        from .report import write_report

        summary.report = write_report(output, cfg, summary, storage_options)
    return summary


def reason_counts(decisions: pa.Table) -> dict[str, int]:
    counts = decisions.column("reject_reason").fill_null("kept").value_counts().to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def _exists(uri: str, storage_options: dict | None) -> bool:
    try:
        lance.dataset(uri, storage_options=storage_options)
        return True
    except (ValueError, OSError, FileNotFoundError):
        return False
