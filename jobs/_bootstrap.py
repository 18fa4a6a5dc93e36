"""Make the project importable when a job runs from a `ray job submit --working-dir .` checkout
without `pip install` (the working dir is the repo root, the script's dir is jobs/)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
