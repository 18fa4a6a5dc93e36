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
