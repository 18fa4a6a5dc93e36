"""The stage-1 job end to end on a local Ray: every input row lands in Lance with its scores and
decision; rethreshold; tar/Parquet inputs; resume after kill -9; bad arguments stop before work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lance
import polars as pl
import pyarrow as pa
import pytest

from curation import samples
from curation.config import load_config
from curation.run import rethreshold, run_stage
from curation.schema import SCORE_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
JOB = [sys.executable, str(ROOT / "jobs" / "filter_stage1.py")]


@pytest.fixture(scope="module")
def stage1_out(ray_local, sample_dir, cfg, tmp_path_factory):
    root, notes = sample_dir
    out = tmp_path_factory.mktemp("out") / "stage1.lance"
    summary = run_stage(str(root), str(out), cfg, commit_every=8, progress=False)
    return out, summary, notes, root


def _frame(out) -> pl.DataFrame:
    cols = [c for c in lance.dataset(str(out)).schema.names if c != "image"]
    return pl.from_arrow(lance.dataset(str(out)).to_table(columns=cols))


def test_every_input_is_one_row_with_scores_and_reason(stage1_out):
    out, summary, notes, root = stage1_out
    df = _frame(out)
    assert df.height == len(notes) == summary.rows
    assert df["id"].n_unique() == df.height
    df = df.with_columns(pl.col("uri").str.slice(len(str(root)) + 1).alias("rel"))
    by = {r["rel"]: r for r in df.iter_rows(named=True)}
    for name in ("truncated.jpg", "zero_bytes.jpg", "not_an_image.jpg", "corrupt.png", "bomb.png",
                 "corrupt_idat_valid_crc.png"):
        r = by[f"malformed/{name}"]
        assert r["reject_reason"] == "broken" and r["error"], name
        assert all(r[c] is None for c in ("width", "phash", "entropy", "nsfw_score", "clip_score"))
    for name in ("cmyk.jpg", "grey16.png", "palette.png", "animated.gif", "rgba.png", "la.png",
                 "exif_rot6.jpg", "png_named.jpg"):
        assert by[f"malformed/{name}"]["error"] is None, name
    assert by["malformed/exif_rot6.jpg"]["exif_orientation"] == 6
    assert by["nested/déjà vu/tiny photo (1).png"]["reject_reason"] == "resolution"
    assert by["nested/wide $weird 'name'.jpg"]["reject_reason"] == "resolution"
    for name in ("blank.png", "noise.png", "colour_noise.png"):
        assert by[f"filters/{name}"]["reject_reason"] == "entropy", name
    assert by["filters/long_caption.jpg"]["reject_reason"] == "token_length"
    nocap = by["filters/no_caption.jpg"]
    assert nocap["caption"] is None and nocap["clip_score"] is None and nocap["token_count"] is None
    assert nocap["reject_reason"] != "clip"
    # Exact and near copies of the astronaut: one survivor, the others point at it.
    astro = [by[k] for k in by if "astronaut" in k and k.startswith(("dups/", "photos/"))]
    survivors = [r for r in astro if r["reject_reason"] != "dedup"]
    assert len(astro) == 5 and len(survivors) == 1
    assert all(r["dup_of"] == survivors[0]["id"] for r in astro if r["reject_reason"] == "dedup")
    # Scores are stored for every decodable row, kept or not; the stage and hashes on every row.
    decodable = df.filter(pl.col("error").is_null())
    for c in ("short_side", "phash", "entropy", "noise", "nsfw_score", "rotation_score"):
        assert decodable[c].null_count() == 0, c
    assert set(df["stage"]) == {"stage1"} and df["score_config_hash"].n_unique() == 1
    assert df["keep"].null_count() == 0 and df.filter(pl.col("keep"))["reject_reason"].null_count() == df["keep"].sum()
    assert summary.reasons["broken"] == 6 and sum(summary.reasons.values()) == df.height


def test_output_queryable_with_duckdb(stage1_out):
    import duckdb

    out, summary, *_ = stage1_out
    # DuckDB (2.0) cannot map Arrow float16 (clip_embedding) even unselected: hand it a projection.
    ds = lance.dataset(str(out)).scanner(columns=["id", "reject_reason"])  # noqa: F841 - scanned by name
    got = dict(duckdb.sql("select coalesce(reject_reason, 'kept'), count(*) from ds group by 1").fetchall())
    assert got == summary.reasons


def test_kept_rows_carry_their_image_bytes(stage1_out):
    from curation.table import load_image, read_images, read_kept

    out, *_ = stage1_out
    rows, version = read_kept(str(out), ["id", "uri", "rotate"])
    assert rows.num_rows > 5 and version == lance.dataset(str(out)).version
    blobs = read_images(str(out), rows["_rowid"])
    for uri, data in zip(rows["uri"].to_pylist(), blobs, strict=True):
        assert data == Path(uri).read_bytes()  # store_image: source
        assert load_image(data, 0, short_side=256).mode == "RGB"


def test_html_report_has_a_histogram_per_score(stage1_out):
    _, summary, *_ = stage1_out
    page = Path(summary.report).read_text()
    assert page.count("<img src='data:image/png;base64,") >= 8
    assert "dedup" in page and "broken" in page


def test_rethreshold_redecides_without_rescoring(stage1_out, tmp_path):
    import shutil

    src, _, notes, _ = stage1_out
    out = tmp_path / "copy.lance"  # the module's table stays as the job wrote it
    shutil.copytree(src, out)
    before = _frame(out)
    v0 = lance.dataset(str(out)).version
    # Models pointing nowhere: rethreshold must not load them.
    cfg2 = load_config(None, {"scoring.clip.weights": str(tmp_path / "missing.pt"),
                              "thresholds.entropy.min_entropy": 7.5, "thresholds.clip.min_score": -1.0,
                              "thresholds.rotation.min_confidence": 1.0})
    s = rethreshold(str(out), cfg2, report=False)
    after = _frame(out)
    assert s.version > v0 and after.height == before.height == len(notes)
    key = ["id"] + SCORE_COLUMNS + ["scored_at"]
    assert before.select(key).sort("id").equals(after.select(key).sort("id"))  # scores untouched
    assert after.filter(pl.col("reject_reason") == "entropy").height > before.filter(
        pl.col("reject_reason") == "entropy").height
    assert after["decided_config_hash"].n_unique() == 1 and after["decided_config_hash"][0] != before["decided_config_hash"][0]
    # Older versions stay readable (Lance time travel): the first decision is still there.
    assert lance.dataset(str(out), version=v0).count_rows() == len(notes)


def test_tar_and_parquet_inputs_through_the_job(ray_local, cfg, tmp_path, capsys):
    import io
    import tarfile
    from dataclasses import replace

    import pyarrow.parquet as pq

    photos = samples.real_photos()[:6]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tf:
        for i, (name, im) in enumerate(photos):
            for ext, data in ((".jpg", samples.jpeg(im)), (".txt", name.encode())):
                info = tarfile.TarInfo(f"{i:05d}{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    # batch_size 2: the one shard is three work units (tasks), each reading its own members.
    s = run_stage(str(tmp_path / "shard-000.tar"), str(tmp_path / "tar.lance"), replace(cfg, batch_size=2),
                  ("clip", "nsfw"), progress=False, report=False)
    assert s.rows == 6 and "] 3 work units of about 2 rows" in capsys.readouterr().out
    assert sorted(_frame(tmp_path / "tar.lance")["caption"].to_list()) == sorted(n for n, _ in photos)
    pq.write_table(pa.table({"image": [samples.png(im) for _, im in photos] + [b"junk"],
                             "text": [n for n, _ in photos] + ["junk"]}), tmp_path / "p.parquet")
    s = run_stage(str(tmp_path / "p.parquet"), str(tmp_path / "pq.lance"), cfg, ("clip", "nsfw"),
                  progress=False, report=False)
    df = _frame(tmp_path / "pq.lance")
    assert s.rows == 7 and df.filter(pl.col("reject_reason") == "broken").height == 1
    assert sorted(df.filter(pl.col("error").is_null())["caption"].to_list()) == sorted(n for n, _ in photos)


def _decisions(out) -> dict:
    df = _frame(out)
    return {r["id"]: (r["keep"], r["reject_reason"], r["dup_of"]) for r in df.iter_rows(named=True)}


def test_resume_after_kill_minus_9(ray_local, sample_dir, sample_config, cfg, tmp_path, kill_and_rerun):
    """kill -9 the job (driver and its Ray) after its first commit; the same command again ends
    with every row exactly once and the decisions of the uninterrupted run."""
    root, notes = sample_dir
    ref_out = tmp_path / "reference.lance"
    run_stage(str(root), str(ref_out), cfg, ("clip", "nsfw"), progress=False, report=False)
    out = tmp_path / "resumed.lance"
    cmd = JOB + ["--input", str(root), "--output", str(out), "--config", str(sample_config),
                 "--skip", "clip,nsfw", "--commit-every", "8", "--set", "batch_size=4",
                 "--set", "num_workers=1", "--num-cpus", "1", "--no-progress", "--no-report"]
    kill_and_rerun(cmd, lambda: lance.dataset(str(out)).count_rows(), len(notes))
    df = _frame(out)
    assert df.height == len(notes) and df["id"].n_unique() == len(notes)
    assert _decisions(out) == _decisions(ref_out)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(JOB + list(args), capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_bad_arguments_stop_before_any_work(sample_dir, sample_config, tmp_path):
    root, _ = sample_dir
    out = tmp_path / "never.lance"
    (tmp_path / "empty").mkdir()
    (tmp_path / "typo.yaml").write_text("thresholds:\n  clip:\n    min_scor: 0.3\n")
    (tmp_path / "range.yaml").write_text("thresholds:\n  nsfw:\n    max_score: 7\n")
    (tmp_path / "nomodel.yaml").write_text(f"scoring:\n  clip:\n    model: ViT-B-32\n    weights: {tmp_path}/none.pt\n")
    other = tmp_path / "other.lance"
    lance.write_dataset(pa.table({"id": ["x"], "v": [1]}), other)
    cases = [
        (["--input", str(tmp_path / "nope"), "--output", str(out)], "--input: no such file"),
        (["--input", str(tmp_path / "empty"), "--output", str(out)], "--input: no images"),
        (["--input", str(root), "--output", str(out), "--config", str(tmp_path / "typo.yaml")],
         "thresholds.clip.min_scor"),
        (["--input", str(root), "--output", str(out), "--config", str(tmp_path / "range.yaml")],
         "thresholds.nsfw.max_score = 7"),
        (["--input", str(root), "--output", str(out), "--config", str(tmp_path / "nomodel.yaml"),
          "--skip", "nsfw,token_length"], "scoring.clip.weights"),
        (["--input", str(root), "--output", str(other), "--config", str(sample_config)], "another schema"),
        (["--input", str(root), "--output", str(out), "--skip", "clp"], "--skip: unknown filter"),
    ]
    for args, needle in cases:
        r = _run_cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr[-2000:])
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (needle, r.stderr[-2000:])
        assert not out.exists()
