"""Reading a curated table: what downstream jobs (captioning, flywheel, trainer) call.

The ``image`` column is a Lance blob column: a plain scan returns blob descriptors, not bytes, so
score scans stay cheap. :func:`read_kept` pins the table version it read (record it downstream) and
:func:`read_images` materialises the bytes of selected rows with Lance's batched blob reader.
"""

from __future__ import annotations

import lance
import pyarrow as pa

from .schema import COLUMNS_WITHOUT_IMAGE


def open_curated(uri: str, version: int | None = None, storage_options: dict | None = None):
    return lance.dataset(uri, version=version, storage_options=storage_options)


def read_kept(uri: str, columns: list[str] | None = None, version: int | None = None,
              storage_options: dict | None = None) -> tuple[pa.Table, int]:
    """Kept rows (``keep = true``) with their ``_rowid`` and the version read, e.g.
    ``rows, v = read_kept(uri, ["id", "caption"])``; pass ``rows["_rowid"]`` to :func:`read_images`."""
    ds = open_curated(uri, version, storage_options)
    cols = columns or COLUMNS_WITHOUT_IMAGE
    t = ds.to_table(columns=cols, filter="keep = true", with_row_id=True)
    return t, ds.version


def read_images(ds_or_uri, row_ids, version: int | None = None) -> list[bytes | None]:
    """JPEG bytes of the stored (decoded, upright, working-size) images for ``row_ids``, in order."""
    ds = lance.dataset(ds_or_uri, version=version) if isinstance(ds_or_uri, str) else ds_or_uri
    ids = row_ids.to_pylist() if hasattr(row_ids, "to_pylist") else list(row_ids)
    if not ids:
        return []
    got = dict(ds.read_blobs("image", ids=ids, preserve_order=True))
    return [got.get(i) for i in ids]


def load_image(data: bytes, rotate: int = 0, short_side: int | None = None):
    """Stored image bytes -> upright RGB ``PIL.Image``: the same decoder as scoring (EXIF orientation,
    CMYK/16-bit/palette/alpha normalisation), the row's ``rotate`` decision applied, and, with
    ``short_side``, decoded at reduced size (JPEG draft). Raises ValueError for undecodable bytes."""
    from .decode import decode

    d = decode(data, short_side or 1 << 30, max_pixels=1 << 40)
    if d.error:
        raise ValueError(d.error)
    return d.image.rotate(rotate, expand=True) if rotate else d.image
