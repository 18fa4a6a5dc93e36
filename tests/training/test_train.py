"""Real Ray Train runs (gloo, 2 CPU workers, FSDP2, tiny MMDiT) on the cache built from a tiny curated
Lance table: failure -> restart from checkpoint reproduces the next step, and an overfit run learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from training.config import load_config

CONFIG = Path(__file__).parents[2] / "configs/train/debug_cpu.yaml"


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_injected_worker_failure_restarts_from_checkpoint_and_reproduces_next_step(cache, tmp_path):
    """Rank 1 raises before step 5 of attempt 1; Ray Train (FailureConfig) restarts both workers from
    the step-3 DCP checkpoint. Step 4's loss, computed once continuously and once after the restart,
    must match: same weights, optimizer state, schedule, data position and noise. Runs the SeFi
    variant on a T2I/TI2I mix with gradient accumulation, so those paths are exercised too."""
    from training.trainer import fit

    cfg = load_config(CONFIG, ["name=resume", "steps=6", "ckpt_every=3", "log_every=1", "fault_injection_step=4",
                               "max_failures=1", "sefi.enabled=true", "data.t2i_ratio=0.5", "data.ti2i_ratio=0.5",
                               "data.micro_batch_size=2"])  # 2 gradient-accumulation micro-steps per worker
    log = tmp_path / "metrics.jsonl"
    result = fit(cfg, cache["dir"], str(tmp_path / "runs"), str(log))
    rows = _log(log)
    first = {r["step"]: r for r in rows if r["resumed_from"] == 0}
    second = {r["step"]: r for r in rows if r["resumed_from"] == 3}
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [4, 5, 6]
    assert first[4]["loss"] == pytest.approx(second[4]["loss"], rel=1e-5, abs=1e-7)
    assert first[4]["grad_norm"] == pytest.approx(second[4]["grad_norm"], rel=1e-4)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_semantic"]) for r in rows)
    assert {r["ti2i"] for r in rows} == {True, False}  # both task types were drawn
    ckpt = Path(result.checkpoint.path)
    assert ckpt.name == "step_00000006" and (ckpt / ".metadata").is_file()
    assert len(list(ckpt.glob("__*_0.distcp"))) == 2  # one shard file per FSDP rank
    sample = np.load(ckpt / "sample_latent.npy")
    assert sample.shape[1] == 6 and np.isfinite(sample).all()  # composite latent: 4 texture + 2 semantic
    from training.report import write_report

    page = write_report(log, tmp_path / "report.html", "resume").read_text()
    assert page.count("data:image/png;base64,") == 1 and "restarts from checkpoint at</th><td>3" in page


def test_overfit_on_a_handful_of_images_drives_the_loss_down(cache, tmp_path):
    from training.trainer import fit

    cfg = load_config(CONFIG, ["name=overfit", "steps=40", "ckpt_every=40", "log_every=1", "flow.caption_dropout=0.0",
                               "optim.lr=3e-3", "optim.warmup_steps=5", "data.global_batch_size=12"])
    log = tmp_path / "metrics.jsonl"
    fit(cfg, cache["dir"], str(tmp_path / "runs"), str(log))
    losses = [r["loss"] for r in _log(log)]
    assert len(losses) == 40
    head, tail = np.mean(losses[:5]), np.mean(losses[-5:])
    assert tail < 0.6 * head, f"loss did not drop clearly: first 5 steps {head:.3f}, last 5 {tail:.3f}"
