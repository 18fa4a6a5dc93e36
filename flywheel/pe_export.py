"""SFT export of a PE_DATA table: chat-format records (the `messages` list PE fine-tuning tools such
as LLaMA-Factory's sharegpt/openai format and ms-swift read), split into train / validation by a hash
of the id, so a row stays in its split when the table grows.

    {"id": ..., "task": "t2i", "category": ..., "language": ..., "difficulty": ...,
     "messages": [{"role": "system", "content": <sft_system.txt>},
                  {"role": "user", "content": P_short},
                  {"role": "assistant", "content": "<think>\\nCoT\\n</think>\\n\\nP_fine"}]}
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lance
import polars as pl

from flywheel.pe_config import PEConfig
from flywheel.pe_llm import PLAIN, PEPromptSet
from flywheel.pe_schema import STATUS_OK

SPLITS = ("train", "validation")


def split_of(row_id: str, validation_fraction: float) -> str:
    """validation when the id's hash falls in the first `validation_fraction` of [0, 1)."""
    h = int.from_bytes(hashlib.sha1(row_id.encode()).digest()[:8], "big") / 2**64
    return "validation" if h < validation_fraction else "train"


def assistant_text(cfg: PEConfig, cot: str | None, p_fine: str) -> str:
    return cfg.think_template.replace("{cot}", cot).replace("{p_fine}", p_fine) if cot else p_fine


def export(cfg: PEConfig, out_dir: str | Path, fmt: str = "jsonl") -> dict[str, int]:
    """Write <out_dir>/{train,validation}.{jsonl|parquet} from the ok rows of cfg.output; returns
    rows per split."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"--export-format: expected jsonl or parquet, got {fmt!r}")
    system = PEPromptSet.load_pe(cfg.prompt_root, cfg.prompt_version).system[PLAIN]
    table = lance.dataset(cfg.output).to_table(
        columns=["id", "task", "category", "language", "difficulty", "p_short", "cot", "p_fine"],
        filter=f"status = '{STATUS_OK}'")
    records = [{"id": r["id"], "task": r["task"], "category": r["category"], "language": r["language"],
                "difficulty": r["difficulty"],
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": r["p_short"]},
                             {"role": "assistant", "content": assistant_text(cfg, r["cot"], r["p_fine"])}]}
               for r in table.to_pylist()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        part = [r for r in records if split_of(r["id"], cfg.validation_fraction) == split]
        df = pl.DataFrame(part, schema={"id": pl.String, "task": pl.String, "category": pl.String,
                                        "language": pl.String, "difficulty": pl.String,
                                        "messages": pl.List(pl.Struct({"role": pl.String, "content": pl.String}))})
        path = out / f"{split}.{fmt}"
        df.write_ndjson(path) if fmt == "jsonl" else df.write_parquet(path)
        counts[split] = len(part)
    return counts
