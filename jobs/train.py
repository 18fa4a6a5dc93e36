"""Train the MMDiT on a latent cache with Ray Train + FSDP2.

    ray job submit --working-dir . -- python jobs/train.py --config configs/train/pretrain_256.yaml \
        --data data/cache_256 --workers 64 --gpu

Checkpoints, the metrics log (metrics.jsonl: loss, loss per timestep bucket, grad norm, lr, tokens/s,
MFU), TensorBoard event files, validation images with their page (validation.html), a smoke sample and
an HTML report (report.html) go to <storage>/<name>/. Rerunning the same command resumes from the latest checkpoint; worker failures
restart from it automatically (max_failures), at its data position. On a multi-node cluster, --storage and --data must be
reachable from every node (object store or shared file system); --set cluster.placement_strategy=STRICT_SPREAD puts one
worker per node (training/README.md, "On a multi-node cluster").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/train/*.yaml")
    ap.add_argument("--data", required=True, help="latent cache directory written by jobs/encode_latents.py")
    ap.add_argument("--storage", default="out/train", help="Ray Train storage path (local dir or URI)")
    ap.add_argument("--workers", type=int, help="override workers")
    ap.add_argument("--gpu", action="store_true", help="use_gpu=true and bf16 mixed precision")
    ap.add_argument("--steps", type=int, help="override steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any field, e.g. optim.lr=3e-4")
    a = ap.parse_args(argv)
    over = list(a.set)
    if a.workers:
        over.append(f"workers={a.workers}")
    if a.steps:
        over.append(f"steps={a.steps}")
    if a.gpu:
        over += ["use_gpu=true", "parallel.mixed_precision=bf16"]
    try:
        cfg = load_config(a.config, over)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not Path(a.data).exists() and "://" not in a.data:
        print(f"error: --data: {a.data} does not exist (run jobs/encode_latents.py first)", file=sys.stderr)
        return 2

    import ray

    from training.trainer import fit, write_sample_png

    ray.data.DataContext.get_current().enable_progress_bars = True
    local = "://" not in a.storage
    storage = str(Path(a.storage).resolve()) if local else a.storage
    log_path = str(Path(storage, cfg.name, "metrics.jsonl")) if local else str(Path("out", cfg.name, "metrics.jsonl").resolve())
    try:
        result = fit(cfg, a.data, storage, log_path)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"name": cfg.name, "stage": cfg.stage, "metrics": result.metrics, "metrics_log": log_path,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    png = None
    if result.checkpoint and local:
        png = write_sample_png(result.checkpoint.path, a.data, Path(storage, cfg.name, "sample.png"))
        summary["sample"] = png
    for key, name in (("validation", "validation.html"), ("tensorboard", "tensorboard")):
        if Path(log_path).with_name(name).exists():
            summary[key] = str(Path(log_path).with_name(name))
    if Path(log_path).is_file():
        from training.report import write_report

        summary["report"] = str(write_report(log_path, Path(log_path).with_name("report.html"), f"{cfg.name}: {cfg.stage}", png))
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
