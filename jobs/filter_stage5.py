"""Stage-5 filter job (Qwen-Image-2.0 §2.3): the 2048p resolution filter (from a stage-4 table nothing
is decoded: the sizes are copied).

    python jobs/filter_stage5.py --input STAGE4.lance|DIR|... --output OUT.lance
"""

from __future__ import annotations

import sys

import _bootstrap  # noqa: F401

from curation.cli import CONFIGS, main

if __name__ == "__main__":
    sys.exit(main(doc=__doc__, default_config=str(CONFIGS / "stage5.yaml")))
