"""Stage-1 filter job (Qwen-Image-2.0 §2.3, 256p T2I pre-training): every input row -> one Lance
row with scores and a keep/reject decision. Chain: broken, resolution, dedup, nsfw, rotation,
entropy, clip, token_length.

    python jobs/filter_stage1.py --input DIR|*.tar|*.parquet|*.lance --output OUT.lance [--config configs/stage1.yaml]
    ray job submit --working-dir . -- python jobs/filter_stage1.py ...      # on a cluster
    python jobs/filter_stage1.py --output OUT.lance --rethreshold --config new_thresholds.yaml
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__))
