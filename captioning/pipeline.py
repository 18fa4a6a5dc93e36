"""The captioning job: kept curated rows -> routing -> typed captions (+ OCR check) -> captions Lance table.

Flow: validate everything (input table, output table, prompt set, server or model path), pin the
curated table's version, skip ids whose stored row is `ok` (with `recaption`: `ok` for this model
and prompt version), caption the rest, and commit every `commit_every` rows with `merge_insert` on
`id` guarded by `schema.REPLACE_IF` (one row per id; an `ok` row is never replaced by a failed one).
A killed run loses only uncommitted rows; a rerun picks them up.

Server mode (`--server`) streams ids and image blobs from Lance and keeps up to `concurrency`
requests in flight with asyncio; the job is I/O-bound, so one process saturates several servers.
When the server goes away the client's circuit breaker pauses every request; past
`server_patience_s` the job commits the rows that finished and raises `ServerGone` (exit 3). A
failing Lance commit raises `CommitFailed` (exit 4). In-cluster mode (no `--server`) runs the same
prompts through ray.data.llm (captioning/engine.py).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from captioning.client import CaptionClient, Outcome, ServerGone, check_server
from captioning.config import CaptionConfig, ConfigError
from captioning.images import prepare_image
from captioning.prompts import ROUTE, InvalidResponse, PromptSet
from captioning.routing import caption_types, route_columns
from captioning.schema import (
    ADDED_COLUMNS,
    CAPTION_TYPES,
    REPLACE_IF,
    SCHEMA,
    STATUS_FAILED,
    STATUS_OK,
    with_source_metadata,
)


class CommitFailed(RuntimeError):
    """A Lance commit of finished rows failed: the job stops (the rerun captions those rows again)."""

REQUIRED_INPUT = ("id", "keep", "image")


@dataclass
class RunSummary:
    source_version: int
    kept: int = 0
    skipped: int = 0
    """Kept rows already `ok` (with recaption: ok for this model + prompt version): not requested."""
    recaptioned: int = 0
    """Rows that replaced an ok row of another model / prompt version on purpose (recaption)."""
    kept_previous: int = 0
    """Rows whose new result failed while the stored row is ok: the ok row stays, nothing written."""
    resized: int = 0
    """Images downscaled to max_pixels before sending."""
    ocr_checked: int = 0
    ocr_flagged: int = 0
    ocr_retried: int = 0
    outages: int = 0
    """Times the server stopped answering and the job paused (circuit breaker opened)."""
    paused_s: float = 0.0
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
        if self.recaptioned or self.kept_previous:
            out.append(f"recaptioned {self.recaptioned} ok rows; kept {self.kept_previous} ok rows whose new attempt failed")
        if self.ocr_checked:
            out.append(f"OCR check of text captions: {self.ocr_checked} checked, {self.ocr_retried} retried, "
                       f"{self.ocr_flagged} flagged (ocr_flag)")
        if self.resized:
            out.append(f"{self.resized} images downscaled to max_pixels before sending")
        if self.outages:
            out.append(f"server unreachable {self.outages} times, paused {self.paused_s:.1f}s in all")
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
    if set(missing) - set(ADDED_COLUMNS):
        raise ConfigError(f"--output {cfg.output}: not a captions table (missing {', '.join(missing)})")
    if missing:  # a table from before these columns existed: add them, all null (no data rewritten)
        ds.add_columns([SCHEMA.field(n) for n in missing])
        ds = lance.dataset(cfg.output)
    return ds


def check_model_path(cfg: CaptionConfig) -> None:
    """In-cluster mode loads the model itself: a path-looking --model must exist."""
    looks_like_path = cfg.model.startswith(("/", "./", "../", "~")) or Path(cfg.model).exists()
    if looks_like_path and not Path(cfg.model).expanduser().is_dir():
        raise ConfigError(f"--model {cfg.model}: no such model directory (set --model to a local model "
                          "directory or model id, or --server to use a running vLLM server)")


@dataclass(frozen=True)
class Stored:
    status: str
    model: str | None
    prompt_version: str | None


def stored_rows(out: lance.LanceDataset | None) -> dict[str, Stored]:
    """id -> the stored row's status, model and prompt version (small columns only)."""
    if out is None:
        return {}
    t = out.to_table(columns=["id", "caption_status", "model", "prompt_version"])
    return {i: Stored(st, m, v) for i, st, m, v in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True)}


