"""Object-store URIs (``s3://bucket/prefix``) for every job: one place turns the environment into
Lance ``storage_options`` and a pyarrow filesystem, so readers, writers and workers on other nodes
reach the same store with the same credentials.

Environment (the AWS SDK names, so what works for the ``aws`` CLI works here):
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``; MinIO, Ceph, moto, ...), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``) and
``AWS_ALLOW_HTTP`` (default: true when the endpoint is ``http://``). On a cluster put them in the
job's runtime env (``ray job submit --runtime-env-json '{"env_vars": {...}}'``) so every worker has
them. Local paths need none of this.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in REMOTE_SCHEMES


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def s3_settings() -> dict[str, str]:
    """The S3 settings present in the environment: endpoint, key, secret, token, region, allow_http."""
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    out = {"endpoint": endpoint, "key": _env("AWS_ACCESS_KEY_ID"), "secret": _env("AWS_SECRET_ACCESS_KEY"),
           "token": _env("AWS_SESSION_TOKEN"), "region": _env("AWS_REGION", "AWS_DEFAULT_REGION")}
    allow = _env("AWS_ALLOW_HTTP")
    if allow is None and endpoint:
        allow = "true" if endpoint.startswith("http://") else None
    out["allow_http"] = allow
    return {k: v for k, v in out.items() if v}


def storage_options(uri: str) -> dict[str, str] | None:
    """Lance ``storage_options`` for ``uri`` from the environment; None for local paths (and for
    other schemes, whose credentials Lance reads from the environment itself)."""
    if urlparse(str(uri)).scheme not in ("s3", "s3a"):
        return None
    s = s3_settings()
    names = {"endpoint": "aws_endpoint", "key": "aws_access_key_id", "secret": "aws_secret_access_key",
             "token": "aws_session_token", "region": "aws_region", "allow_http": "allow_http"}
    opts = {names[k]: v for k, v in s.items()}
    return opts or None


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) for a local path or an object-store URI."""
    import pyarrow.fs as pafs

    p = urlparse(str(uri))
    if p.scheme in ("s3", "s3a"):
        s = s3_settings()
        kw = {"access_key": s.get("key"), "secret_key": s.get("secret"), "session_token": s.get("token"),
              "region": s.get("region") or "us-east-1"}
        if s.get("endpoint"):
            ep = urlparse(s["endpoint"])
            kw["endpoint_override"] = ep.netloc or ep.path
            kw["scheme"] = ep.scheme or "https"
        return pafs.S3FileSystem(**{k: v for k, v in kw.items() if v is not None}), p.netloc + p.path
    if p.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(p.path if p.scheme else str(uri)))
    fs, path = pafs.FileSystem.from_uri(str(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    """Path join that keeps ``scheme://`` intact."""
    return "/".join([str(base).rstrip("/"), *(s.strip("/") for s in parts)]) if is_remote(base) \
        else os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    """The whole object or file (OSError if it cannot be read)."""
    if not is_remote(uri):
        with open(uri, "rb") as f:
            return f.read()
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
