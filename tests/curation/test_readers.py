"""Readers: folder (recursive, any name, case-insensitive extension), WebDataset tar, Parquet,
Lance; stable ids; nothing dropped."""

from __future__ import annotations

import io
import tarfile

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import samples
from curation.config import ConfigError
from curation.readers import expand_unit, list_folder, resolve_input


def test_folder_lists_every_image_at_any_depth_and_name(sample_dir):
    root, notes = sample_dir
    t = list_folder(str(root))
    rels = {u[len(str(root)) + 1:] for u in t.column("uri").to_pylist()}
    assert rels == set(notes)  # notes.md and the .txt sidecars are not images
    assert "nested/déjà vu/tiny photo (1).png" in rels and "UPPER/PHOTO.JPEG" in rels
    assert "nested/wide $weird 'name'.jpg" in rels
    assert len(set(t.column("id").to_pylist())) == t.num_rows
    assert list_folder(str(root)).column("id").to_pylist() == t.column("id").to_pylist()  # stable
    caps = dict(zip(rels, t.column("caption_path").to_pylist(), strict=False))
    assert sum(c is not None for c in caps.values()) == t.num_rows - 1  # no_caption.jpg has none


def _tar(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_webdataset_tar_groups_by_key(tmp_path):
    im = samples.jpeg(dict(samples.real_photos())["coffee"])
    shard = _tar(tmp_path / "00000.tar", {
        "a/0001.jpg": im, "a/0001.txt": b"a cup", "a/0002.png": samples.png(dict(samples.real_photos())["moon"]),
        "a/0002.json": b'{"caption": "the moon"}', "a/0003.txt": b"caption without image",
    })
    src = resolve_input(str(tmp_path))
    assert src.kind == "tar" and src.units == (shard,)
    rows = pa.concat_tables(list(expand_unit(src, shard))).to_pylist()
    by = {r["uri"].split("#")[1]: r for r in rows}
    assert by["a/0001"]["caption"] == "a cup" and by["a/0001"]["data"] == im
    assert by["a/0002"]["caption"] == "the moon"
    assert by["a/0003"]["error"] == "sample has no image member"


def test_truncated_tar_keeps_what_it_read_and_says_so(tmp_path):
    im = samples.jpeg(dict(samples.real_photos())["coffee"])
    shard = _tar(tmp_path / "s.tar", {f"{i:04d}.jpg": im for i in range(4)})
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    src = resolve_input(shard)
    rows = pa.concat_tables(list(expand_unit(src, shard))).to_pylist()
    assert any(r["error"] and "tar shard unreadable" in r["error"] for r in rows)


def test_parquet_and_lance_inputs_with_bytes_and_caption(tmp_path):
    ims = [samples.jpeg(im) for _, im in samples.real_photos()[:3]]
    t = pa.table({"jpg": pa.array(ims, pa.binary()), "caption": ["a", "b", None], "key": ["k0", "k1", "k2"]})
    pq.write_table(t, tmp_path / "part-0.parquet")
    src = resolve_input(str(tmp_path / "part-0.parquet"))
    assert src.kind == "parquet" and src.columns.image == "jpg" and src.columns.key == "key"
    rows = pa.concat_tables(list(expand_unit(src, src.units[0])))
    assert rows.column("data").to_pylist() == ims and rows.column("caption").to_pylist() == ["a", "b", None]
    lance.write_dataset(t, tmp_path / "in.lance")
    lsrc = resolve_input(str(tmp_path / "in.lance"))
    lrows = pa.concat_tables([b for u in lsrc.units for b in expand_unit(lsrc, u)])
    assert sorted(lrows.column("uri").to_pylist()) == sorted(f"{tmp_path / 'in.lance'}#k{i}" for i in range(3))


def test_bad_inputs_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--input: no such file or directory"):
        resolve_input(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--input: no images"):
        resolve_input(str(tmp_path / "empty"))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="--image-column or --path-column"):
        resolve_input(str(tmp_path / "bad.parquet"))


def test_work_units_split_a_shard_file_and_fragment_with_the_same_rows(tmp_path):
    """One tar shard, Parquet file or Lance fragment is planned as several work units of about
    ``rows_per_unit`` rows (from headers / footers / row counts, no image read), and reading the
    units gives exactly the rows of a whole read: same ids, bytes, captions, order. A tar sample
    whose members are not adjacent is never cut apart."""
    from curation.readers import pack, work_units

    ims = [samples.jpeg(im) for _, im in samples.real_photos()[:3]]
    members = {f"{i:04d}.{ext}": data for i in range(7)
               for ext, data in (("jpg", ims[i % 3]), ("txt", f"cap {i}".encode()))}
    members["0002.json"] = b'{"caption": "late member of sample 2"}'  # sample 2 spans to the end
    _tar(tmp_path / "s.tar", members)
    t = pa.table({"jpg": pa.array([ims[i % 3] for i in range(7)], pa.binary()), "caption": [f"c{i}" for i in range(7)]})
    pq.write_table(t, tmp_path / "p.parquet", row_group_size=2)
    lance.write_dataset(t, tmp_path / "one.lance")
    for spec in ("s.tar", "p.parquet", "one.lance"):
        src = resolve_input(str(tmp_path / spec))
        assert len(src.units) == 1
        parts = work_units(src, 2)
        split = [r for u, a, b, _ in parts for tb in expand_unit(src, u, 8, (a, b)) for r in tb.to_pylist()]
        whole = [r for tb in expand_unit(src, src.units[0], 8) for r in tb.to_pylist()]
        assert len(whole) == 7 and len({r["id"] for r in whole}) == 7, spec
        assert sorted(split, key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"]), spec
        assert len(parts) >= 2 and sum(n for *_, n in parts) == 7, spec
        assert len(pack(parts, 2)) == len(parts)  # units already a batch: one per task
    tar_parts = work_units(resolve_input(str(tmp_path / "s.tar")), 2)
    assert len(tar_parts) == 2  # 0000-0001 | 0002 ... 0006 (sample 2's json is the last member)
    assert pack([("a", 0, 1, 1), ("b", 0, 1, 1), ("c", 0, 3, 3), ("d", -1, -1, -1)], 2) == [
        [("a", 0, 1), ("b", 0, 1)], [("c", 0, 3)], [("d", -1, -1)]]
