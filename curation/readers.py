"""Input readers: an image folder, WebDataset ``.tar`` shards, Parquet files or a Lance table —
on local disk or an object store (``s3://``; credentials from the environment, ``common.storage``).

Every item becomes one row ``(id, uri, caption, path, caption_path, data)`` where ``id`` is
``sha1(source + key)`` — stable across runs, so a rerun can skip what is already committed — and
``uri`` says where the item came from. Folders are listed in the driver (a listing is small); tar
shards, Parquet files and Lance fragments are *units* that Ray tasks expand into rows, so the driver
never holds image bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from common import storage

from .config import ConfigError

IMAGE_EXTS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp", ".png", ".gif", ".bmp", ".dib", ".webp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".jp2", ".j2k", ".avif",
})
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes", "bytes", "img")
PATH_COLUMNS = ("path", "image_path", "file", "filepath", "file_path")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt", "alt")
KEY_COLUMNS = ("key", "id", "__key__")

ITEM_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("uri", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("path", pa.string()),  # read by the scoring worker when `data` is null
    pa.field("caption_path", pa.string()),  # a sidecar .txt/.json next to a folder image
    pa.field("data", pa.large_binary()),
    pa.field("error", pa.string()),  # an item that could not even be read (corrupt tar member)
])


def make_id(source: str, key: str) -> str:
    return hashlib.sha1(f"{source}\n{key}".encode("utf-8", "surrogatepass")).hexdigest()[:20]


@dataclass(frozen=True)
class Columns:
    image: str | None = None
    path: str | None = None
    caption: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class Source:
    kind: str  # folder | tar | parquet | lance
    root: str
    units: tuple[str, ...]  # tar shards / parquet files / lance fragment ids ("" for folders)
    columns: Columns = Columns()


def _remote_files(spec: str) -> tuple[bool, list[str]]:
    """(is a single object, every object URI under ``spec``) on an object store."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(spec)
    scheme = spec.split("://", 1)[0]
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return True, [spec]
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    except OSError as e:
        raise ConfigError(f"--input: cannot list {spec}: {e}") from None
    return False, sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File)


