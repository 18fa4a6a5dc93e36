"""Stage-3 synthetic text renders (Qwen-Image-2.0 §2.3): English / Chinese / mixed text on plain,
gradient and photo backgrounds in line / paragraph / poster / slide templates, each read back with
offline OCR and rejected below a character-agreement score. Deterministic from --seed; resumable.

    python jobs/synthesize_text.py --output synth.lance --n 10000 [--backgrounds stage1.lance] [--seed 0]
    python jobs/synthesize_text.py --output synth.lance --rethreshold --set thresholds.min_ocr_score=0.9
    ray job submit --working-dir . -- python jobs/synthesize_text.py --output s3://... --n 1000000
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from common.typed_config import ConfigError, parse_assignment
from curation.synthetic_text import ROOT, load_config, rethreshold, run_synthesis


def _storage_options(uri: str) -> dict | None:
    try:  # common/storage.py (object-store settings from the environment) may not be installed yet
        from common.storage import storage_options
    except ImportError:
        return None
    return storage_options(uri)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="output Lance table URI")
    ap.add_argument("--n", type=int, help="renders in the table (indices 0..n-1 of the seed); a rerun resumes")
    ap.add_argument("--backgrounds", help="a curated stage table: its kept rows' images are the photo backgrounds "
                                          "(default: photos shipped in scikit-image / scikit-learn)")
    ap.add_argument("--seed", type=int, help="generator seed (default: the config's seed)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "synthetic_text.yaml"), help="YAML config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set thresholds.min_ocr_score=0.9")
    ap.add_argument("--commit-every", type=int, default=1_000, help="commit rendered rows at least this often")
    ap.add_argument("--rethreshold", action="store_true", help="re-decide from stored OCR scores only")
    ap.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (ignored on a cluster)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, dict(parse_assignment(s) for s in args.set))
        so = _storage_options(args.output)
        if args.rethreshold:
            summary = rethreshold(args.output, cfg, report=not args.no_report, storage_options=so)
        else:
            if args.n is None:
                raise ConfigError("--n is required (renders in the table)")
            summary = run_synthesis(args.output, args.n, cfg, args.backgrounds, args.seed, args.commit_every,
                                    progress=not args.no_progress, report=not args.no_report,
                                    storage_options=so, num_cpus=args.num_cpus)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
