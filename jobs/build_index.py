"""Build or refresh the flywheel's retrieval index (LanceDB) over curated pools: stored CLIP image
embeddings, CLIP text embeddings of the captions, a full-text index on the caption text.

    python jobs/build_index.py --config configs/flywheel.yaml
    python jobs/build_index.py --pool main=out/stage1.lance,out/captions.lance --output flywheel.lancedb \\
        --set index.clip.weights=/models/clip.pt
    ray job submit --working-dir . -- python jobs/build_index.py --config configs/flywheel.yaml

Incremental: only new or changed rows are embedded and merged (merge_insert on id); rerun freely.
Run one at a time per index (one writer).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from common.typed_config import ConfigError, parse_assignment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="flywheel YAML (pools, index settings)")
    ap.add_argument("--pool", action="append", default=[], metavar="NAME=CURATED[,CAPTIONS]",
                    help="a curated Lance table and optionally its captions table (repeatable)")
    ap.add_argument("--output", help="LanceDB URI of the flywheel database (overrides workdir)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--progress", action="store_true", help="Ray Data progress bars")
    args = ap.parse_args(argv)
    try:
        from flywheel.config import load_config

        overrides = dict(parse_assignment(s) for s in args.set)
        if args.output:
            overrides["workdir"] = args.output
        for spec in args.pool:
            name, _, uris = spec.partition("=")
            if not name or not uris:
                raise ConfigError(f"--pool: expected NAME=CURATED[,CAPTIONS], got {spec!r}")
            curated, _, captions = uris.partition(",")
            overrides[f"pools.{name}"] = {"curated": curated, **({"captions": captions} if captions else {})}
        cfg = load_config(args.config, overrides)
        from flywheel.index import build_index
        from flywheel.store import connect

        summary = build_index(cfg, connect(cfg.workdir), progress=args.progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one line for cron mail; the traceback is for a debugger
        print(f"error: build_index failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
