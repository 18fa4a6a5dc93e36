"""Stage-1 filter job (Qwen-Image-2.0 §2.3): every input row -> one Lance row with scores and a
keep/reject decision.

    python jobs/filter_stage1.py --input DIR|*.tar|*.parquet|*.lance --output OUT.lance [--config configs/stage1.yaml]
    ray job submit --working-dir . -- python jobs/filter_stage1.py ...      # on a cluster
    python jobs/filter_stage1.py --output OUT.lance --rethreshold --config new_thresholds.yaml
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from common.typed_config import parse_assignment
from curation.config import ConfigError, load_config, parse_skip
from curation.readers import Columns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="image folder, .tar shard(s) folder, .parquet file/folder or .lance table")
    ap.add_argument("--output", required=True, help="output Lance table URI")
    ap.add_argument("--config", help="stage YAML (default: built-in stage-1 defaults)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set thresholds.clip.min_score=0.25")
    ap.add_argument("--skip", help="comma-separated filters to skip, e.g. clip,nsfw")
    ap.add_argument("--commit-every", type=int, default=10_000, help="commit scored rows at least this often")
    ap.add_argument("--rethreshold", action="store_true",
                    help="re-decide keep/reject from stored scores with the config's thresholds (no --input)")
    ap.add_argument("--image-column")
    ap.add_argument("--path-column")
    ap.add_argument("--caption-column")
    ap.add_argument("--key-column")
    ap.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (ignored on a cluster)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, dict(parse_assignment(s) for s in args.set))
        if args.rethreshold:
            from curation.run import rethreshold

            summary = rethreshold(args.output, cfg, report=not args.no_report)
        else:
            from curation.run import run_stage

            if not args.input:
                raise ConfigError("--input is required (or pass --rethreshold)")
            summary = run_stage(
                args.input, args.output, cfg, parse_skip(args.skip), args.commit_every,
                Columns(args.image_column, args.path_column, args.caption_column, args.key_column),
                progress=not args.no_progress, report=not args.no_report, num_cpus=args.num_cpus)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
