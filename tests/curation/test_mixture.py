"""Training mixtures built from real stage outputs — stage 1 (jobs' run_stage on the sample photos),
stage 2 (pairs made from real photos) and stage-3 synthetic text (run_synthesis) — T2I:TI2I ratio and
source quotas within tolerance, lineage, determinism; and the mixture read by the trainer
(jobs/encode_latents.py --mixture -> jobs/train.py, a few steps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lance
import pytest

from curation import synthetic_text as st
from curation.mixture import MixtureConfig, StageMixture, allocate, build_mixture
from curation.run import run_stage
from curation.stage2 import load_pair_config, run_pair_stage, write_sample_pairs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stage_tables(ray_local, tmp_path_factory, sample_dir, cfg, models):
    tmp = tmp_path_factory.mktemp("mix")
    s1, s2, s3 = (str(tmp / n) for n in ("s1.lance", "s2.lance", "synth.lance"))
    run_stage(str(sample_dir[0]), s1, cfg, ("clip", "nsfw", "rotation"), progress=False, report=False)
    write_sample_pairs(str(tmp / "pairs.parquet"), bad=False)
    pcfg = load_pair_config(None, {"scoring.tokenizer": models["tokenizer"], "source": "edit:photos"})
    run_pair_stage(str(tmp / "pairs.parquet"), s2, pcfg, ("source_nsfw", "target_nsfw", "direction"),
                   progress=False, report=False)
    st.run_synthesis(s3, 6, st.load_config(overrides={"sizes": {"384x256": 1.0}, "batch_size": 3}), seed=5,
                     progress=False, report=False)
    return tmp, s1, s2, s3


def test_allocate_caps_each_source_and_water_fills():
    got = allocate({"web": 100, "synthetic:text": 100, "edit:x": 5}, {"synthetic:text": 0.2}, 50)
    assert sum(got.values()) == 50 and got["synthetic:text"] <= 10 and got["edit:x"] <= 5
    assert allocate({"web": 3, "synthetic:text": 100}, {"synthetic:text": 0.25}, None) == {"web": 3, "synthetic:text": 1}


def test_mixture_ratio_quotas_lineage_and_determinism(stage_tables):
    tmp, s1, s2, s3 = stage_tables
    mix = StageMixture(t2i_ratio=0.7, min_short_side=256, t2i=(s1, s3), ti2i=(s2,), quotas={"synthetic:text": 0.2})
    cfg = MixtureConfig(seed=3, stages={2: mix})
    out = str(tmp / "mix.lance")
    summary = build_mixture(cfg, 2, out)
    t = lance.dataset(out).to_table(columns=["id", "task", "source", "quota", "stage_uri", "stage_version",
                                             "stage_id", "source_id", "instruction", "caption"]).to_pylist()
    t2i = [r for r in t if r["task"] == "t2i"]
    ti2i = [r for r in t if r["task"] == "ti2i"]
    n = len(t2i) + len(ti2i)
    assert n > 10 and summary["t2i"] == len(t2i) and summary["ti2i"] == len(ti2i)
    assert abs(len(t2i) / n - 0.7) <= 1 / n  # the ratio, to one row
    synth = [r for r in t2i if r["source"] == "synthetic:text"]
    assert 0 < len(synth) <= 0.2 * len(t2i) and all(r["quota"] == pytest.approx(0.2) for r in synth)
    assert {r["source"] for r in ti2i} == {"edit:photos"} and {r["source"] for r in t2i} == {"web", "synthetic:text"}
    # lineage: every row names its stage table, version and id; that row is kept there
    for uri in (s1, s2, s3):
        ds = lance.dataset(uri)
        kept = set(ds.to_table(columns=["id"], filter="keep = true")["id"].to_pylist())
        mine = [r for r in t if r["stage_uri"] == uri]
        assert mine and all(r["stage_version"] == ds.version and r["stage_id"] in kept for r in mine)
    sources = {r["id"] for r in t if r["task"] == "ti2i_source"}
    assert all(r["source_id"] in sources and r["instruction"] and r["caption"] is None for r in ti2i)
    again = str(tmp / "again.lance")
    build_mixture(cfg, 2, again)
    assert lance.dataset(again).to_table(columns=["id"])["id"].to_pylist() == [r["id"] for r in t]


def _job(name: str):
    """jobs/<name>.py as a module (the jobs are scripts, not a package): its ``main`` runs in this
    process, on the test's local Ray, instead of a subprocess that would import torch and start Ray
    again (most of this file's former 2.5 minutes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_models(stage_tables):
    sys.path.insert(0, str(ROOT / "tests" / "training"))
    import tiny  # tests/training/tiny.py: tiny VAE + condition encoder, saved locally

    tmp = stage_tables[0]
    return tiny.make_tiny_vae(tmp / "vae"), tiny.make_tiny_qwen_vl(tmp / "qwen")


def _json(text: str) -> dict:
    return json.loads(text[text.index("{\n"):])


ENCODE = ("--resolution", "64", "--bucket-multiple", "16", "--max-text-len", "32", "--batch-size", "8")


def test_trainer_reads_a_mixture(stage_tables, tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tmp, s1, s2, s3 = stage_tables
    vae, text = tiny_models
    out = str(tmp / "mix_train.lance")
    build_mixture(MixtureConfig(stages={2: StageMixture(t2i_ratio=0.7, t2i=(s1, s3), ti2i=(s2,))}), 2, out)
    cache = tmp / "cache"
    assert _job("encode_latents").main(["--mixture", out, "--out", str(cache), "--vae", str(vae), "--text-encoder",
                                        str(text), *ENCODE]) == 0
    summary = _json(capsys.readouterr().out)
    pairs = lance.dataset(out).count_rows(filter="task = 'ti2i'")
    assert summary["edit_pairs"] == pairs > 0
    assert _job("train").main(["--config", str(ROOT / "configs" / "train" / "debug_cpu.yaml"), "--data", str(cache),
                               "--storage", str(tmp / "runs"), "--steps", "2", "--workers", "1", "--set", "ckpt_every=2",
                               "--set", "name=mix", "--set", "data.t2i_ratio=0.7", "--set", "data.ti2i_ratio=0.3"]) == 0
    result = _json(capsys.readouterr().out)
    assert result["checkpoint"] and (Path(result["checkpoint"]) / ".metadata").is_file()


def test_encode_reads_a_stage2_table_directly(stage_tables, tiny_models, capsys, monkeypatch):
    """jobs/encode_latents.py --stage2: the kept pairs of the table jobs/filter_stage2.py's code wrote
    reach the trainer's data loader as TI2I samples (target latent, reference latent, instruction)."""
    from training.data import build_index, fetch_batch, plan_step

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp, s1, s2, s3 = stage_tables
    vae, text = tiny_models
    cache = tmp / "cache_s2"
    enc = _job("encode_latents")
    assert enc.main(["--stage2", s2, "--out", str(cache), "--vae", str(vae), "--text-encoder", str(text), *ENCODE]) == 0
    summary = _json(capsys.readouterr().out)
    kept = lance.dataset(s2).count_rows(filter="keep = true")
    assert summary["edit_pairs"] == kept > 0
    lineage = lance.dataset(str(cache / "stage2_pairs.lance")).to_table(columns=["task", "stage_uri", "stage_version"])
    assert set(lineage["stage_uri"].to_pylist()) == {s2} and lineage["task"].to_pylist().count("ti2i") == kept
    idx = build_index(str(cache))
    assert idx.has_ref.sum() == kept
    plan = plan_step(idx, 0, global_batch=4, seed=0, t2i_ratio=0.0, caption_types={"short": 1.0}, languages={"en": 1.0})
    assert plan.ti2i and idx.has_ref[plan.latent_rows].all()
    batch = fetch_batch(idx, plan.latent_rows, plan.text_rows, 32, with_ref=True)
    assert batch["latent"].shape[0] == batch["ref"].shape[0] == batch["text"].shape[0] == 4
    assert batch["ref"].shape[-2:] == batch["latent"].shape[-2:] and batch["text_mask"].any(1).all()
    # a rerun on the same stage-2 version reuses the pair table and the cache
    assert enc.main(["--stage2", s2, "--out", str(cache), "--vae", str(vae), "--text-encoder", str(text), *ENCODE]) == 0
    assert set(_json(capsys.readouterr().out)["skipped"]) == {"latents", "text"}
