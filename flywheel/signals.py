"""Signals in: evaluation results, mined bad cases and user feedback -> the `cases` table.

One record format for the three sources (JSON-lines, Parquet or Lance rows)::

    {"source": "eval", "prompt": "...", "task": "t2i", "benchmark": "geneval", "metric": "score",
     "score": 0.31, "checkpoint": "ckpt-12"}
    {"source": "bad_case", "prompt": "...", "complaint": "the zebra has five legs", "generated_image": "img/1.png"}
    {"source": "feedback", "prompt": "...", "rating": 1, "complaint": "...", "generated_image": "data:image/png;base64,...",
     "source_image": "...", "task": "ti2i"}

Images are bytes (Parquet/Lance), a ``data:`` URI, or a path relative to the signal file. A record
that fails validation becomes a `signal_rejects` row with the reason (never a crash, never silently
dropped). A case's id hashes its identity fields (not its delivery details, which go to ``extra``),
so the same case arriving twice — in one file or on another night — is one row.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from flywheel.config import FailureRule, SignalSource
from flywheel.schema import CASES, SIGNAL_REJECTS, SOURCES, TASKS
from flywheel.store import open_table, sha1, upsert

MAX_IMAGE_BYTES = 64 << 20


class Signal(BaseModel):
    """One validated record; unknown fields are kept in `extra`."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)
    source: str
    prompt: str = Field(min_length=1, max_length=20_000)
    task: str = "t2i"
    category: str | None = None
    benchmark: str | None = None
    metric: str | None = None
    score: float | None = None
    checkpoint: str | None = None
    rating: float | None = Field(default=None, ge=0, le=10)
    complaint: str | None = None
    generated_image: bytes | None = None
    source_image: bytes | None = None

    @field_validator("source", "task")
    @classmethod
    def _choice(cls, v: str, info: ValidationInfo) -> str:
        allowed = {"source": SOURCES, "task": TASKS}[info.field_name]
        if v not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return v

    @field_validator("category")
    @classmethod
    def _category(cls, v: str | None) -> str | None:
        return v.lower() if v else None

    @model_validator(mode="after")
    def _per_source(self) -> Signal:
        if self.source == "eval" and (self.score is None or not self.metric):
            raise ValueError("an eval record needs metric and score")
        if self.source == "feedback" and self.rating is None and not self.complaint:
            raise ValueError("a feedback record needs a rating or a complaint")
        return self

    def case_id(self) -> str:
        img = [hashlib.sha1(b).hexdigest() if b else None for b in (self.generated_image, self.source_image)]
        ident = [self.source, self.task, " ".join(self.prompt.split()), self.category, self.benchmark,
                 self.metric, self.score, self.checkpoint, self.rating, self.complaint, *img]
        return sha1(*ident)

    def failed(self, rule: FailureRule) -> bool:
        """The failure decision, from the config (not stored: a new pass mark re-decides)."""
        return failed(self.source, self.metric, self.score, self.rating, rule)


def failed(source: str, metric: str | None, score: float | None, rating: float | None, rule: FailureRule) -> bool:
    if source == "eval":
        return score is not None and score < rule.pass_marks.get(metric or "", rule.eval_pass_mark)
    if source == "feedback":
        return rating is None or rating <= rule.feedback_fail_rating
    return True  # a mined bad case is a failure by definition


