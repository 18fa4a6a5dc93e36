"""Export a training checkpoint's EMA weights (default) or raw weights as one safetensors file that
loads without Ray (``training.export.load_exported``).

    python jobs/export.py --checkpoint out/train/pretrain_256 --out models/pretrain_256_ema.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a run directory (its latest step_*) or a step_* checkpoint")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--weights", default="ema", choices=("ema", "model"))
    a = ap.parse_args(argv)
    from training.config import ConfigError
    from training.export import export_weights

    try:
        out = export_weights(a.checkpoint, a.out, a.weights)
    except (ValueError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "bytes": out.stat().st_size, "weights": a.weights}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