def resolve_input(spec: str, columns: Columns | None = None) -> Source:
    """Work out what ``--input`` is (a local path or an ``s3://`` URI); raise a one-line
    ConfigError for a missing or empty input."""
    columns = columns or Columns()
    if not spec:
        raise ConfigError("--input is required")
    remote = storage.is_remote(spec)
    p = Path(spec).expanduser()
    if spec.rstrip("/").endswith(".lance"):
        import lance

        if not remote and not p.exists():
            raise ConfigError(f"--input: no such Lance table: {spec}")
        try:
            ds = lance.dataset(spec, storage_options=storage.storage_options(spec))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--input: cannot open Lance table {spec}: {e}") from None
        if ds.count_rows() == 0:
            raise ConfigError(f"--input: Lance table {spec} is empty")
        cols = _pick_columns(ds.schema, columns, "--input")
        return Source("lance", spec, tuple(str(f.fragment_id) for f in ds.get_fragments()), cols)
    if remote:
        root = spec.rstrip("/")
        is_file, names = _remote_files(root)
        if not names:
            raise ConfigError(f"--input: no such object or prefix: {spec}")
    else:
        if not p.exists():
            raise ConfigError(f"--input: no such file or directory: {spec}")
        root, is_file = str(p.resolve()), p.is_file()
        names = [str(p)] if is_file else [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
    ext = {n: os.path.splitext(n)[1].lower() for n in names}
    tars = sorted(n for n in names if ext[n] == ".tar")
    parquets = sorted(n for n in names if ext[n] == ".parquet")
    images = [n for n in names if ext[n] in IMAGE_EXTS]
    if is_file and not (tars or parquets):
        raise ConfigError(f"--input: {spec} is not a folder, a .tar shard, a .parquet file or a .lance table")
    if parquets and not images and not tars:
        cols = _pick_columns(_parquet_file(parquets[0]).schema_arrow, columns, "--input")
        return Source("parquet", root, tuple(parquets), cols)
    if tars and not images:
        return Source("tar", root, tuple(tars))
    if images:
        return Source("folder", root, ())
    raise ConfigError(f"--input: no images, .tar shards or .parquet files found under {spec}")


def _pick_columns(schema: pa.Schema, given: Columns, flag: str) -> Columns:
    names = set(schema.names)

    def pick(explicit: str | None, candidates: tuple[str, ...], what: str, opt: str) -> str | None:
        if explicit:
            if explicit not in names:
                raise ConfigError(f"{opt}: column '{explicit}' not in the input ({', '.join(schema.names)})")
            return explicit
        return next((c for c in candidates if c in names), None)

    image = pick(given.image, IMAGE_COLUMNS, "image", "--image-column")
    path = None if image else pick(given.path, PATH_COLUMNS, "path", "--path-column")
    if image is None and path is None:
        raise ConfigError(f"{flag}: no image-bytes or path column found (columns: {', '.join(schema.names)}); "
                          "set --image-column or --path-column")
    return Columns(image=image, path=path,
                   caption=pick(given.caption, CAPTION_COLUMNS, "caption", "--caption-column"),
                   key=pick(given.key, KEY_COLUMNS, "key", "--key-column"))


# --------------------------------------------------------------------------- folder
def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """(directory, file names) under a local folder or an object-store prefix."""
    if not storage.is_remote(root):
        for dirpath, _, files in os.walk(root):
            yield dirpath, files
        return
    by_dir: dict[str, list[str]] = {}
    for uri in _remote_files(root)[1]:
        d, name = uri.rsplit("/", 1)
        by_dir.setdefault(d, []).append(name)
    yield from by_dir.items()


def list_folder(root: str) -> pa.Table:
    """Every image file under ``root`` (a folder or an object-store prefix; recursive,
    case-insensitive extension) with its sidecar caption file if one sits beside it (``a.jpg`` +
    ``a.txt`` or ``a.json``, img2dataset style)."""
    ids, uris, paths, cap_paths = [], [], [], []
    remote = storage.is_remote(root)
    for dirpath, files in _walk(root):
        present = set(files)
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            full = f"{dirpath}/{name}" if remote else os.path.join(dirpath, name)
            rel = full[len(root.rstrip("/")) + 1:] if remote else os.path.relpath(full, root)
            side = next((stem + s for s in (".txt", ".json") if stem + s in present), None)
            ids.append(make_id(root, rel))
            uris.append(full)
            paths.append(full)
            cap_paths.append((f"{dirpath}/{side}" if remote else os.path.join(dirpath, side)) if side else None)
    n = len(ids)
    none = pa.nulls(n, pa.string())
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(uris, pa.string()), none, pa.array(paths, pa.string()),
         pa.array(cap_paths, pa.string()), pa.nulls(n, pa.large_binary()), none],
        schema=ITEM_SCHEMA).sort_by("id")


def read_bytes(path: str) -> bytes:
    """A folder item's (or sidecar's) bytes, from a local path or an object-store URI; OSError
    when it cannot be read. Scoring workers call this for rows whose ``data`` is null."""
    return storage.read_bytes(path)


# --------------------------------------------------------------------------- units -> rows
def _rows(buf: dict[str, list]) -> pa.Table:
    return pa.Table.from_pydict(buf, schema=ITEM_SCHEMA)


def _empty_buf() -> dict[str, list]:
    return {f.name: [] for f in ITEM_SCHEMA}


def _add(buf, id_, uri, caption=None, path=None, data=None, error=None):
    for k, v in (("id", id_), ("uri", uri), ("caption", caption), ("path", path), ("caption_path", None),
                 ("data", data), ("error", error)):
        buf[k].append(v)