def is_done(cfg: CaptionConfig, stored: Stored | None) -> bool:
    """Nothing to do for this row: it is ok (and, with recaption, ok for this model + prompt version)."""
    if stored is None or stored.status != STATUS_OK:
        return False
    return not cfg.recaption or (stored.model, stored.prompt_version) == (cfg.model, cfg.prompt_version)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def iter_todo(src: lance.LanceDataset, done: set[str] | dict, batch_size: int,
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
    """Buffers result rows and commits them with merge_insert on `id` every `commit_every` rows,
    guarded by REPLACE_IF (an ok row is never replaced by a failed one). Other tables keyed on `id`
    (flywheel/pe_schema.py) pass their own `schema` and guard."""

    def __init__(self, cfg: CaptionConfig, source_uri: str, source_version: int,
                 schema: pa.Schema = SCHEMA, replace_if: str = REPLACE_IF):
        self.cfg, self.replace_if = cfg, replace_if
        self.schema = with_source_metadata(schema, source_uri, source_version)
        self.rows: list[dict[str, Any]] = []
        self.version: int | None = None
        self.committed = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows

    def commit(self, rows: list[dict[str, Any]]) -> None:
        """Commit `rows`; raises CommitFailed naming how many finished rows were not written."""
        if not rows:
            return
        try:
            table = pa.Table.from_pylist(rows, schema=self.schema)
            if self.version is None and not _exists(self.cfg.output):
                ds = lance.write_dataset(table, self.cfg.output, schema=self.schema, mode="create")
            else:
                ds = lance.dataset(self.cfg.output)
                ds.merge_insert("id").when_matched_update_all(self.replace_if).when_not_matched_insert_all().execute(table)
                ds = lance.dataset(self.cfg.output)
                if (ds.schema.metadata or {}) != self.schema.metadata:  # a rerun from a newer curated version
                    ds.replace_schema_metadata({k.decode(): v.decode() for k, v in self.schema.metadata.items()})
            self.version = lance.dataset(self.cfg.output).version
        except Exception as e:  # noqa: BLE001 - any storage error: stop the job, say what was not written
            raise CommitFailed(f"Lance commit to --output {self.cfg.output} failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); {len(rows)} finished rows were not "
                               f"written ({self.committed} committed before); rerun the same command to caption "
                               "them again") from e
        self.committed += len(rows)


def _exists(uri: str) -> bool:
    try:
        lance.dataset(uri)
        return True
    except (ValueError, OSError):
        return False


# --------------------------------------------------------------------------- results


def result_row(cfg: CaptionConfig, row_id: str, route: Outcome, captions: list[Outcome],
               source_version: int, ocr: dict[str, Any] | None = None,
               previous: Stored | None = None) -> dict[str, Any]:
    """One captions-table row from the outcomes of its requests (shared by both modes). `ocr`: the
    OCR columns of a checked text caption; `previous`: the ok row this one replaces (recaption)."""
    failed = ([route] if not route.ok else []) + [o for o in captions if not o.ok]
    replaces_ok = previous is not None and previous.status == STATUS_OK
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
        **{k: None for k in ("ocr_engine", "ocr_text", "ocr_agreement", "ocr_flag")},
        **(ocr or {}),
        "attempts": route.attempts + sum(o.attempts for o in captions),
        "model": cfg.model,
        "prompt_version": cfg.prompt_version,
        "previous_model": previous.model if replaces_ok else None,
        "previous_prompt_version": previous.prompt_version if replaces_ok else None,
        "source_version": source_version,
        "captioned_at": dt.datetime.now(dt.UTC),
    }
    return row


def failed_row(cfg: CaptionConfig, row_id: str, kind: str, error: str, source_version: int) -> dict[str, Any]:
    return result_row(cfg, row_id, Outcome(ROUTE, 0, error_kind=kind, error=error), [], source_version)


def count_row(summary: RunSummary, row: dict[str, Any], stored: Stored | None = None) -> bool:
    """Count a finished row; False when it must not be written (a failure where an ok row is stored:
    the merge guard would keep the ok row anyway, and the count says so)."""
    if row["caption_status"] != STATUS_OK and stored is not None and stored.status == STATUS_OK:
        summary.kept_previous += 1
        return False
    summary.captioned += 1
    summary.requests += row["attempts"]
    if row["caption_status"] == STATUS_OK:
        summary.ok += 1
        summary.recaptioned += row["previous_model"] is not None
    else:
        summary.failed += 1
        summary.failures[row["caption_error_kind"]] += 1
    if row["ocr_agreement"] is not None:
        summary.ocr_checked += 1
        summary.ocr_flagged += bool(row["ocr_flag"])
    return True


