"""Stage-2 edit-pair filter job (Qwen-Image-2.0 §2.3, TI2I data): every input pair -> one Lance row
(curation/stage2_schema.py) with scores, keep and reject_reason. Chain: broken, source/target
resolution, source/target NSFW, instruction, no-op, unrelated, direction, judge (optional VLM),
duplicate pairs.

    python jobs/filter_stage2.py --pairs PAIRS.parquet|.jsonl|.lance|DIR_OF_TARS --output S2.lance [--source edit:NAME]
    python jobs/filter_stage2.py --output S2.lance --rethreshold --set thresholds.noop.min_ssim=0.95
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401

from curation.stage2 import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
