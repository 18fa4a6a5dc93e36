"""Stage-4 filter job (Qwen-Image-2.0 §2.3, 512p/1024p pre-training): resolution, image quality
(BRISQUE), aesthetic (LAION head on clip_embedding) and compression quality (JPEG quality factor,
blockiness).

    python jobs/filter_stage4.py --input STAGE1.lance|DIR|*.tar|*.parquet|*.lance --output OUT.lance [--config configs/stage4_1024.yaml]
    python jobs/filter_stage4.py --output OUT.lance --rethreshold --set thresholds.aesthetic.min_score=5.5
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401

from curation.cli import CONFIGS, main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__, default_config=str(CONFIGS / "stage4.yaml")))