def combine_parts(prompts: PromptSet, kind: str, outs: list[Outcome]) -> Outcome:
    """The Outcome of caption type `kind` from its parts' outcomes (one part, or one per language)."""
    attempts = sum(o.attempts for o in outs)
    bad = next((o for o in outs if not o.ok), None)
    if bad is not None:
        detail = bad.error if bad.kind == kind else f"{bad.kind}: {bad.error}"
        return Outcome(kind, attempts, error_kind=bad.error_kind, error=detail)
    try:
        text, value = prompts.merge(kind, [o.text for o in outs])
    except InvalidResponse as e:
        return Outcome(kind, attempts, error_kind=e.kind, error=f"merged parts: {e.detail}")
    return Outcome(kind, attempts, text=text, value=value)


def ocr_columns(cfg: CaptionConfig, caption_text: str, image) -> dict[str, Any]:
    """OCR columns of a text caption, without a retry (in-cluster mode's check)."""
    from common.ocr import char_agreement, read_text

    read = read_text(image, cfg.ocr_engine)
    score = char_agreement(transcription(caption_text), read.text)
    return {"ocr_engine": read.engine, "ocr_text": read.text, "ocr_agreement": float(score),
            "ocr_flag": score < cfg.ocr_min_agreement}


def transcription(caption_text: str) -> str:
    """The text a text caption transcribed: its blocks in reading order ([illegible] left out)."""
    return "\n".join(b["text"] for b in json.loads(caption_text)["blocks"] if b["text"] != "[illegible]")


# --------------------------------------------------------------------------- server mode


class ServerCaptioner:
    """Captions one row against the server: image prepared once, routing, every routed caption type
    (in its prompt parts, merged), and the OCR check of a text caption."""

    def __init__(self, cfg: CaptionConfig, prompts: PromptSet, client: CaptionClient, summary: RunSummary):
        self.cfg, self.prompts, self.client, self.summary = cfg, prompts, client, summary
        self._ocr_slot = asyncio.Semaphore(1)  # OCR is CPU work: one image at a time beside the loop

    async def caption_type(self, kind: str, image, row_id: str, seed_offset: int = 0) -> Outcome:
        outs = await asyncio.gather(*(self.part(p, image, row_id, seed_offset) for p in self.prompts.parts[kind]))
        return combine_parts(self.prompts, kind, list(outs))

    async def part(self, part: str, image, row_id: str, seed_offset: int = 0) -> Outcome:
        """One part's answer; an answer still cut at max_tokens after its attempts (the bound doubled
        up to max_tokens_cap) is asked again as the part's shorter requests (prompts.LEVEL_GROUPS:
        short + medium, then dense alone), merged into the part's shape."""
        out = await self.client.request(part, image.data, row_id, image.mime, seed_offset)
        subs = self.prompts.shorter.get(part)
        if out.ok or out.error_kind != "length" or not subs:
            return out
        outs = await asyncio.gather(*(self.client.request(s, image.data, row_id, image.mime, seed_offset) for s in subs))
        attempts = out.attempts + sum(o.attempts for o in outs)
        bad = next((o for o in outs if not o.ok), None)
        if bad is None:
            try:
                return Outcome(part, attempts, *self.prompts.merge(part, [o.text for o in outs]))
            except InvalidResponse as e:
                bad = Outcome(part, 0, error_kind=e.kind, error=f"merged shorter requests: {e.detail}")
        return Outcome(part, attempts, error_kind=bad.error_kind,
                       error=f"{out.error}; asked again as shorter requests ({', '.join(subs)}): {bad.kind}: {bad.error}")

    async def ocr_check(self, out: Outcome, image, row_id: str) -> tuple[Outcome, dict[str, Any]]:
        """Read the image with OCR; below ocr_min_agreement ask for the text caption once more and
        keep the better-agreeing answer, flagged if it is still below."""
        from common.ocr import char_agreement, read_text

        async with self._ocr_slot:
            read = await asyncio.to_thread(read_text, image.image, self.cfg.ocr_engine)
        score = char_agreement(transcription(out.text), read.text)
        if score < self.cfg.ocr_min_agreement:
            self.summary.ocr_retried += 1
            again = await self.caption_type("text", image, row_id, seed_offset=self.cfg.max_attempts)
            attempts = out.attempts + again.attempts
            if again.ok and (s2 := char_agreement(transcription(again.text), read.text)) > score:
                out, score = again, s2
            out = Outcome(out.kind, attempts, out.text, out.value)
        return out, {"ocr_engine": read.engine, "ocr_text": read.text, "ocr_agreement": float(score),
                     "ocr_flag": score < self.cfg.ocr_min_agreement}

    async def row(self, row_id: str, data: bytes | None, source_version: int, stored: Stored | None) -> dict[str, Any]:
        """The finished row; raises ServerGone (the row is then not written: the rerun does it)."""
        cfg = self.cfg
        if not data:
            return failed_row(cfg, row_id, "no_image", "curated row has no image bytes", source_version)
        try:
            image = await asyncio.to_thread(prepare_image, data, cfg.max_pixels)
        except ValueError as e:
            return failed_row(cfg, row_id, "bad_image", str(e), source_version)
        self.summary.resized += image.resized
        route = await self.client.request(ROUTE, image.data, row_id, image.mime)
        outs: list[Outcome] = []
        ocr = None
        if route.ok:
            outs = list(await asyncio.gather(*(self.caption_type(t, image, row_id) for t in caption_types(route.value))))
            for i, o in enumerate(outs):
                if o.kind == "text" and o.ok and cfg.ocr_engine != "none":
                    outs[i], ocr = await self.ocr_check(o, image, row_id)
        return result_row(cfg, row_id, route, outs, source_version, ocr, stored)


