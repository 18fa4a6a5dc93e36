"""SeFi fixes: no loss on semantic channels whose timestep is clamped to 1; per-channel statistics of
the semantic channels computed over a latent table written with the cache's schema and stored in its
metadata; the normalisation the trainer applies with them."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest
import torch

from training.flow import FlowArgs, FlowDraw, flow_loss, per_channel_t
from training.latents_schema import latent_schema, read_metadata, to_bytes
from training.sefi import STATS_KEY, ensure_semantic_stats, normalize_semantic


class _Const(torch.nn.Module):
    """Predicts zeros: the per-channel error is then the target itself."""

    args = type("A", (), {"patch_size": 1})()

    def forward(self, x, t, text, mask=None, refs=None):
        return torch.zeros_like(x)


def test_semantic_loss_is_masked_where_t_s_is_clamped_and_texture_is_kept():
    a = FlowArgs(sefi=True, sefi_delta=0.3, semantic_channels=2, caption_dropout=0.0)
    x1 = torch.zeros(2, 5, 2, 2)
    noise = torch.ones(2, 5, 2, 2)
    noise[0, 3:] = 10.0  # sample 0: t = 0.9 -> t_s clamped to 1: its semantic error must not count
    t = torch.tensor([0.9, 0.5])
    rec = {}
    loss, parts = flow_loss(_Const(), x1, torch.zeros(2, 1, 3), None, a, fixed=FlowDraw(noise, t, torch.zeros(2, dtype=torch.bool)), record=rec)
    # texture: both samples, error 1 everywhere; semantic: only sample 1 (error 1), sample 0 counts 0
    assert parts["loss_texture"].item() == pytest.approx(1.0)
    assert parts["loss_semantic"].item() == pytest.approx(0.5)
    assert parts["semantic_masked"].item() == pytest.approx(0.5)
    assert rec["sample_loss"].tolist() == pytest.approx([1.0, 2.0])
    # t = 0.1: texture clamped at t_z = 0 keeps its loss (its input is the noise itself)
    _, p2 = flow_loss(_Const(), x1, torch.zeros(2, 1, 3), None, a,
                      fixed=FlowDraw(torch.ones(2, 5, 2, 2), torch.tensor([0.1, 0.1]), torch.zeros(2, dtype=torch.bool)))
    assert p2["loss_texture"].item() == pytest.approx(1.0) and p2["semantic_masked"].item() == 0.0
    assert per_channel_t(torch.tensor([1.0]), torch.tensor([0.0]), x1[:1], 2)[0, :, 0, 0].tolist() == [0, 0, 0, 1, 1]


def test_semantic_statistics_are_computed_over_the_table_stored_in_metadata_and_normalise(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    uri = str(tmp_path / "latents.lance")
    rows, sem = [], []
    for i in range(10):
        h, w = (4, 4) if i % 2 else (2, 8)  # two buckets: statistics pool over shapes
        z = rng.normal(size=(6, h, w)).astype(np.float32)
        z[4] = z[4] * 3 + 5
        z[5] = z[5] * 0.5 - 2
        sem.append(z[4:].reshape(2, -1))
        rows.append({"id": f"i{i}", "bucket_h": h * 8, "bucket_w": w * 8, "latent_shape": [6, h, w], "semantic_channels": 2,
                     "ref_id": None, "latent": to_bytes(z), "ref_latent": None})
    lance.write_dataset(pa.Table.from_pylist(rows, schema=latent_schema({"semantic_channels": 2, "latent_channels": 6})), uri)
    stats = ensure_semantic_stats(uri)
    allsem = np.concatenate([s.astype(np.float16).astype(np.float64) for s in sem], 1)
    assert np.allclose(stats["mean"], allsem.mean(1), atol=1e-6) and np.allclose(stats["std"], allsem.std(1), atol=1e-6)
    md = read_metadata(lance.dataset(uri).schema)
    assert md[STATS_KEY] == stats and md["semantic_channels"] == 2  # stored beside the provenance, nothing lost
    assert lance.dataset(uri).count_rows() == 10
    x = torch.from_numpy(np.stack([np.frombuffer(r["latent"], "<f2").reshape(r["latent_shape"]) for r in rows if r["latent_shape"][1] == 4]).astype(np.float32))
    y = normalize_semantic(x, stats, 2)
    assert torch.equal(y[:, :4], x[:, :4])  # texture untouched
    assert abs(y[:, 4:].mean().item()) < 0.3 and 0.7 < y[:, 4:].std().item() < 1.3