def read_json_caption(raw: bytes) -> str | None:
    """Caption from a WebDataset/img2dataset ``.json`` sidecar (``caption`` or ``text`` key)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict):
        for k in ("caption", "text", "prompt"):
            if isinstance(obj.get(k), str):
                return obj[k]
    return None


def _decode_text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.decode("utf-8", errors="replace").strip()


@contextmanager
def _open_tar(shard: str, start: int = 0) -> Iterator[tarfile.TarFile]:
    if storage.is_remote(shard):
        fs, path = storage.filesystem(shard)
        # Stream mode: one sequential read of the object, no seeks (remote shards are read whole).
        with fs.open_input_stream(path) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            yield tf
        return
    with open(shard, "rb") as f:
        f.seek(start)  # a work unit's first header: TarFile reads on from the file's position
        with tarfile.open(fileobj=f, mode="r:" if start else "r:*") as tf:
            yield tf


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    if not storage.is_remote(path):
        return pq.ParquetFile(path)
    fs, p = storage.filesystem(path)
    return pq.ParquetFile(fs.open_input_file(p))


def _sample_key(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a WebDataset member: the path up to the first dot of
    the base name; None for hidden files."""
    d, base = os.path.split(name)
    if base.startswith("."):
        return None
    key, _, ext = base.partition(".")
    return os.path.join(d, key), ext.lower()


def tar_samples(shard: str, pick, part: tuple[int, int] | None = None) -> tuple[dict[str, dict[str, bytes]], str | None]:
    """Members of a WebDataset shard grouped by sample key, ``{key: {pick(ext): bytes}}`` (members
    whose ``pick`` is None are not read), and the error that stopped the read, if any. ``part``:
    the byte range [start, stop) of member headers of a work unit (:func:`work_units`)."""
    groups: dict[str, dict[str, bytes]] = {}
    error = None
    try:
        with _open_tar(shard, part[0] if part else 0) as tf:
            for m in tf:
                if part and m.offset >= part[1]:
                    break
                sk = _sample_key(m.name) if m.isfile() else None
                name = pick(sk[1]) if sk else None
                if name is None:
                    continue
                f = tf.extractfile(m)
                groups.setdefault(sk[0], {})[name] = f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"tar shard unreadable after {len(groups)} samples: {type(e).__name__}: {e}"
    return groups, error


def shard_error_key(part: tuple[int, int] | None) -> str:
    """Key of the row that names a broken shard (one per work unit, so ids stay unique)."""
    return "__shard_error__" if not part or part[0] == 0 else f"__shard_error__@{part[0]}"


