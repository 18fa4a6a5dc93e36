"""SeFi semantic channels: per-channel normalisation statistics, computed once over the latent cache
by the encode job and stored in the latents table's schema metadata (``qimg.semantic_stats``).

The texture channels come out of the VAE already normalised (its shift/scale), but the semantic
stand-in channels (projected vision-foundation features) have whatever mean and spread the
projection gives, channel by channel. Training on them raw would weigh channels by their scale and
put the data far from the unit-variance noise the flow starts from. The trainer maps them to
zero mean, unit variance with these statistics when it reads a batch.
"""

from __future__ import annotations

import json

import lance
import numpy as np
import pyarrow as pa
import torch

from training.latents_schema import from_bytes, read_metadata

STATS_KEY = "semantic_stats"


def _partial_sums(batch: pa.Table) -> pa.Table:
    sums = None
    for blob, shape, sc in zip(batch.column("latent").to_pylist(), batch.column("latent_shape").to_pylist(),
                               batch.column("semantic_channels").to_pylist(), strict=True):
        if not sc:
            continue
        z = from_bytes(blob, shape)[-sc:].astype(np.float64).reshape(sc, -1)
        s = np.stack([np.full(sc, z.shape[1], dtype=np.float64), z.sum(1), (z * z).sum(1)])
        sums = s if sums is None else sums + s
    if sums is None:
        return pa.table({"sums": pa.array([], pa.list_(pa.float64()))})
    return pa.table({"sums": [sums.reshape(-1).tolist()]})


def compute_semantic_stats(latents_uri: str, version: int | None = None) -> dict | None:
    """Per-channel mean and std of the semantic channels over every latent row (Ray Data map, summed on
    the driver); None when the cache has no semantic channels."""
    import ray

    ds = ray.data.read_lance(latents_uri, columns=["latent", "latent_shape", "semantic_channels"], version=version)
    parts = ds.map_batches(_partial_sums, batch_format="pyarrow", batch_size=256).take_all()
    if not parts:
        return None
    total = np.sum([np.asarray(p["sums"]) for p in parts], axis=0).reshape(3, -1)
    n, s, ss = total
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist(), "values_per_channel": int(n[0])}


def store_semantic_stats(latents_uri: str, stats: dict) -> None:
    """A metadata-only commit (new table version, no data rewritten)."""
    lance.dataset(latents_uri).update_schema_metadata({f"qimg.{STATS_KEY}": json.dumps(stats)})


def ensure_semantic_stats(latents_uri: str) -> dict | None:
    """The stored statistics; computed and stored first for a cache encoded before they existed."""
    meta = read_metadata(lance.dataset(latents_uri).schema)
    if not int(meta.get("semantic_channels", 0)):
        return None
    if STATS_KEY not in meta:
        stats = compute_semantic_stats(latents_uri)
        if stats is not None:
            store_semantic_stats(latents_uri, stats)
        return stats
    return meta[STATS_KEY]


def normalize_semantic(x: torch.Tensor, stats: dict | None, semantic_channels: int) -> torch.Tensor:
    """x [B, C, H, W] with the trailing ``semantic_channels`` mapped to zero mean, unit variance."""
    if not semantic_channels or stats is None:
        return x
    mean = torch.tensor(stats["mean"], dtype=x.dtype, device=x.device)[None, :, None, None]
    std = torch.tensor(stats["std"], dtype=x.dtype, device=x.device)[None, :, None, None]
    return torch.cat([x[:, :-semantic_channels], (x[:, -semantic_channels:] - mean) / std], 1)
