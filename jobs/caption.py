"""Caption the kept rows of a curated Lance table with a vLLM-served VLM.

    python jobs/caption.py --input CURATED_URI --output CAPTIONS_URI --model NAME_OR_PATH
                           [--server http://host:8000/v1] [--config captioning.yaml] [...]

With --server, requests go to an OpenAI-compatible vLLM server (--model is the served name); without
it, vLLM engines run inside the Ray Data job (ray.data.llm, one per GPU worker). Exit status: 0 when
the run finished (failed rows included, counted by reason), 2 when it could not run (bad input,
server unreachable at the start), 3 when the server stayed unreachable longer than
--server-patience (finished rows committed; rerun the same command to resume), 4 when a Lance commit
failed (the rows of that commit are captioned again by the rerun).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from captioning.config import load_config
from captioning.exits import exit_status
from captioning.pipeline import run
from captioning.report import stat_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="curated Lance table URI (jobs/filter_stage1.py output)")
    p.add_argument("--output", help="captions Lance table URI (created or updated in place)")
    p.add_argument("--model", help="served model name (with --server) or model path / id")
    p.add_argument("--server", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--config", help="YAML file of captioning config fields (captioning/config.py)")
    p.add_argument("--prompt-version", dest="prompt_version", help="prompt set under captioning/prompts/")
    p.add_argument("--prompt-root", dest="prompt_root", help="directory holding prompts/ and schemas/")
    p.add_argument("--commit-every", dest="commit_every", type=int, help="rows per Lance commit (256)")
    p.add_argument("--concurrency", type=int, help="requests in flight (server mode, 32)")
    p.add_argument("--max-attempts", dest="max_attempts", type=int, help="attempts per request (3)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="generation bound per caption")
    p.add_argument("--num-gpus", dest="num_gpus", type=int, help="engine replicas (in-cluster mode)")
    p.add_argument("--server-patience", dest="server_patience_s", type=float, metavar="SECONDS",
                   help="wait this long for an unreachable server, then commit and exit 3 (600)")
    p.add_argument("--recaption", action="store_true", default=None,
                   help="caption again rows ok under another model / prompt version (kept as previous_*)")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, help="downscale larger images before sending")
    p.add_argument("--ocr-engine", dest="ocr_engine", help="rapidocr | tesseract | none (text-caption check)")
    p.add_argument("--report", help="HTML report path (default: <output>.report.html for local output)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = vars(parse_args(argv))
    config_path = args.pop("config")

    def work() -> list[str]:
        cfg = load_config(config_path, **args)
        if cfg.report is None and "://" not in cfg.output:
            import dataclasses

            cfg = dataclasses.replace(cfg, report=cfg.output.rstrip("/") + ".report.html")
        summary = run(cfg)
        return summary.lines() + (stat_lines(summary.stats) if summary.stats else [])

    return exit_status(work)


if __name__ == "__main__":
    sys.exit(main())