async def _run_server(cfg: CaptionConfig, prompts: PromptSet, src: lance.LanceDataset, stored: dict[str, Stored],
                      done: set[str], writer: CaptionWriter, summary: RunSummary) -> None:
    await check_server(cfg)
    client = CaptionClient(cfg, prompts)
    captioner = ServerCaptioner(cfg, prompts, client, summary)
    # Rows in flight: enough that every request slot stays busy while rows wait on their routing
    # answers, and that the end of a run is not a long route -> caption chain on a few rows.
    window = asyncio.Semaphore(4 * cfg.concurrency)
    tasks: set[asyncio.Task] = set()
    fatal: list[BaseException] = []
    bar = tqdm(desc="captioning", unit="row", disable=not cfg.progress)

    async def caption_one(row_id: str, image: bytes | None) -> dict[str, Any]:
        try:
            return await captioner.row(row_id, image, src.version, stored.get(row_id))
        except (ServerGone, asyncio.CancelledError):
            raise
        except Exception as e:  # one bad row is recorded, never the whole run lost
            return failed_row(cfg, row_id, "internal", f"{type(e).__name__}: {e}", src.version)
        finally:
            window.release()

    def finished(task: asyncio.Task) -> None:
        tasks.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            fatal.append(task.exception())
            return
        row = task.result()
        if count_row(summary, row, stored.get(row["id"])):
            writer.add(row)
        bar.update(1)

    batches = iter_todo(src, done, cfg.batch_size * 4, summary)
    try:
        while not fatal and (item := await asyncio.to_thread(next, batches, None)) is not None:
            for row_id, image in zip(*item, strict=True):
                await window.acquire()
                if fatal:
                    break
                task = asyncio.create_task(caption_one(row_id, image))
                tasks.add(task)
                task.add_done_callback(finished)
                if len(writer.rows) >= cfg.commit_every:
                    await asyncio.to_thread(writer.commit, writer.take())
        while tasks and not fatal:
            await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
            if len(writer.rows) >= cfg.commit_every:
                await asyncio.to_thread(writer.commit, writer.take())
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        summary.outages, summary.paused_s = client.breaker.outages, client.breaker.paused_s
        await client.aclose()
    # Reached on success and when the server is gone: the rows that finished are committed first.
    await asyncio.to_thread(writer.commit, writer.take())
    if fatal:
        raise fatal[0]


# --------------------------------------------------------------------------- entry point


def run(cfg: CaptionConfig) -> RunSummary:
    """Caption the kept rows of `cfg.input` into `cfg.output`; returns the run summary."""
    prompts = PromptSet.load(cfg.prompt_root, cfg.prompt_version)
    src = open_source(cfg)
    out = open_output(cfg)
    if cfg.server is None:
        check_model_path(cfg)
    stored = stored_rows(out)
    done = {i for i, st in stored.items() if is_done(cfg, st)}
    summary = RunSummary(source_version=src.version)
    writer = CaptionWriter(cfg, cfg.input, src.version)
    start = time.perf_counter()
    if cfg.server is not None:
        try:
            asyncio.run(_run_server(cfg, prompts, src, stored, done, writer, summary))
        except ServerGone as e:  # what finished is committed; say so in the one line
            raise ServerGone(f"{e}: committed {writer.committed} finished rows this run (output version "
                             f"{writer.version}); rerun the same command to resume") from None
    else:
        from captioning.engine import run_engine

        run_engine(cfg, prompts, src, done, writer, summary, stored)
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
