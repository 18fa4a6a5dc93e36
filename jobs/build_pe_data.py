"""Build Prompt-Enhancer training data from a captions table (Qwen-Image-2.0 §3.3).

    python jobs/build_pe_data.py --captions CAPTIONS_URI --output PE_URI --server http://host:8000/v1 \
        --model NAME [--config configs/pe.yaml] [--edits edits.jsonl] [--export DIR [--export-format parquet]]

Classifies each fine caption, degrades it with seeded strategies from the pool, writes the inverse
steps as CoT; rejects meaning-changing degradations with the reason; resumable (rerun the same
command). Writes an HTML report (<output>.report.html) and, with --export, the SFT chat files.
Exit status: 0 finished (failed/rejected rows counted), 2 could not run (bad config, input, server),
3 server gone past --server-patience (finished rows committed), 4 a Lance commit failed.
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from captioning.client import ServerGone, ServerUnreachable
from captioning.pipeline import CommitFailed
from common.typed_config import ConfigError, parse_assignment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", help="captions Lance table (jobs/caption.py output)")
    p.add_argument("--output", help="PE data Lance table (created or updated in place)")
    p.add_argument("--server", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--model", help="served model name")
    p.add_argument("--config", help="YAML of PEConfig fields (default configs/pe.yaml)")
    p.add_argument("--edits", help="edit annotations (.jsonl/.parquet/Lance) to summarise into editing prompts")
    p.add_argument("--prompt-version", dest="prompt_version")
    p.add_argument("--prompt-root", dest="prompt_root")
    p.add_argument("--commit-every", dest="client.commit_every", type=int, help="rows per Lance commit")
    p.add_argument("--concurrency", dest="client.concurrency", type=int, help="requests in flight")
    p.add_argument("--server-patience", dest="client.server_patience_s", type=float, metavar="SECONDS")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, dotted")
    p.add_argument("--report", help="HTML report path (default <output>.report.html)")
    p.add_argument("--export", metavar="DIR", help="also write the SFT export (train/validation) to DIR")
    p.add_argument("--export-format", default="jsonl", choices=("jsonl", "parquet"))
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from flywheel.pe_config import PEConfig, load
    from flywheel.pe_data import default_report, run
    from flywheel.pe_export import export
    from flywheel.pe_report import compute_stats, stat_lines, write_report

    args = vars(parse_args(argv))
    config, sets, out_dir, fmt = args.pop("config"), args.pop("set"), args.pop("export"), args.pop("export_format")
    try:
        overrides = dict(args) | dict(parse_assignment(s) for s in sets)
        cfg = load(PEConfig, config, overrides)
        summary = run(cfg)
    except (ConfigError, ServerUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ServerGone as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CommitFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    lines = summary.lines()
    if summary.output_version is not None:
        stats = compute_stats(cfg.output)
        lines += stat_lines(stats)
        if report := default_report(cfg):
            lines.append(f"report: {write_report(stats, report, title=f'PE data: {cfg.model} / {cfg.prompt_version}')}")
        if out_dir:
            counts = export(cfg, out_dir, fmt)
            lines.append(f"SFT export ({fmt}) in {out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
