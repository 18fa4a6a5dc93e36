"""Rewrite prompts with a served Prompt Enhancer (the flywheel's prompt-engineering track).

    python jobs/enhance_prompts.py --input prompts.jsonl --output ENHANCED_URI --server http://host:8000/v1 \
        --model NAME [--plain] [--config configs/pe.yaml]

prompts.jsonl: one {"prompt": "...", "id": "..."} per line (id optional: a hash of the prompt).
Stores original, enhanced, model and time per id; rerun the same command to resume. --plain: the
model is a PE fine-tuned on jobs/build_pe_data.py's export (its own chat format, no JSON schema).
Only server/model/prompt_version/prompt_root/client of the config file apply. Exit status as
jobs/build_pe_data.py (0 done, 2 could not run, 3 server gone, 4 commit failed).
"""

from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401

from flywheel.pe_llm import add_llm_arguments, run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="JSON-lines file of prompts")
    p.add_argument("--output", help="Lance table of enhanced prompts (created or updated in place)")
    p.add_argument("--plain", action="store_true", default=None, help="the model is our fine-tuned PE (no JSON schema)")
    add_llm_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from flywheel.enhance import run
    from flywheel.pe_config import EnhanceConfig

    return run_job(EnhanceConfig, vars(parse_args(argv)), lambda cfg: run(cfg).lines())


if __name__ == "__main__":
    sys.exit(main())
