"""Global semantic (embedding) dedup, SemDeDup-style, over any Lance table with ``id`` and an
embedding column: one output row per input id with ``keep``, ``reject_reason`` (``semdup``),
``semdup_of``, ``semdup_similarity``, the cluster, the config hash and the input uri + version.

    python jobs/semantic_dedup.py --input stage4.lance --embedding-column clip_embedding --output semdup.lance
    python jobs/semantic_dedup.py ... --eps 0.03 --config dedup.yaml --set dedup.n_clusters=5000
    ray job submit --working-dir . -- python jobs/semantic_dedup.py ...      # on a cluster

Reads the stored embeddings (and the ranking columns that exist: ``dedup.rank``), never images.
A rerun with the same input version and config leaves the output as it is; otherwise the table is
rewritten in one commit (a killed run leaves the previous version).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from common.typed_config import ConfigError, parse_assignment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="Lance table with an id and an embedding column")
    ap.add_argument("--output", required=True, help="output Lance table URI")
    ap.add_argument("--embedding-column", help="embedding column (embedding_column; default clip_embedding)")
    ap.add_argument("--eps", type=float, help="near copies at cosine >= 1 - eps (dedup.eps; default 0.05)")
    ap.add_argument("--filter", help="Lance SQL filter on the input rows, e.g. 'keep = true' (filter)")
    ap.add_argument("--config", help="YAML of curation.semdedup.SemDedupJobConfig")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set dedup.n_clusters=5000")
    ap.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (ignored on a cluster)")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    try:
        from curation.semdedup import load_job_config, run_job

        overrides = dict(parse_assignment(s) for s in args.set)
        if args.embedding_column:
            overrides["embedding_column"] = args.embedding_column
        if args.filter:
            overrides["filter"] = args.filter
        if args.eps is not None:
            if not 0.0 <= args.eps < 1.0:
                raise ConfigError(f"--eps: must be in [0, 1), got {args.eps}")
            overrides["dedup.eps"] = args.eps
        if args.num_cpus is not None and args.num_cpus < 1:
            raise ConfigError(f"--num-cpus: must be >= 1, got {args.num_cpus}")
        cfg = load_job_config(args.config, overrides)
        summary = run_job(args.input, args.output, cfg, progress=not args.no_progress, num_cpus=args.num_cpus)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