def expand_tar(shard: str, batch_rows: int = 256, part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """WebDataset shard (or the byte range ``part`` of it) -> rows. Files are grouped by key (path
    up to the first dot of the base name); the image member is the one with an image extension,
    the caption the ``.txt`` (or the ``.json``'s caption). A shard that breaks mid-way yields the
    rows read so far plus one row naming the error, so nothing vanishes silently."""
    groups, error = tar_samples(shard, lambda ext: "." + ext, part)
    buf = _empty_buf()
    for key, members in groups.items():
        img_ext = next((e for e in members if e in IMAGE_EXTS), None)
        caption = _decode_text(members.get(".txt"))
        if caption is None and ".json" in members:
            caption = read_json_caption(members[".json"])
        uri = f"{shard}#{key}"
        if img_ext is None:
            _add(buf, make_id(shard, key), uri, caption, error="sample has no image member")
        else:
            _add(buf, make_id(shard, key), uri, caption, data=members[img_ext])
        if len(buf["id"]) >= batch_rows:
            yield _rows(buf)
            buf = _empty_buf()
    if error:
        _add(buf, make_id(shard, shard_error_key(part)), shard, error=error)
    if buf["id"]:
        yield _rows(buf)


def _table_batches(batches: Iterator[pa.RecordBatch], source: str, uri_prefix: str, cols: Columns,
                   base_dir: str | None, offset: int = 0) -> Iterator[pa.Table]:
    for rb in batches:
        n = rb.num_rows
        keys = (rb.column(cols.key).cast(pa.string()).to_pylist() if cols.key
                else [str(offset + i) for i in range(n)])
        caps = rb.column(cols.caption).cast(pa.string()).to_pylist() if cols.caption else [None] * n
        buf = _empty_buf()
        if cols.image:
            col = rb.column(cols.image)
            if pa.types.is_struct(col.type):  # Hugging Face datasets' Image(): {bytes, path}
                col = pc.struct_field(col, "bytes")
            datas = col.cast(pa.large_binary()).to_pylist()
            paths = [None] * n
        else:
            datas = [None] * n
            paths = [p if p is None or os.path.isabs(p) or storage.is_remote(p) or base_dir is None
                     else storage.join(base_dir, p)
                     for p in rb.column(cols.path).cast(pa.string()).to_pylist()]
        for i in range(n):
            key = keys[i] if keys[i] is not None else str(offset + i)
            _add(buf, make_id(source, key), f"{uri_prefix}#{key}", caps[i], path=paths[i], data=datas[i],
                 error=None if (datas[i] is not None or paths[i] is not None) else "no image bytes or path")
        offset += n
        yield _rows(buf)


def parquet_batches(path: str, columns: list[str], batch_rows: int,
                    part: tuple[int, int] | None = None) -> tuple[int, Iterator[pa.RecordBatch]]:
    """(row offset of the first row in the file, record batches) of a Parquet file, or of its row
    groups ``part`` = [start, stop) (a work unit; a keyless id is the row's place in the file)."""
    f = _parquet_file(path)
    groups = range(*part) if part else range(f.num_row_groups)
    offset = sum(f.metadata.row_group(i).num_rows for i in range(groups.start))
    return offset, f.iter_batches(batch_size=batch_rows, columns=columns, row_groups=groups)


def lance_batches(uri: str, fragment_id: str, columns: list[str], batch_rows: int,
                  part: tuple[int, int] | None = None) -> tuple[int, Iterator[pa.RecordBatch]]:
    """(row offset, record batches) of a Lance fragment, or of its rows ``part`` = [start, stop)."""
    import lance

    frag = lance.dataset(uri, storage_options=storage.storage_options(uri)).get_fragment(int(fragment_id))
    rng = {"offset": part[0], "limit": part[1] - part[0]} if part else {}
    return (part[0] if part else 0), frag.to_batches(columns=columns, batch_size=batch_rows, **rng)


def expand_parquet(path: str, cols: Columns, batch_rows: int = 256,
                   part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    want = [c for c in (cols.image, cols.path, cols.caption, cols.key) if c]
    offset, batches = parquet_batches(path, want, batch_rows, part)
    yield from _table_batches(batches, path, path, cols,
                              path.rsplit("/", 1)[0] if storage.is_remote(path) else os.path.dirname(path), offset)


def expand_lance(uri: str, fragment_id: str, cols: Columns, batch_rows: int = 256,
                 part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    want = [c for c in (cols.image, cols.path, cols.caption, cols.key) if c]
    # Without a key column, (fragment, offset) is stable for an unchanged table version.
    src = uri if cols.key else f"{uri}/fragment={fragment_id}"
    offset, batches = lance_batches(uri, fragment_id, want, batch_rows, part)
    yield from _table_batches(batches, src, src, cols, None, offset)


def expand_unit(source: Source, unit: str, batch_rows: int = 256,
                part: tuple[int, int] | None = None) -> Iterator[pa.Table]:
    """Rows of one unit (a shard, file or fragment), or of its ``part`` [start, stop) planned by
    :func:`work_units` (start < 0: the whole unit)."""
    part = part if part and part[0] >= 0 else None
    if source.kind == "tar":
        return expand_tar(unit, batch_rows, part)
    if source.kind == "parquet":
        return expand_parquet(unit, source.columns, batch_rows, part)
    if source.kind == "lance":
        return expand_lance(source.root, unit, source.columns, batch_rows, part)
    raise ValueError(source.kind)


# --------------------------------------------------------------------------- work units
# A work unit is what one scoring task reads, scores and writes: about ``rows_per_unit`` items, so
# one big file is scored on every core. Planned in the driver from cheap metadata (Parquet footers,
# Lance fragment row counts, tar headers); image bytes never pass through the driver or Ray's
# object store. Ids do not depend on the split (keyless ids are a row's place in its file).
Part = tuple[str, int, int, int]
"""(unit, start, stop, rows): a piece of a unit; start = stop = -1 is the whole unit, rows = -1
when its size is unknown."""


def row_ranges(unit: str, n: int, rows_per_unit: int) -> list[Part]:
    return [(unit, a, min(n, a + rows_per_unit), min(n, a + rows_per_unit) - a) for a in range(0, n, rows_per_unit)]


def tar_ranges(shard: str, rows_per_unit: int) -> list[Part]:
    """Byte ranges of member headers holding about ``rows_per_unit`` samples each, cut only where
    no sample's members lie on both sides (one header pass, no member data read). Remote, compressed
    or unreadable shards are one unit (read whole, as before: a broken shard's rows and error row
    stay those of a whole read)."""
    whole = [(shard, -1, -1, -1)]
    if storage.is_remote(shard):
        return whole
    try:
        with tarfile.open(shard, "r:") as tf:
            members = [(m.offset, _sample_key(m.name) if m.isfile() else None) for m in tf]
    except (tarfile.TarError, OSError, EOFError):
        return whole
    last = {sk[0]: i for i, (_, sk) in enumerate(members) if sk}
    out, start, seen, reach = [], 0, set(), -1
    for i, (off, sk) in enumerate(members):
        if seen and len(seen) >= rows_per_unit and reach < i:  # every sample so far ends before i
            out.append((shard, start, off, len(seen)))
            start, seen = off, set()
        if sk:
            seen.add(sk[0])
            reach = max(reach, last[sk[0]])
    if not out:
        return whole
    return out + [(shard, start, os.path.getsize(shard), len(seen))]


def work_units(source, rows_per_unit: int) -> list[Part]:
    """Pieces of a reader's units (images: :class:`Source`; edit pairs:
    ``pair_readers.PairSource``) of about ``rows_per_unit`` rows: consecutive Parquet row groups (a
    row group is the smallest Parquet read), Lance fragment row ranges, tar member ranges; other
    units (JSON-lines files) whole."""
    out: list[Part] = []
    if source.kind == "parquet":
        for path in source.units:
            meta, start, rows = _parquet_file(path).metadata, 0, 0
            for g in range(meta.num_row_groups):
                rows += meta.row_group(g).num_rows
                if rows >= rows_per_unit or g == meta.num_row_groups - 1:
                    out.append((path, start, g + 1, rows))
                    start, rows = g + 1, 0
        return out
    if source.kind == "lance":
        import lance

        ds = lance.dataset(source.root, storage_options=storage.storage_options(source.root))
        for unit in source.units:
            out += row_ranges(unit, ds.get_fragment(int(unit)).count_rows(), rows_per_unit)
        return out
    if source.kind == "tar":
        return [p for shard in source.units for p in tar_ranges(shard, rows_per_unit)]
    return [(u, -1, -1, -1) for u in source.units]


def pack(parts: list[Part], rows_per_unit: int) -> list[list[tuple[str, int, int]]]:
    """Consecutive small pieces (small files, fragments with few kept rows) together up to about
    ``rows_per_unit`` rows per work unit, so output fragments stay about a batch in size."""
    out: list[list[tuple[str, int, int]]] = []
    rows = rows_per_unit
    for unit, a, b, n in parts:
        if n < 0 or rows + n > rows_per_unit:
            out.append([])
            rows = 0
        out[-1].append((unit, a, b))
        rows = rows_per_unit if n < 0 else rows + n
    return out


def unit_items(parts: str, read, done: pa.Array | None, size: int):
    """The not-yet-committed items of one work unit (``parts``: JSON list of (unit, start, stop),
    :func:`pack`), in batches of exactly ``size`` but the last. ``read(unit, size, (start, stop))``
    yields a unit's rows (the image stages' and stage 2's readers)."""
    pending = None
    for unit, a, b in json.loads(parts):
        for items in read(unit, size, (a, b)):
            items = drop_done(items, done)
            pending = items if pending is None else pa.concat_tables([pending, items])
            while pending.num_rows >= size:
                yield pending.slice(0, size)
                pending = pending.slice(size)
    if pending is not None and pending.num_rows:
        yield pending


def drop_done(rows: pa.Table, done: pa.Array | None) -> pa.Table:
    """Rows whose id is not yet committed to the output (resume)."""
    if done is None or len(done) == 0 or rows.num_rows == 0:
        return rows
    return rows.filter(pc.invert(pc.is_in(rows["id"], value_set=done)))
