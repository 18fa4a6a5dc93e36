"""Is the captioning job the bottleneck? Its requests/s vs a bare concurrent-request loop, same server.

One vLLM server (a tiny random Qwen2-VL on CPU, or --server/--model for a real one) answers both:
  * pipeline: `captioning.pipeline.run` on a curated Lance table (read blobs, route, caption,
    validate every answer, commit to Lance, compute statistics), timed end to end;
  * baseline: an httpx async loop with the same concurrency sending the same request bodies (same
    images, prompts, schemas, seeds; captions for the types the pipeline's routing chose), with no
    validation and no Lance.
Rounds alternate baseline/pipeline so drift in a shared machine hits both; the ratio is the median
of the per-round ratios (each round's two sides ran back to back). Last line: `caption pipeline/engine ratio: X.XX` (target >= 0.90).

    python benchmarks/caption.py [--images 96] [--rounds 9] [--concurrency 16] [--max-num-seqs 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import lance

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioning.client import chat_body, make_http_client, request_seed  # noqa: E402
from captioning.config import load_config  # noqa: E402
from captioning.pipeline import run  # noqa: E402
from captioning.prompts import ROUTE, PromptSet  # noqa: E402
from captioning.routing import caption_types  # noqa: E402
from captioning.testing import VLLMServer, build_tiny_qwen2vl, jpeg, synthetic_image, write_curated  # noqa: E402

TINY_ROOT = ROOT / "tests" / "captioning" / "data"


async def bare_loop(cfg, prompts: PromptSet, work: list[tuple[str, bytes, list[str]]]) -> tuple[int, float]:
    """The baseline: route, then the routed caption requests, per image; `concurrency` in flight."""
    slots = asyncio.Semaphore(cfg.concurrency)
    sent = 0

    async with make_http_client(cfg, cfg.server) as http:
        async def post(kind: str, row_id: str, image: bytes) -> None:
            nonlocal sent
            async with slots:
                body = chat_body(prompts, cfg, kind, image, request_seed(cfg, row_id, 0))
                for attempt in range(3):  # a reset connection (a keep-alive the server just closed) is resent
                    try:
                        (await http.post("/chat/completions", json=body)).raise_for_status()
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                sent += 1

        async def one(row_id: str, image: bytes, kinds: list[str]) -> None:
            await post(ROUTE, row_id, image)
            await asyncio.gather(*(post(k, row_id, image) for k in kinds))

        start = time.perf_counter()
        await asyncio.gather(*(one(*w) for w in work))
        return sent, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--concurrency", type=int, default=16,
                    help="requests in flight, both sides (a bit above the server's --max-num-seqs, as in production)")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="the tiny server's --max-num-seqs")
    ap.add_argument("--server", help="use a running server instead of starting the tiny model")
    ap.add_argument("--model", default="tiny-qwen2-vl")
    ap.add_argument("--prompt-version", default="tiny")
    ap.add_argument("--prompt-root", default=str(TINY_ROOT))
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="caption_bench_"))
    images = [jpeg(synthetic_image(i, (320, 256))) for i in range(args.images)]
    src = write_curated(tmp / "curated.lance", [True] * args.images, images)
    ids = src.to_table(columns=["id"]).column("id").to_pylist()
    server = None
    if args.server is None:
        server = VLLMServer(build_tiny_qwen2vl(tmp / "model"), served_name=args.model,
                            max_num_seqs=args.max_num_seqs, log_path=tmp / "server.log").start()
    url = args.server or server.url
    try:
        def cfg_for(out: str):
            return load_config(input=str(tmp / "curated.lance"), output=out, model=args.model, server=url,
                               prompt_root=args.prompt_root, prompt_version=args.prompt_version,
                               max_tokens=args.max_tokens, route_max_tokens=96, concurrency=args.concurrency,
                               progress=False, ocr_engine="none")  # OCR is CPU work the bare loop does not do

        prompts = PromptSet.load(args.prompt_root, args.prompt_version)
        # Warm the server (the first requests compile grammars) and fix the routed caption types that
        # the baseline sends: same seeds, so the pipeline's routing answers repeat in every round.
        warm = str(tmp / "warmup.lance")
        run(cfg_for(warm))
        routes = {x["id"]: x["route_json"] for x in lance.dataset(warm).to_table().to_pylist()}
        # Requests as the job sends them: each routed caption type in its prompt parts (one per language in v2).
        work = [(i, img, [p for k in caption_types(json.loads(routes[i])) for p in prompts.parts[k]] if routes[i] else [])
                for i, img in zip(ids, images, strict=True)]
        pipe, base = [], []
        for r in range(args.rounds):
            out = str(tmp / f"captions_{r}.lance")
            timings = {}
            # Alternate the order so that drift on a shared machine does not favour one side.
            for side in (("pipeline", "baseline") if r % 2 == 0 else ("baseline", "pipeline")):
                t0, c0 = time.perf_counter(), time.process_time()
                if side == "pipeline":
                    summary = run(cfg_for(out))
                    n = summary.requests
                else:
                    n, _ = asyncio.run(bare_loop(cfg_for(out), prompts, work))
                timings[side] = (n, time.perf_counter() - t0, time.process_time() - c0)
            (pn, ps, pc), (bn, bs, bc) = timings["pipeline"], timings["baseline"]
            pipe.append(pn / ps)
            base.append(bn / bs)
            print(f"round {r}: pipeline {pn} requests in {ps:.2f}s (captioning loop {summary.elapsed_s:.2f}s) "
                  f"= {pipe[-1]:.2f} req/s, client CPU {pc:.1f}s "
                  f"({summary.ok} ok, {summary.failed} failed rows); bare loop {bn} requests in {bs:.2f}s "
                  f"= {base[-1]:.2f} req/s, client CPU {bc:.1f}s")
    finally:
        if server is not None:
            server.stop()
    p, b = statistics.median(pipe), statistics.median(base)
    ratios = [x / y for x, y in zip(pipe, base, strict=True)]
    print(f"pipeline {p:.2f} req/s, bare loop {b:.2f} req/s (medians of {args.rounds} rounds, concurrency "
          f"{args.concurrency}, server max-num-seqs {args.max_num_seqs}, {args.images} images); "
          f"per-round ratios {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"caption pipeline/engine ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
