"""The data flywheel's nightly run (Qwen-Image-2.0 §2.4): ingest new failure signals, refresh the
retrieval index, attribute each failure to the pre-training / prompt-engineering / RL track, run the
tracks, queue items for human review, merge approved items into the next training-mixture version,
write the HTML report.

    python jobs/flywheel_nightly.py --config configs/flywheel.yaml
    ray job submit --working-dir . -- python jobs/flywheel_nightly.py --config configs/flywheel.yaml
    # cron, 02:30 every night:
    30 2 * * * cd /srv/qimg-data && .venv/bin/python jobs/flywheel_nightly.py --config configs/flywheel.yaml >> logs/flywheel.log 2>&1

Idempotent: rerun freely (a second run writes nothing; a killed run, rerun, ends as an uninterrupted
one). Exit status 0 on success (a night with no signals included), 2 for a bad config, 1 for any
other failure, with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from common.typed_config import ConfigError, parse_assignment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="flywheel YAML (configs/flywheel.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--progress", action="store_true", help="Ray Data progress bars")
    ap.add_argument("--quiet", action="store_true", help="print the summary only")
    args = ap.parse_args(argv)
    try:
        from flywheel.config import load_config

        cfg = load_config(args.config, dict(parse_assignment(s) for s in args.set))
        from flywheel.nightly import run_nightly

        summary = run_nightly(cfg, progress=args.progress,
                              step_log=(lambda _: None) if args.quiet else (lambda m: print(m, flush=True)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # cron mails stderr: one line that says what failed
        print(f"error: flywheel nightly failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
