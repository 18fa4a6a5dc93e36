"""Edit-pair input readers (stage 2, TI2I): Parquet, Lance, JSON-lines or WebDataset ``.tar``.

Every input pair becomes one row of :data:`PAIR_ITEM_SCHEMA`: a stable ``id`` (sha1 of source +
key, :func:`curation.readers.make_id`), the source and target image as bytes or paths, the
instruction in English and/or Chinese, optional source/target captions and an optional edit
category. Column names are found among common spellings (InstructPix2Pix, MagicBrush, …) or given
explicitly with :class:`PairColumns`; a table that lacks the source image, the target image or an
instruction stops before any work, naming what is missing. Files are *units* (one per Parquet
file, tar shard, JSON-lines file or Lance fragment) that Ray tasks expand into rows.

WebDataset samples group members by key: ``<key>.source.jpg`` / ``<key>.target.png`` (or
``src``/``input`` and ``tgt``/``edited``/``output``), with the instruction and captions in
``<key>.json`` (the same field names as table columns) or ``<key>.instruction.txt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa

from common.typed_config import ConfigError

from . import readers
from .readers import IMAGE_EXTS, drop_done, make_id  # noqa: F401 - drop_done: resume, as for images

PAIR_ITEM_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("source_data", pa.large_binary()),
    pa.field("source_path", pa.string()),  # read by the worker when source_data is null
    pa.field("target_data", pa.large_binary()),
    pa.field("target_path", pa.string()),
    pa.field("instruction_en", pa.string()),
    pa.field("instruction_zh", pa.string()),
    pa.field("source_caption", pa.string()),
    pa.field("target_caption", pa.string()),
    pa.field("category", pa.string()),
    pa.field("error", pa.string()),  # the pair could not even be read (corrupt tar member, no image)
])

# field -> accepted spellings, first match wins. *_image columns hold bytes (or HF Image structs).
CANDIDATES: dict[str, tuple[str, ...]] = {
    "source_image": ("source_image", "src_image", "input_image", "original_image", "source", "src", "input"),
    "source_path": ("source_path", "src_path", "input_path", "original_path", "source_file"),
    "target_image": ("target_image", "tgt_image", "edited_image", "output_image", "target", "tgt", "edited", "output"),
    "target_path": ("target_path", "tgt_path", "edited_path", "output_path", "target_file"),
    "instruction_en": ("instruction_en", "instruction", "edit_instruction", "edit_prompt", "edit", "prompt"),
    "instruction_zh": ("instruction_zh", "instruction_cn", "edit_instruction_zh"),
    "source_caption": ("source_caption", "input_caption", "original_caption", "caption_source"),
    "target_caption": ("target_caption", "output_caption", "edited_caption", "caption_target"),
    "category": ("category", "edit_type", "edit_category", "task", "type"),
    "key": ("key", "id", "__key__", "pair_id"),
}
TAR_SOURCE = ("source", "src", "input", "original")
TAR_TARGET = ("target", "tgt", "edited", "output")


@dataclass(frozen=True)
class PairColumns:
    """Explicit column names (``None`` = find among :data:`CANDIDATES`)."""

    source_image: str | None = None
    source_path: str | None = None
    target_image: str | None = None
    target_path: str | None = None
    instruction_en: str | None = None
    instruction_zh: str | None = None
    source_caption: str | None = None
    target_caption: str | None = None
    category: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class PairSource:
    kind: str  # parquet | lance | jsonl | tar
    root: str
    units: tuple[str, ...]  # files, or Lance fragment ids
    columns: PairColumns = PairColumns()


def resolve_columns(names: list[str], given: PairColumns | None = None, flag: str = "--pairs") -> PairColumns:
    """Map each field to a column; ConfigError naming every missing required field, before any work."""
    given, have = given or PairColumns(), set(names)
    out = {}
    for f in fields(PairColumns):
        explicit = getattr(given, f.name)
        if explicit is not None and explicit not in have:
            raise ConfigError(f"{flag}: column '{explicit}' (for {f.name}) not in the input ({', '.join(names)})")
        out[f.name] = explicit or next((c for c in CANDIDATES[f.name] if c in have), None)
    cols = PairColumns(**out)
    missing = []
    if not (cols.source_image or cols.source_path):
        missing.append("the source image (one of: " + ", ".join(CANDIDATES["source_image"] + CANDIDATES["source_path"]) + ")")
    if not (cols.target_image or cols.target_path):
        missing.append("the target image (one of: " + ", ".join(CANDIDATES["target_image"] + CANDIDATES["target_path"]) + ")")
    if not (cols.instruction_en or cols.instruction_zh):
        missing.append("an instruction (one of: " + ", ".join(CANDIDATES["instruction_en"] + CANDIDATES["instruction_zh"]) + ")")
    if missing:
        raise ConfigError(f"{flag}: missing column(s) for {'; '.join(missing)}; input columns: {', '.join(names)}")
    return cols


def resolve_pairs(spec: str, columns: PairColumns | None = None) -> PairSource:
    """What ``--pairs`` is (a file or a folder of them); checks the columns of the first file."""
    if not spec:
        raise ConfigError("--pairs is required")
    p = Path(spec).expanduser()
    if spec.rstrip("/").endswith(".lance"):
        import lance

        try:
            ds = lance.dataset(spec)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--pairs: cannot open Lance table {spec}: {e}") from None
        cols = resolve_columns(ds.schema.names, columns)
        return PairSource("lance", spec, tuple(str(f.fragment_id) for f in ds.get_fragments()), cols)
    if not p.exists():
        raise ConfigError(f"--pairs: no such file or directory: {spec}")
    files = [p] if p.is_file() else sorted(Path(r) / f for r, _, fs in os.walk(p) for f in fs)
    by_kind = {k: tuple(str(f) for f in files if f.suffix.lower() in exts)
               for k, exts in (("parquet", {".parquet"}), ("jsonl", {".jsonl", ".ndjson"}), ("tar", {".tar"}))}
    kinds = [k for k, v in by_kind.items() if v]
    if len(kinds) != 1:
        raise ConfigError(f"--pairs: {spec} must hold one kind of pair file (.parquet, .jsonl, .tar or a .lance "
                          f"table); found {', '.join(kinds) or 'none'}")
    kind, units = kinds[0], by_kind[kinds[0]]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return PairSource(kind, str(p.resolve()), units, resolve_columns(pq.read_schema(units[0]).names, columns))
    if kind == "jsonl":
        with open(units[0], encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), None)
        if first is None:
            raise ConfigError(f"--pairs: {units[0]} is empty")
        try:
            names = list(json.loads(first))
        except (ValueError, TypeError):
            raise ConfigError(f"--pairs: {units[0]}: the first line is not a JSON object") from None
        return PairSource(kind, str(p.resolve()), units, resolve_columns(names, columns))
    return PairSource(kind, str(p.resolve()), units, columns or PairColumns())


# --------------------------------------------------------------------------- units -> rows
def _text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", errors="replace")
    v = str(v).strip()
    return v or None


def _rows(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=PAIR_ITEM_SCHEMA)


def _record(id_: str, uri: str, **kw) -> dict:
    rec = dict.fromkeys(PAIR_ITEM_SCHEMA.names)
    rec.update(id=id_, uri=uri, **{k: v for k, v in kw.items() if v is not None})
    for side in ("source", "target"):
        if rec[f"{side}_data"] is None and rec[f"{side}_path"] is None and rec["error"] is None:
            rec["error"] = f"no {side} image bytes or path"
    return rec


def _from_columns(batch: dict[str, list], n: int, cols: PairColumns, source: str, uri_prefix: str,
                  base_dir: str | None, offset: int) -> list[dict]:
    def col(name):
        c = getattr(cols, name)
        return batch[c] if c else [None] * n

    out = []
    src_b, tgt_b, src_p, tgt_p = col("source_image"), col("target_image"), col("source_path"), col("target_path")
    en, zh, sc, tc, cat, keys = (col(f) for f in ("instruction_en", "instruction_zh", "source_caption",
                                                   "target_caption", "category", "key"))

    def path(v):
        v = _text(v)
        return v if v is None or os.path.isabs(v) or base_dir is None else os.path.join(base_dir, v)

    def data(v):
        if isinstance(v, dict):  # Hugging Face datasets' Image(): {bytes, path}
            v = v.get("bytes")
        return bytes(v) if v is not None else None

    for i in range(n):
        key = str(keys[i]) if keys[i] is not None else str(offset + i)
        out.append(_record(make_id(source, key), f"{uri_prefix}#{key}", source_data=data(src_b[i]),
                           target_data=data(tgt_b[i]), source_path=path(src_p[i]), target_path=path(tgt_p[i]),
                           instruction_en=_text(en[i]), instruction_zh=_text(zh[i]), source_caption=_text(sc[i]),
                           target_caption=_text(tc[i]), category=_text(cat[i])))
    return out


def _wanted(cols: PairColumns) -> list[str]:
    return [c for c in (getattr(cols, f.name) for f in fields(PairColumns)) if c]


def expand_parquet(path: str, cols: PairColumns, batch_rows: int = 256,
                   part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """Rows of a Parquet file, or of its row groups ``part`` = [start, stop) (a work unit)."""
    offset, batches = readers.parquet_batches(path, _wanted(cols), batch_rows, part)  # keyless ids: row in file
    for rb in batches:
        yield _rows(_from_columns(rb.to_pydict(), rb.num_rows, cols, path, path, os.path.dirname(path), offset))
        offset += rb.num_rows


def expand_lance(uri: str, fragment_id: str, cols: PairColumns, batch_rows: int = 256,
                 part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """Rows of a Lance fragment, or of its rows ``part`` = [start, stop) (a work unit)."""
    src = uri if cols.key else f"{uri}/fragment={fragment_id}"  # (fragment, offset) without a key column
    offset, batches = readers.lance_batches(uri, fragment_id, _wanted(cols), batch_rows, part)
    for rb in batches:
        yield _rows(_from_columns(rb.to_pydict(), rb.num_rows, cols, src, src, None, offset))
        offset += rb.num_rows


def expand_jsonl(path: str, cols: PairColumns, batch_rows: int = 256) -> Iterator[pa.Table]:
    """One pair per line; a line that is not a JSON object is a row with an error (line number as key)."""
    buf: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                buf.append(_record(make_id(path, str(lineno)), f"{path}#{lineno}", error=f"bad JSON line: {e}"))
            else:
                batch = {c: [obj.get(c)] for c in _wanted(cols)}
                buf += _from_columns(batch, 1, cols, path, path, os.path.dirname(path), lineno)
            if len(buf) >= batch_rows:
                yield _rows(buf)
                buf = []
    if buf:
        yield _rows(buf)


_TEXT_MEMBERS = {"txt": "instruction", "instruction.txt": "instruction", "instruction_en.txt": "instruction_en",
                 "instruction_zh.txt": "instruction_zh", "json": "json"}


def _member_role(ext: str) -> str | None:
    """Member extension (after the key) -> its role: ``source.jpg`` -> source_data,
    ``target.png`` -> target_data, ``json`` / ``instruction.txt`` / ``txt`` -> text; else None."""
    stem, _, last = ext.rpartition(".")
    if "." + last in IMAGE_EXTS:
        return "source_data" if stem in TAR_SOURCE else "target_data" if stem in TAR_TARGET else None
    return _TEXT_MEMBERS.get(ext)


def expand_tar(shard: str, batch_rows: int = 256, part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """WebDataset shard (or the byte range ``part`` of it) -> pair rows; a shard that breaks
    mid-way yields the pairs read so far plus one row naming the error."""
    groups, error = readers.tar_samples(shard, _member_role, part)
    buf: list[dict] = []
    for key, m in groups.items():
        meta: dict = {}
        if "json" in m:
            try:
                meta = json.loads(m["json"])
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}

        def pick(field, meta=meta):
            return next((meta[c] for c in CANDIDATES[field] if c in meta), None)

        buf.append(_record(make_id(shard, key), f"{shard}#{key}", source_data=m.get("source_data"),
                           target_data=m.get("target_data"),
                           instruction_en=_text(m.get("instruction") or m.get("instruction_en") or pick("instruction_en")),
                           instruction_zh=_text(m.get("instruction_zh") or pick("instruction_zh")),
                           source_caption=_text(pick("source_caption")), target_caption=_text(pick("target_caption")),
                           category=_text(pick("category"))))
        if len(buf) >= batch_rows:
            yield _rows(buf)
            buf = []
    if error:
        buf.append(_record(make_id(shard, readers.shard_error_key(part)), shard, error=error))
    if buf:
        yield _rows(buf)


def expand_unit(source: PairSource, unit: str, batch_rows: int = 256,
                part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """Rows of one unit (a file, shard or fragment; ``part``: the [start, stop) of :func:`curation.readers.work_units`)."""
    part = part if part and part[0] >= 0 else None
    if source.kind == "parquet":
        return expand_parquet(unit, source.columns, batch_rows, part)
    if source.kind == "lance":
        return expand_lance(source.root, unit, source.columns, batch_rows, part)
    if source.kind == "jsonl":
        return expand_jsonl(unit, source.columns, batch_rows)
    if source.kind == "tar":
        return expand_tar(unit, batch_rows, part)
    raise ValueError(source.kind)


def read_pair_images(row: dict) -> tuple[bytes | None, bytes | None, str | None]:
    """(source bytes, target bytes, error naming the image that could not be read) for one item."""
    out, err = [], None
    for side in ("source", "target"):
        data = row.get(f"{side}_data")
        if data is None and row.get(f"{side}_path"):
            try:
                with open(row[f"{side}_path"], "rb") as f:
                    data = f.read()
            except OSError as e:
                err = err or f"{side}: unreadable file: {type(e).__name__}: {e.strerror or e}"
        out.append(data)
    return out[0], out[1], err
