"""The flywheel's LanceDB database: open tables by their schema, write only what changed.

Lance's ``merge_insert`` commits a new version even when it inserts nothing, so :func:`upsert` first
reads the keys (and the compared columns) already there and sends only new or changed rows: a rerun
on the same inputs writes nothing and the table version stays the same. Each call is one commit, so a
killed job leaves every table at a consistent version and a rerun finishes the missing writes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

import lancedb
import pyarrow as pa

from flywheel.schema import KEYS, TABLES


def storage_options(uri: str) -> dict | None:
    try:  # SCALE's object-store settings (AWS_ENDPOINT_URL, keys...) when the module is there
        from common.storage import storage_options as so
    except ImportError:
        return None
    return so(uri)


def sha1(*parts: object, n: int = 20) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:n]


def connect(uri: str) -> lancedb.DBConnection:
    return lancedb.connect(uri, storage_options=storage_options(uri))


def open_table(db: lancedb.DBConnection, name: str, schema: pa.Schema | None = None):
    """The table, created empty with ``schema`` (default: flywheel.schema.TABLES[name]) if missing."""
    if name in db.list_tables().tables:
        return db.open_table(name)
    return db.create_table(name, schema=schema if schema is not None else TABLES[name], exist_ok=True)


def read(tbl, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
    """Non-blob columns of a LanceDB table (blob columns are read by id with :func:`read_blobs`)."""
    ds = tbl.to_lance()
    if columns is None:
        columns = [f.name for f in ds.schema if not (f.metadata or {}).get(b"lance-encoding:blob")]
    return ds.to_table(columns=columns, filter=where)


def _in_list(values: Iterable[str]) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def existing(tbl, key: str, keys: list[str], columns: tuple[str, ...] = ()) -> pa.Table:
    """Rows of ``tbl`` whose key is in ``keys`` (key + ``columns`` only), chunked IN filters."""
    parts = [tbl.to_lance().to_table(columns=[key, *columns], filter=f"{key} IN ({_in_list(keys[i:i + 2000])})")
             for i in range(0, len(keys), 2000)]
    return pa.concat_tables(parts) if parts else pa.table({key: pa.array([], pa.string())})


def upsert(tbl, rows: pa.Table, compare: tuple[str, ...] = (), key: str | None = None) -> int:
    """Insert rows with new keys; update existing rows whose ``compare`` columns differ. Returns rows
    written; writes (and versions) nothing when nothing is new."""
    if rows.num_rows == 0:
        return 0
    key = key or KEYS[tbl.name]
    schema = TABLES.get(tbl.name, rows.schema)  # tbl.schema shows blob columns as descriptors
    rows = rows.select(schema.names).cast(schema)
    old = existing(tbl, key, rows[key].to_pylist(), compare)
    known = {k: tuple(r) for k, *r in zip(*(old[c].to_pylist() for c in [key, *compare]), strict=True)} \
        if old.num_rows else {}
    keep = [k not in known or (bool(compare) and known[k] != tuple(rows[c][i].as_py() for c in compare))
            for i, k in enumerate(rows[key].to_pylist())]
    rows = rows.filter(pa.array(keep))
    if rows.num_rows == 0:
        return 0
    merge = tbl.merge_insert(key).when_not_matched_insert_all()
    if compare:
        merge = merge.when_matched_update_all()
    merge.execute(rows)
    return rows.num_rows


def delete_keys(tbl, keys: list[str]) -> int:
    if not keys:
        return 0
    key = KEYS[tbl.name]
    present = existing(tbl, key, keys)[key].to_pylist()
    if present:
        tbl.delete(f"{key} IN ({_in_list(present)})")
    return len(present)
