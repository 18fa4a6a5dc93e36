#!/usr/bin/env bash
# The main job on generated sample data: installs if needed, writes sample photos (from
# scikit-image / scikit-learn) with corruptions and duplicates plus tiny local models, runs stage 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
rm -rf data/samples data/stage1.lance
.venv/bin/python -m curation.samples data/samples
.venv/bin/python jobs/filter_stage1.py --input data/samples/images --output data/stage1.lance \
  --config data/samples/stage1_sample.yaml --commit-every 16 "$@"
.venv/bin/python -c "
import lance, polars as pl
t = lance.dataset('data/stage1.lance').to_table(columns=['uri', 'keep', 'reject_reason', 'short_side', 'entropy', 'noise', 'nsfw_score'])
print(pl.from_arrow(t).group_by('reject_reason').len().sort('len', descending=True))"
