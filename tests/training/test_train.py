"""Real Ray Train runs (gloo, 2 CPU workers, FSDP2, tiny MMDiT) on the cache built from a tiny curated
Lance table. One SeFi run with EMA and validation (module fixture) is checked for: failure -> restart
from checkpoint reproduces the next step; validation images, page and TensorBoard files; the EMA export
loads into a plain MMDiT without Ray and reproduces the trainer's EMA sample; a next stage starts from
its EMA. A second run overfits a handful of images."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.config import ConfigError, load_config

CONFIG = Path(__file__).parents[2] / "configs/train/debug_cpu.yaml"


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ema_run(cache, tmp_path_factory):
    """Rank 1 raises before step 5 of attempt 1; Ray Train (FailureConfig) restarts both workers from
    the step-3 DCP checkpoint. SeFi on a T2I/TI2I mix with gradient accumulation, EMA and validation
    every 3 steps."""
    from training.trainer import fit

    tmp = tmp_path_factory.mktemp("ema_run")
    cfg = load_config(CONFIG, ["name=resume", "steps=6", "ckpt_every=3", "log_every=1", "fault_injection_step=4",
                               "max_failures=1", "sefi.enabled=true", "data.t2i_ratio=0.5", "data.ti2i_ratio=0.5",
                               "data.micro_batch_size=2",  # 2 gradient-accumulation micro-steps per worker
                               "ema_decay=0.5", "validation.every=3", "validation.euler_steps=2"])
    log = tmp / "runs" / "resume" / "metrics.jsonl"
    result = fit(cfg, cache["dir"], str(tmp / "runs"), str(log))
    return {"result": result, "log": log, "dir": log.parent, "tmp": tmp}


def test_injected_worker_failure_restarts_from_checkpoint_and_reproduces_next_step(ema_run, tmp_path):
    rows = _log(ema_run["log"])
    first = {r["step"]: r for r in rows if r["resumed_from"] == 0}
    second = {r["step"]: r for r in rows if r["resumed_from"] == 3}
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [4, 5, 6]
    assert first[4]["loss"] == pytest.approx(second[4]["loss"], rel=1e-5, abs=1e-7)
    assert first[4]["grad_norm"] == pytest.approx(second[4]["grad_norm"], rel=1e-4)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_semantic"]) for r in rows)
    # T2I and TI2I micro-batches share steps at the 0.5 ratio (4 micro-batches per step: 2 of each).
    assert {r["ti2i_fraction"] for r in rows} == {0.5}
    ckpt = Path(ema_run["result"].checkpoint.path)
    assert ckpt.name == "step_00000006" and (ckpt / ".metadata").is_file()
    assert len(list(ckpt.glob("__*_0.distcp"))) == 2  # one shard file per FSDP rank
    sample = np.load(ckpt / "sample_latent.npy")
    assert sample.shape[1] == 6 and np.isfinite(sample).all()  # composite latent: 4 texture + 2 semantic
    from training.report import write_report

    page = write_report(ema_run["log"], tmp_path / "report.html", "resume").read_text()
    assert page.count("data:image/png;base64,") == 1 and "restarts from checkpoint at</th><td>3" in page


def test_validation_images_page_tensorboard_and_monitoring_metrics_appear(ema_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.config import VALIDATION_PROMPTS

    d = ema_run["dir"]
    for step in (3, 6):
        pngs = sorted((d / "validation" / f"step_{step:08d}").glob("*.png"))
        assert len(pngs) == len(VALIDATION_PROMPTS)  # split over 2 ranks, gathered on rank 0
        from PIL import Image

        assert Image.open(pngs[0]).size == (64, 64)  # the square bucket at 64 px
    page = (d / "validation.html").read_text()
    assert page.count("<img") == 2 * len(VALIDATION_PROMPTS) and "欢迎光临" in page and "OPEN 24 HOURS" in page
    assert all((d / src).is_file() for src in __import__("re").findall(r"src='([^']+)'", page))
    rows = _log(ema_run["log"])
    assert all(r["mfu"] > 0 and r["tokens_per_s"] > 0 and r["tflops_per_s_per_device"] > 0 for r in rows)
    assert all(any(k.startswith("loss_t/") for k in r) for r in rows)
    acc = EventAccumulator(str(d / "tensorboard"))
    acc.Reload()
    assert {"loss", "mfu", "grad_norm", "loss_semantic"} <= set(acc.Tags()["scalars"])
    assert max(e.step for e in acc.Scalars("loss")) == 6
    assert "validation/00" in acc.Tags()["images"]


def test_ema_export_loads_without_ray_and_reproduces_the_trainers_ema_sample(ema_run, cache, tmp_path):
    from training.data import build_index, fetch_batch, null_text
    from training.export import export_weights, load_exported
    from training.flow import FlowArgs, euler_sample

    ckpt = ema_run["result"].checkpoint.path
    out = export_weights(str(ema_run["dir"]), tmp_path / "ema.safetensors")  # run dir: its latest step_*
    raw = export_weights(ckpt, tmp_path / "raw.safetensors", weights="model")
    model, info = load_exported(out)
    raw_model, _ = load_exported(raw)
    assert info["weights"] == "ema" and info["step"] == 6
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw_model.state_dict().values(), strict=True))
    # The trainer's final smoke sample was drawn with the EMA weights swapped in: same inputs, same result.
    index = build_index(cache["dir"])
    keys, pools, probs = index.pools(False)
    r = int(pools[int(np.argmax(probs))][0])
    batch = fetch_batch(index, [r, r], [index.texts[r][0][0]] * 2, 64, with_ref=False)
    noise = torch.randn((2, model.args.in_channels, *batch["latent"].shape[2:]), generator=torch.Generator().manual_seed(0))
    x = euler_sample(model, noise, batch["text"], batch["text_mask"], null_text(index, 64), FlowArgs(**info["flow_args"]), steps=8, cfg=4.0)
    want = np.load(Path(ckpt) / "sample_latent.npy")
    assert np.abs(x.numpy() - want).max() < 1e-4
    x_raw = euler_sample(raw_model, noise, batch["text"], batch["text_mask"], null_text(index, 64), FlowArgs(**info["flow_args"]), steps=8, cfg=4.0)
    assert np.abs(x_raw.numpy() - want).max() > 1e-3  # the raw weights would not give it


def test_next_stage_starts_from_the_previous_stages_ema_resharded(ema_run, tmp_path):
    """load_weights (what a stage with init_from runs) in a 1-rank group: the 2-rank checkpoint's EMA
    is resharded into the model and its EMA."""
    import torch.distributed as dist

    from training.config import ParallelConfig
    from training.ema import EMA
    from training.export import export_weights, load_exported
    from training.mmdit import MMDiT, MMDiTArgs
    from training.parallelize import parallelize
    from training.trainer import load_weights, resolve_init_from

    ckpt = resolve_init_from(str(ema_run["dir"]))
    want, info = load_exported(export_weights(ckpt, tmp_path / "ema.safetensors"))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with torch.device("meta"):
            m = MMDiT(MMDiTArgs(**info["model_args"]))
        parallelize(m, ParallelConfig(activation_checkpointing=True), distributed=True)
        m.to_empty(device="cpu")
        ema = EMA(m, 0.9)
        load_weights(ckpt, m, ema, from_ema=True)
        got = {n.replace("_checkpoint_wrapped_module.", ""): p.full_tensor() for n, p in m.named_parameters()}
        assert all(torch.equal(got[n], t) for n, t in want.state_dict().items())
        assert all(torch.equal(e.full_tensor(), p.full_tensor()) for e, p in zip(ema.shadow, m.parameters(), strict=True))
    finally:
        dist.destroy_process_group()


def test_overfit_on_a_handful_of_images_drives_the_loss_down(cache, tmp_path, ema_run):
    from training.trainer import fit

    cfg = load_config(CONFIG, ["name=overfit", "steps=40", "ckpt_every=40", "log_every=1", "flow.caption_dropout=0.0",
                               "optim.lr=3e-3", "optim.warmup_steps=5", "data.global_batch_size=12"])
    log = tmp_path / "metrics.jsonl"
    fit(cfg, cache["dir"], str(tmp_path / "runs"), str(log))
    losses = [r["loss"] for r in _log(log)]
    assert len(losses) == 40
    head, tail = np.mean(losses[:5]), np.mean(losses[-5:])
    assert tail < 0.6 * head, f"loss did not drop clearly: first 5 steps {head:.3f}, last 5 {tail:.3f}"
    # This run kept no EMA: a next stage asking for it fails in the driver, naming the field.
    nxt = load_config(CONFIG, ["name=next", f"init_from={tmp_path / 'runs' / 'overfit'}"])
    with pytest.raises(ConfigError, match="^init_from_ema"):
        fit(nxt, cache["dir"], str(tmp_path / "runs"), None)
