"""Rewrite prompts with a served Prompt Enhancer (the flywheel's prompt-engineering track).

    python jobs/enhance_prompts.py --input prompts.jsonl --output ENHANCED_URI --server http://host:8000/v1 \
        --model NAME [--plain] [--config configs/pe.yaml]

prompts.jsonl: one {"prompt": "...", "id": "..."} per line (id optional: a hash of the prompt).
Stores original, enhanced, model and time per id; rerun the same command to resume. --plain: the
model is a PE fine-tuned on jobs/build_pe_data.py's export (its own chat format, no JSON schema).
Exit status as jobs/build_pe_data.py (0 done, 2 could not run, 3 server gone, 4 commit failed).
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
    p.add_argument("--input", help="JSON-lines file of prompts")
    p.add_argument("--output", help="Lance table of enhanced prompts (created or updated in place)")
    p.add_argument("--server", help="OpenAI-compatible base URL")
    p.add_argument("--model", help="served prompt-enhancer model name")
    p.add_argument("--config", help="YAML whose server/model/prompt_version/client fields apply (default configs/pe.yaml)")
    p.add_argument("--plain", action="store_true", default=None, help="the model is our fine-tuned PE (no JSON schema)")
    p.add_argument("--prompt-version", dest="prompt_version")
    p.add_argument("--commit-every", dest="client.commit_every", type=int)
    p.add_argument("--concurrency", dest="client.concurrency", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, dotted")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from flywheel.enhance import run
    from flywheel.pe_config import EnhanceConfig, load

    args = vars(parse_args(argv))
    config, sets = args.pop("config"), args.pop("set")
    try:
        cfg = load(EnhanceConfig, config, dict(args) | dict(parse_assignment(s) for s in sets))
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
    print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
