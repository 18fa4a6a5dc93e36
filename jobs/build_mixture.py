"""Build one training stage's mixture (Qwen-Image-2.0 Table 2): T2I rows and TI2I pairs drawn from
curated stage tables at the stage's ratio (0.9:0.1 at 256/512 px, 0.7:0.3 at 512-2048 px), each
source's share capped by its quota, every row with its lineage; deterministic from the seed.
The trainer reads it through `jobs/encode_latents.py --mixture OUT.lance`.

    python jobs/build_mixture.py --stage 4 --config configs/mixtures.yaml --output data/mix_s4.lance
"""

from __future__ import annotations

import argparse
import json
import sys

import _bootstrap  # noqa: F401

from common.typed_config import ConfigError, parse_assignment
from curation.mixture import build_mixture, load_mixtures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, required=True, help="training stage (1-6) in the config")
    ap.add_argument("--config", default="configs/mixtures.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. stages.2.rows=1000")
    ap.add_argument("--output", required=True, help="output Lance table URI (overwritten)")
    a = ap.parse_args(argv)
    try:
        cfg = load_mixtures(a.config, dict(parse_assignment(s) for s in a.set))
        summary = build_mixture(cfg, a.stage, a.output)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
