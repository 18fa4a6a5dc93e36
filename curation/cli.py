"""The command line every stage job shares (``jobs/filter_stage{1,4,5,6}.py`` are thin wrappers):
flags, config loading with ``--set`` overrides, errors as one line naming the flag or field."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.typed_config import parse_assignment

from .config import ConfigError, load_config, parse_skip
from .readers import Columns

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def parser(doc: str, default_config: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="image folder, .tar shard(s) folder, .parquet file/folder, .lance table, "
                                    "or a previous stage's output table (its kept rows)")
    ap.add_argument("--output", required=True, help="output Lance table URI")
    ap.add_argument("--config", default=default_config,
                    help=f"stage YAML (default: {default_config or 'built-in stage-1 defaults'})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set thresholds.clip.min_score=0.25")
    ap.add_argument("--skip", help="comma-separated filters of the stage to skip, e.g. clip,nsfw")
    ap.add_argument("--commit-every", type=int, default=10_000, help="commit scored rows at least this often")
    ap.add_argument("--rethreshold", action="store_true",
                    help="re-decide keep/reject from stored scores with the config's thresholds (no --input)")
    ap.add_argument("--category-column", help="category per row from this column of the input table "
                                              "(scoring.category.column) instead of CLIP zero-shot")
    ap.add_argument("--eps", type=float, help="semantic dedup: near copies at cosine >= 1 - eps "
                                              "(thresholds.semdedup.eps)")
    ap.add_argument("--image-column")
    ap.add_argument("--path-column")
    ap.add_argument("--caption-column")
    ap.add_argument("--key-column")
    ap.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (ignored on a cluster)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    return ap


def execute(args: argparse.Namespace, load, run, overrides: dict | None = None) -> int:
    """The body every stage command shares (stage 2's too): ``--set`` (then ``overrides``) ->
    ``load(overrides)`` -> the config; then ``--rethreshold`` (re-decide from stored scores) or
    ``run(cfg)``; a ConfigError is one line on stderr and exit status 2; else the summary, 0."""
    try:
        cfg = load(dict(parse_assignment(s) for s in args.set) | (overrides or {}))
        if args.rethreshold:
            from .run import rethreshold

            summary = rethreshold(args.output, cfg, report=not args.no_report)
        else:
            summary = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0


def main(argv: list[str] | None = None, doc: str = "", default_config: str | None = None) -> int:
    args = parser(doc, default_config).parse_args(argv)
    overrides = {}
    if args.category_column:
        overrides["scoring.category.column"] = args.category_column
    if args.eps is not None:
        overrides["thresholds.semdedup.eps"] = args.eps

    def run(cfg):
        from .run import run_stage

        if not args.input:
            raise ConfigError("--input is required (or pass --rethreshold)")
        return run_stage(
            args.input, args.output, cfg, parse_skip(args.skip, cfg), args.commit_every,
            Columns(args.image_column, args.path_column, args.caption_column, args.key_column),
            progress=not args.no_progress, report=not args.no_report, num_cpus=args.num_cpus)

    return execute(args, lambda ov: load_config(args.config, ov), run, overrides)