def _image(value: Any, base: Path) -> bytes | None:
    """bytes | data: URI | path relative to the signal file -> bytes; ValueError says why not."""
    if value is None or isinstance(value, bytes | bytearray):
        return bytes(value) if value is not None else None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected bytes, a data: URI or a path, got {type(value).__name__}")
    if value.startswith("data:"):
        try:
            return base64.b64decode(value.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as e:
            raise ValueError(f"bad data: URI ({e})") from None
    p = Path(value) if os.path.isabs(value) else base / value
    if not p.is_file():
        raise ValueError(f"no such image file: {value}")
    if p.stat().st_size > MAX_IMAGE_BYTES:
        raise ValueError(f"image file over {MAX_IMAGE_BYTES >> 20} MiB: {value}")
    return p.read_bytes()


def _records(path: str) -> tuple[list[tuple[str, Any]], list[tuple[str, str, str]]]:
    """(origin, record) pairs of a file, and (origin, reason, raw) for what cannot be read at all."""
    p = Path(path)
    ext = p.suffix.lower()
    try:
        if ext in (".jsonl", ".json", ".ndjson"):
            out, bad = [], []
            with open(p, encoding="utf-8", errors="replace") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        out.append((f"{p}#{i}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        bad.append((f"{p}#{i}", f"not JSON: {e.msg} at column {e.colno}", line[:4096]))
            return out, bad
        if ext == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()
        elif ext == ".lance" or p.is_dir():
            import lance

            ds = lance.dataset(str(p))
            blobs = [f.name for f in ds.schema if (f.metadata or {}).get(b"lance-encoding:blob")]
            t = ds.to_table(columns=[f.name for f in ds.schema if f.name not in blobs], with_row_id=True)
            rows = t.drop(["_rowid"]).to_pylist()
            for b in blobs:
                got = dict(ds.read_blobs(b, ids=t["_rowid"].to_pylist(), preserve_order=True))
                for r, rid in zip(rows, t["_rowid"].to_pylist(), strict=True):
                    r[b] = got.get(rid)
        else:
            return [], [(str(p), f"unknown signal file type {ext!r} (.jsonl, .parquet, .lance)", "")]
    except Exception as e:  # an unreadable file is one rejected row, never a crashed night
        return [], [(str(p), f"cannot read file: {type(e).__name__}: {str(e)[:300]}", "")]
    return [(f"{p}#{i}", r) for i, r in enumerate(rows)], []


def _raw(record: Any) -> str:
    return json.dumps(record, default=lambda b: f"<{len(b)} bytes>" if isinstance(b, bytes) else str(b),
                      ensure_ascii=False)[:4096]


def _reason(e: ValidationError) -> str:
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "record"
    return f"{loc}: {first['msg']}" + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else "")


def parse(origin: str, record: Any, default_source: str, base: Path) -> tuple[dict | None, str | None]:
    """A cases row, or the reason the record is rejected."""
    if not isinstance(record, dict):
        return None, f"record: expected a JSON object, got {type(record).__name__}"
    rec = {"source": default_source, **record}
    try:
        for k in ("generated_image", "source_image"):
            try:
                rec[k] = _image(rec.get(k), base)
            except ValueError as e:
                return None, f"{k}: {e}"
        s = Signal.model_validate(rec)
    except ValidationError as e:
        return None, _reason(e)
    row = s.model_dump(exclude=set(s.model_extra or {}))
    row.update(case_id=s.case_id(), origin=origin,
               extra=json.dumps(s.model_extra, sort_keys=True, default=str, ensure_ascii=False) if s.model_extra else None)
    return row, None


@dataclass
class IngestSummary:
    files: int = 0
    records: int = 0
    new_cases: int = 0
    duplicates: int = 0
    rejected: int = 0
    new_rejects: int = 0

    def text(self) -> str:
        return (f"signals: {self.files} files, {self.records} records -> {self.new_cases} new cases, "
                f"{self.duplicates} already known or repeated, {self.rejected} rejected ({self.new_rejects} new)")


def read_signals(sources: dict[str, SignalSource]) -> tuple[list[dict], list[dict], int]:
    """All records of all configured inputs -> (case rows, reject rows, files read)."""
    cases, rejects, files = [], [], 0
    for spec in sources.values():
        for path in sorted(glob.glob(spec.path)) if any(c in spec.path for c in "*?[") else \
                ([spec.path] if os.path.exists(spec.path) else []):
            files += 1
            records, bad = _records(path)
            base = Path(path).parent
            for origin, rec in records:
                row, reason = parse(origin, rec, spec.source, base)
                if row is not None:
                    cases.append(row)
                else:
                    bad.append((origin, reason, _raw(rec)))
            rejects += [{"reject_id": sha1(o, raw), "origin": o, "reason": why, "raw": raw} for o, why, raw in bad]
    return cases, rejects, files


def ingest(db, sources: dict[str, SignalSource]) -> IngestSummary:
    """Read every signal input; add new cases and new rejects (one commit each, none when nothing new)."""
    cases, rejects, files = read_signals(sources)
    now = datetime.now(UTC)
    s = IngestSummary(files=files, records=len(cases) + len(rejects), rejected=len(rejects))
    uniq = {r["case_id"]: r for r in reversed(cases)}  # first arrival wins
    for r in uniq.values():
        r["received_at"] = now
    for r in rejects:
        r["received_at"] = now
    s.new_cases = upsert(open_table(db, "cases"), pa.Table.from_pylist(list(uniq.values()), schema=CASES))
    s.duplicates = len(cases) - s.new_cases
    s.new_rejects = upsert(open_table(db, "signal_rejects"),
                           pa.Table.from_pylist(list({r["reject_id"]: r for r in rejects}.values()),
                                                schema=SIGNAL_REJECTS))
    return s
