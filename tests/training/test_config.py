"""Typed config: every shipped YAML loads; Table 2 values; bad keys/values fail naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from training.config import ConfigError, load_config

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs/train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.steps > 0 and cfg.name == path.stem


@pytest.mark.parametrize("stem,lr,t2i,batch", [
    ("pretrain_256", 1e-4, 0.9, 32 * 1024), ("pretrain_512", 1e-4, 0.9, 16 * 1024),
    ("continual_512", 2e-5, 0.7, 16 * 1024), ("continual_1024", 2e-5, 0.7, 8 * 1024), ("continual_2048", 2e-5, 0.7, 4 * 1024),
    ("sft_512", 1e-5, 0.7, 16 * 1024), ("sft_1024", 1e-5, 0.7, 8 * 1024), ("sft_2048", 1e-5, 0.7, 4 * 1024)])
def test_stage_configs_carry_table_2(stem, lr, t2i, batch):
    c = load_config(ROOT / f"configs/train/{stem}.yaml")
    assert (c.optim.lr, c.data.t2i_ratio, c.data.global_batch_size) == (lr, t2i, batch)
    assert (c.optim.weight_decay, c.optim.grad_clip, c.flow.caption_dropout) == (0.001, 1.0, 0.1)
    assert c.data.resolution == int(stem.split("_")[1])
    total = {"pretrain": 700_000, "continual": 250_000, "sft": 10_000}[stem.split("_")[0]]
    same = [load_config(p).steps for p in CONFIGS if p.stem.split("_")[0] == stem.split("_")[0]]
    assert sum(same) == total  # the stage's steps, split over its resolutions


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,override,field", [
    ("name: x\nsteps: 3\noptim:\n  lrr: 0.1\n", [], r"optim.lrr: unknown field \(did you mean 'optim.lr'\?\)"),
    ("name: x\nsteps: 3\n", ["data.resolutoin=64"], r"data.resolutoin: unknown field"),
    ("name: x\nsteps: three\n", [], r"^steps: expected an integer"),
    ("name: x\nsteps: 3\ndata:\n  languages: {en: 0.5, zh: 0.2}\n", [], r"^data.languages: ratios must sum to 1"),
    ("name: x\nsteps: 3\ndata:\n  caption_types: {short: 0.5, long: 0.5}\n", [], r"^data.caption_types.long: unknown key"),
    ("name: x\nsteps: 3\nworkers: 3\n", [], r"^data.global_batch_size: 8 is not divisible by workers=3"),
    ("name: x\nsteps: 3\nparallel: {mixed_precision: bf16}\n", [], r"^parallel.mixed_precision: bf16 needs use_gpu"),
    ("steps: 3\n", [], r"^name: required field is missing"),
    ("name: x\nsteps: 3\nmodel: {preset: 3B}\n", [], r"^model.preset: unknown preset"),
    ("name: x\nsteps: 3\n", ["cluster.placement_strategy=SPREAD_OUT"], r"^cluster.placement_strategy: unknown strategy 'SPREAD_OUT'"),
    ("name: x\nsteps: 3\ncluster: {placment_strategy: PACK}\n", [], r"^cluster.placment_strategy: unknown field \(did you mean 'cluster.placement_strategy'\?\)"),
    ("name: x\nsteps: 3\ncluster: {backend: nccl}\n", [], r"^cluster.backend: nccl needs use_gpu"),
    ("name: x\nsteps: 3\nmax_failures: -2\n", [], r"^max_failures: must be >= 0, or -1"),
])
def test_bad_config_fails_naming_the_field(tmp_path, text, override, field):
    with pytest.raises(ConfigError, match=field):
        load_config(_write(tmp_path, text), override)


def test_overrides_are_typed_and_yaml_exponents_work(tmp_path):
    c = load_config(_write(tmp_path, "name: x\nsteps: 3\noptim: {lr: 3e-4}\n"), ["optim.betas=[0.9, 0.95]", "sefi.enabled=true"])
    assert c.optim.lr == 3e-4 and c.optim.betas == (0.9, 0.95) and c.sefi.enabled is True
    with pytest.raises(AttributeError):
        c.steps = 4  # frozen


@pytest.mark.parametrize("text,extra,message", [
    ("name: x\nsteps: 3\nflow:\n  caption_dropuot: 0.1\n", [],
     "error: flow.caption_dropuot: unknown field (did you mean 'flow.caption_dropout'?)"),
    ("name: x\nsteps: 3\n", ["--set", "cluster.placement_strategy=strict_spread"],
     "error: cluster.placement_strategy: unknown strategy 'strict_spread'; choose one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
])
def test_train_cli_reports_a_bad_field_before_any_work(tmp_path, text, extra, message):
    cfg = _write(tmp_path, text)
    r = subprocess.run([sys.executable, str(ROOT / "jobs/train.py"), "--config", str(cfg), "--data", str(tmp_path), *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == message
    assert not (ROOT / "out" / "train" / "x").exists()  # nothing started
