"""What both PE jobs share: the PE prompt set (text-only requests, strict JSON) and the row loop that
drives the captioning client and writer.

Nothing of the request machinery is rewritten here: `captioning.client.CaptionClient` sends every
request (structured outputs, bounded retries with backoff, the outage circuit breaker,
`ServerGone` after `server_patience_s`), `captioning.client.check_server` fails fast before any work,
and `captioning.pipeline.CaptionWriter` commits every `commit_every` rows with merge_insert on `id`
under the table's guard. `PEPromptSet` is a `captioning.prompts.PromptSet` whose messages carry a
rendered text instead of an image; its schemas and validation are the captioning ones.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import lance
import pyarrow as pa
from tqdm import tqdm

from captioning.client import CaptionClient, ServerGone, check_server
from captioning.config import CaptionConfig
from captioning.pipeline import CaptionWriter
from captioning.prompts import InvalidResponse, PromptSet
from common.typed_config import ConfigError

KINDS = ("classify", "degrade", "edit", "enhance")
PLAIN = "plain"  # a fine-tuned PE asked in its own chat format: free text, no schema
MAX_STEPS = 12  # degrade.<k> schemas are made for k = 1..MAX_STEPS strategies
THINK = re.compile(r"^.*?</think>", re.S)


class PEPromptSet(PromptSet):
    """`<root>/<version>/{system,sft_system}.txt`, `<kind>.txt` + `<kind>.json` for KINDS. A request
    kind `degrade.<k>` is the degrade schema with exactly k `removed` notes (one per strategy)."""

    @classmethod
    def load_pe(cls, root: str | Path, version: str) -> PEPromptSet:
        d = Path(root) / version
        if not d.is_dir():
            raise ConfigError(f"prompt_version: no prompt set {version!r} (expected directory {d})")
        prompts, schemas = {}, {}
        for kind in KINDS:
            for f in (d / f"{kind}.txt", d / f"{kind}.json"):
                if not f.is_file():
                    raise ConfigError(f"prompt_version: prompt set {version!r} lacks {f}")
            prompts[kind] = (d / f"{kind}.txt").read_text().strip()
            try:
                schemas[kind] = json.loads((d / f"{kind}.json").read_text())
                jsonschema.Draft202012Validator.check_schema(schemas[kind])
            except (json.JSONDecodeError, jsonschema.SchemaError) as e:
                raise ConfigError(f"prompt_version: {d / f'{kind}.json'} is not a valid JSON schema: "
                                  f"{str(e).splitlines()[0]}") from e
        for k in range(1, MAX_STEPS + 1):
            s = copy.deepcopy(schemas["degrade"])
            s["properties"]["removed"].update(minItems=k, maxItems=k)
            schemas[f"degrade.{k}"] = s
        system = {"": (d / "system.txt").read_text().strip(), PLAIN: (d / "sft_system.txt").read_text().strip()}
        return cls(version=version, system=system, prompts=prompts, schemas=schemas,
                   parts={k: (k,) for k in schemas})

    def render(self, template: str, request: str | None = None, **values: str) -> str:
        """The user text of `template` with `{schema}` (of `request`, default the template's kind) and
        `values` substituted (plain replacement: braces inside the values stay as they are)."""
        text = self.prompts[template].replace("{schema}", json.dumps(self.schemas[request or template], ensure_ascii=False))
        for k, v in values.items():
            text = text.replace("{" + k + "}", v)
        return text

    def messages(self, part: str, payload: str, mime: str = "") -> list[dict[str, Any]]:
        """System prompt + the rendered user text (`payload` travels where captioning sends an image)."""
        return [{"role": "system", "content": self.system[PLAIN if part == PLAIN else ""]},
                {"role": "user", "content": payload}]

    def response_format(self, kind: str) -> dict[str, Any] | None:
        return None if kind == PLAIN else super().response_format(kind)

    def validate(self, kind: str, text: str) -> Any:
        if kind != PLAIN:
            return super().validate(kind, text)
        answer = THINK.sub("", text).strip()  # the PE's reasoning ends at </think>; the prompt follows
        if not answer:
            raise InvalidResponse("empty", "no text after the reasoning")
        return answer


def open_output(uri: str, schema: pa.Schema) -> dict[str, str]:
    """id -> status of the rows already stored ({} when the table does not exist yet)."""
    try:
        ds = lance.dataset(uri)
    except (ValueError, OSError):
        if Path(uri).exists() and any(Path(uri).iterdir()):
            raise ConfigError(f"--output {uri}: exists but is not a Lance table") from None
        return {}
    missing = [n for n in schema.names if n not in ds.schema.names]
    if missing:
        raise ConfigError(f"--output {uri}: not a table of this job (missing {', '.join(missing)})")
    t = ds.to_table(columns=["id", "status"])
    return dict(zip(t.column("id").to_pylist(), t.column("status").to_pylist(), strict=True))


@dataclass
class RunStats:
    todo: int = 0
    skipped: int = 0
    """Ids already done (ok or rejected): not requested."""
    written: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)
    requests: int = 0
    outages: int = 0
    paused_s: float = 0.0
    elapsed_s: float = 0.0
    output_version: int | None = None

    def lines(self) -> list[str]:
        out = [f"wrote {self.written} rows ({', '.join(f'{k} {v}' for k, v in sorted(self.statuses.items())) or 'none'}), "
               f"skipped {self.skipped} already done; {self.requests} requests in {self.elapsed_s:.1f}s; "
               f"output version {self.output_version}"]
        if self.errors:
            out.append("not ok by reason: " + ", ".join(f"{k}={v}" for k, v in self.errors.most_common()))
        if self.outages:
            out.append(f"server unreachable {self.outages} times, paused {self.paused_s:.1f}s in all")
        return out


Row = dict[str, Any]


async def _run_rows(ccfg: CaptionConfig, prompts: PEPromptSet, items: Iterable[Any],
                    make_row: Callable[[CaptionClient, Any], Awaitable[Row]], failed: Callable[[Any, str, str], Row],
                    writer: CaptionWriter, stats: RunStats, desc: str, progress: bool) -> None:
    await check_server(ccfg)
    client = CaptionClient(ccfg, prompts)

    async def one(item: Any) -> Row:
        try:
            return await make_row(client, item)
        except (ServerGone, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - one bad row is recorded, never the whole run lost
            return failed(item, "internal", f"{type(e).__name__}: {e}")

    bar = tqdm(desc=desc, unit="row", disable=not progress)
    items = iter(items)
    try:
        # One chunk = one commit: the client's slots bound what is in flight; a killed run loses at
        # most the chunk being worked on.
        while chunk := list(itertools.islice(items, ccfg.commit_every)):
            results = await asyncio.gather(*(one(i) for i in chunk), return_exceptions=True)
            rows = [r for r in results if isinstance(r, dict)]
            for r in rows:
                stats.statuses[r["status"]] += 1
                if r["error_kind"]:
                    stats.errors[r["error_kind"]] += 1
                stats.requests += r["attempts"]
            await asyncio.to_thread(writer.commit, rows)  # the finished rows first, also when the server is gone
            stats.written += len(rows)
            bar.update(len(rows))
            if gone := next((r for r in results if isinstance(r, BaseException)), None):
                raise gone
    finally:
        bar.close()
        stats.outages, stats.paused_s = client.breaker.outages, client.breaker.paused_s
        await client.aclose()


def run_rows(ccfg: CaptionConfig, prompts: PEPromptSet, items: Iterable[Any],
             make_row: Callable[[CaptionClient, Any], Awaitable[Row]], failed: Callable[[Any, str, str], Row],
             writer: CaptionWriter, stats: RunStats, desc: str, progress: bool = True) -> RunStats:
    """Turn `items` into rows with `make_row` (async, given the shared client) against the server and
    commit them every `commit_every`; raises ServerUnreachable before any work, ServerGone (after
    committing what finished) and CommitFailed like the captioning job."""
    start = time.perf_counter()
    try:
        asyncio.run(_run_rows(ccfg, prompts, items, make_row, failed, writer, stats, desc, progress))
    except ServerGone as e:
        raise ServerGone(f"{e}: committed {writer.committed} finished rows this run (output version "
                         f"{writer.version}); rerun the same command to resume") from None
    stats.elapsed_s = time.perf_counter() - start
    try:
        stats.output_version = lance.dataset(ccfg.output).version
    except (ValueError, OSError):
        stats.output_version = None
    return stats


# --------------------------------------------------------------------------- the two jobs' CLI


def add_llm_arguments(p) -> None:
    """Flags both PE jobs take (an argparse.ArgumentParser); dotted dests are config fields."""
    p.add_argument("--server", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--model", help="served model name")
    p.add_argument("--config", help="YAML of config fields (default configs/pe.yaml)")
    p.add_argument("--prompt-version", dest="prompt_version")
    p.add_argument("--prompt-root", dest="prompt_root")
    p.add_argument("--commit-every", dest="client.commit_every", type=int, help="rows per Lance commit")
    p.add_argument("--concurrency", dest="client.concurrency", type=int, help="requests in flight")
    p.add_argument("--server-patience", dest="client.server_patience_s", type=float, metavar="SECONDS",
                   help="wait this long for an unreachable server, then commit and exit 3")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, dotted")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def run_job(cls: type, args: dict[str, Any], work: Callable[[Any], list[str]]) -> int:
    """Load `cls` from the parsed flags, run `work(cfg)` and print its lines; the exit status says
    how it ended: 0 done, 2 could not run (config, input, server), 3 server gone (finished rows
    committed), 4 a Lance commit failed."""
    from captioning.exits import exit_status  # the exit statuses of jobs/caption.py, one definition
    from common.typed_config import parse_assignment
    from flywheel.pe_config import load

    args = dict(args)
    config, sets = args.pop("config"), args.pop("set")
    return exit_status(lambda: work(load(cls, config, args | dict(parse_assignment(s) for s in sets))))
