"""The captioning job: kept curated rows -> routing -> typed captions -> captions Lance table.

Flow: validate everything (input table, output table, prompt set, server or model path), pin the
curated table's version, skip ids already `ok` for this model + prompt version, caption the rest,
and commit every `commit_every` rows with `merge_insert` on `id` (one row per id, failed rows
replaced in place by a rerun). A killed run loses only uncommitted rows; a rerun picks them up.

Server mode (`--server`) streams ids and image blobs from Lance and keeps up to `concurrency`
requests in flight with asyncio; the job is I/O-bound, so one process saturates several servers.
In-cluster mode (no `--server`) runs the same prompts through ray.data.llm (captioning/engine.py).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from captioning.client import CaptionClient, Outcome, check_server
from captioning.config import CaptionConfig, ConfigError
from captioning.prompts import ROUTE, PromptSet
from captioning.routing import caption_types, route_columns
from captioning.schema import (
    CAPTION_TYPES,
    SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    with_source_metadata,
)

REQUIRED_INPUT = ("id", "keep", "image")


@dataclass
class RunSummary:
    source_version: int
    kept: int = 0
    skipped: int = 0
    """Kept rows already `ok` for this model + prompt version (not requested again)."""
    captioned: int = 0
    ok: int = 0
    failed: int = 0
    failures: collections.Counter = field(default_factory=collections.Counter)
    requests: int = 0
    """HTTP requests / engine generations, retries included."""
    elapsed_s: float = 0.0
    output_version: int | None = None
    report: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"captioned {self.captioned} rows ({self.ok} ok, {self.failed} failed), skipped {self.skipped} "
               f"already captioned, of {self.kept} kept rows in curated version {self.source_version}",
               f"{self.requests} requests in {self.elapsed_s:.1f}s "
               f"({self.requests / max(self.elapsed_s, 1e-9):.2f} requests/s); output version {self.output_version}"]
        if self.failures:
            out.append("failed rows by reason: " + ", ".join(f"{k}={v}" for k, v in self.failures.most_common()))
        if self.report:
            out.append(f"report: {self.report}")
        return out


# --------------------------------------------------------------------------- validation, input, output


def open_source(cfg: CaptionConfig) -> lance.LanceDataset:
    """The curated table at its current version (pinned for the whole run)."""
    try:
        ds = lance.dataset(cfg.input)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--input {cfg.input}: not a readable Lance table ({str(e).splitlines()[0]})") from e
    missing = [c for c in REQUIRED_INPUT if c not in ds.schema.names]
    if missing:
        raise ConfigError(f"--input {cfg.input}: missing column(s) {', '.join(missing)} "
                          "(expected a curated table from jobs/filter_stage1.py)")
    return ds


def open_output(cfg: CaptionConfig) -> lance.LanceDataset | None:
    try:
        ds = lance.dataset(cfg.output)
    except (ValueError, OSError):
        if Path(cfg.output).exists() and any(Path(cfg.output).iterdir()):
            raise ConfigError(f"--output {cfg.output}: exists but is not a Lance table") from None
        return None
    missing = [f.name for f in SCHEMA if f.name not in ds.schema.names]
    if missing:
        raise ConfigError(f"--output {cfg.output}: not a captions table (missing {', '.join(missing)})")
    return ds


def check_model_path(cfg: CaptionConfig) -> None:
    """In-cluster mode loads the model itself: a path-looking --model must exist."""
    looks_like_path = cfg.model.startswith(("/", "./", "../", "~")) or Path(cfg.model).exists()
    if looks_like_path and not Path(cfg.model).expanduser().is_dir():
        raise ConfigError(f"--model {cfg.model}: no such model directory (set --model to a local model "
                          "directory or model id, or --server to use a running vLLM server)")


def done_ids(out: lance.LanceDataset | None, cfg: CaptionConfig) -> set[str]:
    if out is None:
        return set()
    done = out.to_table(columns=["id"], filter=(
        f"caption_status = '{STATUS_OK}' AND model = {_sql_str(cfg.model)} "
        f"AND prompt_version = {_sql_str(cfg.prompt_version)}"))
    return set(done.column("id").to_pylist())


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def iter_todo(src: lance.LanceDataset, done: set[str], batch_size: int,
              summary: RunSummary) -> Iterator[tuple[list[str], list[bytes | None]]]:
    """Kept rows not yet done, as (ids, JPEG bytes) batches; blobs are read only for those rows."""
    # A blob column (lance-encoding:blob) scans as descriptors; its bytes come from read_blobs.
    image_type = src.schema.field("image").type
    blob = not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type))
    columns = ["id"] if blob else ["id", "image"]
    scanner = src.scanner(columns=columns, filter="keep = true", with_row_address=blob, batch_size=batch_size)
    for batch in scanner.to_batches():
        ids = batch.column("id").to_pylist()
        summary.kept += len(ids)
        todo = [i for i, x in enumerate(ids) if x not in done]
        summary.skipped += len(ids) - len(todo)
        if not todo:
            continue
        if blob:
            addrs = pc.take(batch.column("_rowaddr"), pa.array(todo)).to_pylist()
            images = [b for _, b in src.read_blobs("image", addresses=addrs, preserve_order=True)]
        else:
            col = batch.column("image").to_pylist()
            images = [col[i] for i in todo]
        yield [ids[i] for i in todo], images


class CaptionWriter:
    """Buffers result rows and commits them with merge_insert on `id` every `commit_every` rows."""

    def __init__(self, cfg: CaptionConfig, source_uri: str, source_version: int):
        self.cfg = cfg
        self.schema = with_source_metadata(SCHEMA, source_uri, source_version)
        self.rows: list[dict[str, Any]] = []
        self.version: int | None = None

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows

    def commit(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        table = pa.Table.from_pylist(rows, schema=self.schema)
        try:
            ds = lance.dataset(self.cfg.output)
        except (ValueError, OSError):
            ds = lance.write_dataset(table, self.cfg.output, schema=self.schema, mode="create")
        else:
            ds.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(table)
            ds = lance.dataset(self.cfg.output)
            if (ds.schema.metadata or {}) != self.schema.metadata:  # a rerun from a newer curated version
                ds.replace_schema_metadata({k.decode(): v.decode() for k, v in self.schema.metadata.items()})
        self.version = lance.dataset(self.cfg.output).version


# --------------------------------------------------------------------------- results


def result_row(cfg: CaptionConfig, row_id: str, route: Outcome, captions: list[Outcome],
               source_version: int) -> dict[str, Any]:
    """One captions-table row from the outcomes of its requests (shared by both modes)."""
    failed = ([route] if not route.ok else []) + [o for o in captions if not o.ok]
    row: dict[str, Any] = {
        "id": row_id,
        "caption_status": STATUS_FAILED if failed else STATUS_OK,
        "caption_error": "; ".join(f"{o.kind}: {o.error_kind}: {o.error}" for o in failed) or None,
        "caption_error_kind": failed[0].error_kind if failed else None,
        **route_columns(route.value if route.ok else None),
        "route_json": route.text,
        **{f"caption_{t}": None for t in CAPTION_TYPES},
        # Valid captions of a failed row are kept (they passed the schema); a rerun redoes the row.
        **{f"caption_{o.kind}": o.text for o in captions if o.ok},
        "attempts": route.attempts + sum(o.attempts for o in captions),
        "model": cfg.model,
        "prompt_version": cfg.prompt_version,
        "source_version": source_version,
        "captioned_at": dt.datetime.now(dt.UTC),
    }
    return row


def failed_row(cfg: CaptionConfig, row_id: str, kind: str, error: str, source_version: int) -> dict[str, Any]:
    return result_row(cfg, row_id, Outcome(ROUTE, 0, error_kind=kind, error=error), [], source_version)


def count_row(summary: RunSummary, row: dict[str, Any]) -> None:
    summary.captioned += 1
    summary.requests += row["attempts"]
    if row["caption_status"] == STATUS_OK:
        summary.ok += 1
    else:
        summary.failed += 1
        summary.failures[row["caption_error_kind"]] += 1


# --------------------------------------------------------------------------- server mode


async def _run_server(cfg: CaptionConfig, prompts: PromptSet, src: lance.LanceDataset, done: set[str],
                      writer: CaptionWriter, summary: RunSummary) -> None:
    await check_server(cfg)
    client = CaptionClient(cfg, prompts)
    # Rows in flight: enough that every request slot stays busy while rows wait on their routing
    # answers, and that the end of a run is not a long route -> caption chain on a few rows.
    window = asyncio.Semaphore(4 * cfg.concurrency)
    commit_lock = asyncio.Lock()
    tasks: set[asyncio.Task] = set()
    bar = tqdm(desc="captioning", unit="row", disable=not cfg.progress)

    async def flush(force: bool = False) -> None:
        async with commit_lock:
            if force or len(writer.rows) >= cfg.commit_every:
                await asyncio.to_thread(writer.commit, writer.take())

    async def caption_one(row_id: str, image: bytes | None) -> None:
        try:
            if not image:
                row = failed_row(cfg, row_id, "no_image", "curated row has no image bytes", src.version)
            else:
                route = await client.request(ROUTE, image, row_id)
                outs = []
                if route.ok:
                    outs = await asyncio.gather(*(client.request(t, image, row_id) for t in caption_types(route.value)))
                row = result_row(cfg, row_id, route, list(outs), src.version)
        except Exception as e:  # one bad row is recorded, never the whole run lost
            row = failed_row(cfg, row_id, "internal", f"{type(e).__name__}: {e}", src.version)
        finally:
            window.release()
        writer.add(row)
        count_row(summary, row)
        bar.update(1)
        if len(writer.rows) >= cfg.commit_every:
            await flush()

    batches = iter_todo(src, done, cfg.batch_size * 4, summary)
    try:
        while (item := await asyncio.to_thread(next, batches, None)) is not None:
            for row_id, image in zip(*item, strict=True):
                await window.acquire()
                task = asyncio.create_task(caption_one(row_id, image))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        await flush(force=True)
    finally:
        bar.close()
        await client.aclose()


# --------------------------------------------------------------------------- entry point


def run(cfg: CaptionConfig) -> RunSummary:
    """Caption the kept rows of `cfg.input` into `cfg.output`; returns the run summary."""
    prompts = PromptSet.load(cfg.prompt_root, cfg.prompt_version)
    src = open_source(cfg)
    out = open_output(cfg)
    if cfg.server is None:
        check_model_path(cfg)
    done = done_ids(out, cfg)
    summary = RunSummary(source_version=src.version)
    writer = CaptionWriter(cfg, cfg.input, src.version)
    start = time.perf_counter()
    if cfg.server is not None:
        asyncio.run(_run_server(cfg, prompts, src, done, writer, summary))
    else:
        from captioning.engine import run_engine

        run_engine(cfg, prompts, src, done, writer, summary)
    summary.elapsed_s = time.perf_counter() - start
    summary.output_version = writer.version if writer.version is not None else (out.version if out else None)
    if summary.output_version is not None:
        from captioning.report import compute_stats, write_report

        table = lance.dataset(cfg.output).to_table(filter=(
            f"model = {_sql_str(cfg.model)} AND prompt_version = {_sql_str(cfg.prompt_version)}"))
        summary.stats = compute_stats(table)
        if cfg.report:
            summary.report = str(write_report(summary.stats, cfg.report, title=f"{cfg.model} / {cfg.prompt_version}"))
    return summary
