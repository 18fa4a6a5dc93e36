"""Stage-6 SFT distribution filter (Qwen-Image-2.0 §2.3): the earlier filters with stricter thresholds
from stored scores, semantic dedup on stored clip_embedding, category rebalancing (reason balance).

    python jobs/filter_stage6.py --input STAGE4_OR_5.lance --output OUT.lance [--category-column source] [--eps 0.05]
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401

from curation.cli import CONFIGS, main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__, default_config=str(CONFIGS / "stage6.yaml")))
