"""The LAION aesthetic head: real released weights, scored on stored-embedding shaped input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.typed_config import ConfigError
from curation.aesthetic import EMBED_DIM, AestheticHead

HEAD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "laion-aesthetic-v2"
WEIGHTS = HEAD_DIR / "sac+logos+ava1-l14-linearMSE.pth"


@pytest.fixture(scope="module")
def head() -> AestheticHead:
    if not WEIGHTS.is_file():
        pytest.skip(f"real LAION aesthetic weights not found at {WEIGHTS} (../shared/models is absent)")
    h = AestheticHead(str(WEIGHTS), batch_size=100)
    h.preflight()
    h.setup()
    return h


def _unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, EMBED_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_real_weights_match_the_released_layers(head):
    # The released head has no activations: its output is the affine map of the chained layers.
    # Recompute it from the state dict in float64 numpy: any layer-order or loading slip shows here.
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    x = _unit(257)
    y = x.astype(np.float64)
    for k in (0, 2, 4, 6, 7):
        y = y @ state[f"layers.{k}.weight"].double().numpy().T + state[f"layers.{k}.bias"].double().numpy()
    got = head(x)
    assert got.dtype == np.float32 and got.shape == (257,)
    np.testing.assert_allclose(got, y[:, 0], rtol=0, atol=1e-3)
    # LAION's rating scale: random directions land in a few points around the middle of 1..10.
    assert 0 < np.median(got) < 10 and got.std() > 0


def test_stored_float16_unnormalised_and_batches_agree(head):
    x = _unit(250, seed=1)
    ref = head(x)
    # Stored as float16 (the clip_embedding column), possibly not exactly unit length: same scores.
    np.testing.assert_allclose(head((x * 3).astype(np.float16)), ref, atol=0.02)
    # batch_size=100 split 250 rows into 100/100/50: every row scored once, in order.
    np.testing.assert_allclose(np.concatenate([head(x[:7]), head(x[7:])]), ref, atol=1e-5)


def test_wrong_width_is_a_clear_error(head):
    with pytest.raises(ValueError, match="768"):
        head(np.ones((2, 512), np.float32))


def test_missing_or_bad_weights_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="scoring.aesthetic.weights is not set"):
        AestheticHead(None).preflight()
    with pytest.raises(ConfigError, match="scoring.aesthetic.weights: no such file"):
        AestheticHead(str(tmp_path / "nope.pth")).preflight()
    bad = tmp_path / "bad.pth"
    torch.save({"something": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match="scoring.aesthetic.weights: .* is not the LAION aesthetic head"):
        AestheticHead(str(bad)).preflight()
