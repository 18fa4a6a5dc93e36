"""Object-store input and output: the stage-1 job (as a user runs it, a subprocess with its own
local Ray) reads a folder of objects and a Parquet file from ``s3://`` and writes its Lance table to
``s3://`` on a local S3-compatible server (moto in server mode), credentials and endpoint from the
environment only; a run killed after its first commit resumes on the object store."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import lance
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import storage
from curation import samples
from curation.readers import list_folder, resolve_input

ROOT = Path(__file__).resolve().parents[2]
JOB = [sys.executable, str(ROOT / "jobs" / "filter_stage1.py")]
BUCKET = "qimg-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port; the AWS_* environment pointing at it (for this
    process and every job it starts), restored afterwards."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _upload_folder(client, root: Path, prefix: str) -> int:
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.relative_to(root).as_posix()}", Body=p.read_bytes())
            n += 1
    return n


def _job(*args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run(JOB + list(args), capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _rows(uri: str) -> pa.Table:
    ds = lance.dataset(uri, storage_options=storage.storage_options(uri))
    return ds.to_table(columns=[c for c in ds.schema.names if c != "image"])


FAST = ["--skip", "clip,nsfw", "--num-cpus", "2", "--no-progress", "--no-report"]


def test_storage_options_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    assert storage.storage_options("s3://b/t.lance") == {
        "aws_endpoint": "http://minio:9000", "aws_access_key_id": "k", "aws_secret_access_key": "s",
        "aws_region": "eu-west-1", "allow_http": "true"}
    assert storage.storage_options("/data/t.lance") is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.com")
    assert "allow_http" not in storage.storage_options("s3://b/t.lance")


def test_folder_of_objects_in_lance_out(s3, sample_dir, sample_config):
    root, notes = sample_dir
    _upload_folder(s3, root, "images")
    listed = list_folder(f"s3://{BUCKET}/images")
    assert listed.num_rows == len(notes)  # sidecars and notes are not items
    assert sum(c is not None for c in listed.column("caption_path").to_pylist()) == len(notes) - 1
    out = f"s3://{BUCKET}/out/folder.lance"
    r = _job("--input", f"s3://{BUCKET}/images/", "--output", out, "--config", str(sample_config), *FAST)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    t = _rows(out)
    assert t.num_rows == len(notes) and len(set(t.column("id").to_pylist())) == len(notes)
    by = {u.split("/images/", 1)[1]: row for u, row in zip(t.column("uri").to_pylist(), t.to_pylist(), strict=True)}
    assert set(by) == set(notes)
    assert by["photos/astronaut.jpg"]["caption"] and by["photos/astronaut.jpg"]["error"] is None
    assert by["malformed/truncated.jpg"]["reject_reason"] == "broken"
    assert by["dups/astronaut_copy.jpg"]["reject_reason"] == "dedup"


def test_parquet_object_in_lance_out(s3, sample_config):
    photos = samples.real_photos()[:4]
    table = pa.table({"jpg": pa.array([samples.jpeg(im) for _, im in photos], pa.binary()),
                      "caption": [f"a photo of {n}" for n, _ in photos], "key": [n for n, _ in photos]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.put_object(Bucket=BUCKET, Key="pq/part-0.parquet", Body=buf.getvalue())
    src = resolve_input(f"s3://{BUCKET}/pq")
    assert src.kind == "parquet" and src.units == (f"s3://{BUCKET}/pq/part-0.parquet",)
    out = f"s3://{BUCKET}/out/parquet.lance"
    r = _job("--input", f"s3://{BUCKET}/pq", "--output", out, "--config", str(sample_config), *FAST,
             "--set", "thresholds.resolution.min_short_side=64")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    t = _rows(out)
    assert sorted(t.column("uri").to_pylist()) == sorted(f"s3://{BUCKET}/pq/part-0.parquet#{n}" for n, _ in photos)
    assert t.column("caption").to_pylist().count(None) == 0 and t.column("error").null_count == 4


def test_resume_after_kill_on_the_object_store(s3, sample_dir, sample_config, kill_and_rerun):
    root, notes = sample_dir
    if not list_folder(f"s3://{BUCKET}/images").num_rows:
        _upload_folder(s3, root, "images")
    out = f"s3://{BUCKET}/out/resumed.lance"
    cmd = JOB + ["--input", f"s3://{BUCKET}/images", "--output", out, "--config", str(sample_config),
                 "--commit-every", "8", "--set", "batch_size=4", "--set", "num_workers=1",
                 "--skip", "clip,nsfw", "--num-cpus", "1", "--no-progress", "--no-report"]
    kill_and_rerun(cmd, lambda: lance.dataset(out, storage_options=storage.storage_options(out)).count_rows(),
                   len(notes))
    t = _rows(out)
    assert t.num_rows == len(notes) and len(set(t.column("id").to_pylist())) == len(notes)
    assert t.column("keep").null_count == 0
