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

from flywheel.pe_llm import add_llm_arguments, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", help="captions Lance table (jobs/caption.py output)")
    p.add_argument("--output", help="PE data Lance table (created or updated in place)")
    p.add_argument("--edits", help="edit annotations (.jsonl/.parquet/Lance) to summarise into editing prompts")
    p.add_argument("--report", help="HTML report path (default <output>.report.html)")
    p.add_argument("--export", metavar="DIR", help="also write the SFT export (train/validation) to DIR")
    p.add_argument("--export-format", default="jsonl", choices=("jsonl", "parquet"))
    add_llm_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from flywheel.pe_config import PEConfig
    from flywheel.pe_data import default_report, run
    from flywheel.pe_export import export
    from flywheel.pe_report import compute_stats, stat_lines, write_report

    args = vars(parse_args(argv))
    out_dir, fmt = args.pop("export"), args.pop("export_format")

    def work(cfg: PEConfig) -> list[str]:
        summary = run(cfg)
        lines = summary.lines()
        if summary.output_version is not None:
            stats = compute_stats(cfg.output)
            lines += stat_lines(stats)
            if report := default_report(cfg):
                lines.append(f"report: {write_report(stats, report, title=f'PE data: {cfg.model} / {cfg.prompt_version}')}")
            if out_dir:
                counts = export(cfg, out_dir, fmt)
                lines.append(f"SFT export ({fmt}) in {out_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return lines

    return run_job(PEConfig, args, work)


if __name__ == "__main__":
    sys.exit(main())
