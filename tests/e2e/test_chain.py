"""The whole chain as a new user runs it, each step the real CLI on the previous step's real output:
a folder of images -> jobs/filter_stage1.py -> jobs/caption.py (real CPU vLLM server, tiny random
Qwen2-VL) -> jobs/encode_latents.py -> jobs/train.py (a few steps) -> checkpoint + sample image.
No intermediate table is built by hand."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lance
import pytest

from captioning.testing import shared_tiny_vlm, shared_vllm_server, synthetic_image, vllm_available

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]
SERVED = "tiny-qwen2-vl"
sys.path.insert(0, str(ROOT / "tests" / "training"))

import tiny  # noqa: E402  (tests/training/tiny.py: tiny VAE + condition encoder, saved locally)


# The tiny VLM and its real vLLM server are the ones tests/captioning uses (one per process,
# captioning/testing.py); the fixtures live here, not in a conftest, so that `from conftest import`
# in tests/captioning never meets a second conftest module.
@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    return shared_tiny_vlm(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def vllm_server(tiny_vlm, tmp_path_factory):
    """The server, still booting: the test waits for it right before captioning, so that its start
    overlaps the tiny training models' build and stage 1."""
    reason = vllm_available()
    if reason:
        pytest.skip(reason)
    return shared_vllm_server(tmp_path_factory.getbasetemp(), SERVED, wait=False)


@pytest.fixture(scope="session")
def train_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train_models")
    return {"vae": str(tiny.make_tiny_vae(root / "vae")), "text": str(tiny.make_tiny_qwen_vl(root / "qwen"))}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0",
       "TOKENIZERS_PARALLELISM": "false",
       "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}  # Ray Train sees the end of the run 0.2 s late, not up to 2 s
TINY = ROOT / "tests" / "captioning" / "data"


def job(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / name), *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def routed_to_everything(root: Path) -> Path:
    """The tiny prompt set with a routing schema that only allows `true`: a random model routes at
    random, and this test needs every caption type."""
    for sub in ("prompts", "schemas"):
        shutil.copytree(TINY / sub / "tiny", root / sub / "e2e")
    route = json.loads((root / "schemas" / "e2e" / "route.json").read_text())
    for prop in route["properties"].values():
        prop["enum"] = [True]
    (root / "schemas" / "e2e" / "route.json").write_text(json.dumps(route))
    return root


def test_images_to_trained_checkpoint_with_every_caption_type_and_language(tmp_path, tiny_vlm, vllm_server, train_models):
    images = tmp_path / "images"
    images.mkdir()
    # Four images: each one costs 9 requests to the one-thread CPU server (routing + 4 types x 2
    # languages); four already need every caption type and language, and a training batch.
    for i in range(4):
        synthetic_image(i).save(images / f"img{i:02d}.jpg", quality=90)
    shutil.copy(images / "img00.jpg", images / "img00_copy.jpg")  # rejected by stage 1 (duplicate)
    curated, captions, cache, runs = (str(tmp_path / n) for n in ("curated.lance", "captions.lance", "cache", "runs"))

    job("filter_stage1.py", "--input", str(images), "--output", curated, "--skip", "clip,nsfw",
        "--set", f"scoring.tokenizer={tiny_vlm}", "--num-cpus", "1", "--no-progress", "--no-report")
    kept = lance.dataset(curated).count_rows(filter="keep = true")
    assert kept == 4

    # The random model's transcriptions never match OCR: keep them (agreement still measured, see the
    # report) so every type reaches training; test_ocr_check.py covers the flagging.
    config = tmp_path / "caption.yaml"
    config.write_text("max_tokens: 160\nroute_max_tokens: 96\nmax_attempts: 4\nconcurrency: 8\nocr_min_agreement: 0.0\n")
    vllm_server.wait_ready(timeout_s=600)
    cap = job("caption.py", "--input", curated, "--output", captions, "--model", SERVED, "--server", vllm_server.url,
              "--config", str(config), "--prompt-root", str(routed_to_everything(tmp_path / "prompt_set")),
              "--prompt-version", "e2e", "--no-progress")
    rows = lance.dataset(captions).to_table().to_pylist()
    assert len(rows) == kept and "OCR check of" in cap.stdout
    ok = [r for r in rows if r["caption_status"] == "ok"]
    assert ok and all(r[f"caption_{t}"] for r in ok for t in ("general", "text", "knowledge", "structured"))

    enc = job("encode_latents.py", "--curated", curated, "--captions", captions, "--out", cache,
              "--vae", train_models["vae"], "--text-encoder", train_models["text"], "--resolution", "64",
              "--bucket-multiple", "16", "--max-text-len", "64", "--batch-size", "8")
    summary = json.loads(enc.stdout[enc.stdout.index("{"):])
    assert summary["images"] == kept
    assert summary["images_by_caption"] == {"captioned": len(ok), "failed": kept - len(ok), "missing": 0}
    # Folder images have no alt text: a failed row has no text at all (T2I never draws it).
    assert summary["alt_text_fallback"] == 0 and summary["no_text"] == kept - len(ok)
    text = lance.dataset(f"{cache}/text.lance").to_table(columns=["id", "kind", "lang"]).to_pylist()
    arrived = {(r["kind"], r["lang"]) for r in text}
    for kind in ("short", "medium", "dense", "text", "knowledge", "structured"):
        assert {(kind, "en"), (kind, "zh")} <= arrived, kind
    assert ("alt", "und") not in arrived  # stage 1 read folder images without alt text
    assert {r["id"] for r in text if r["kind"] != "null"} == {r["id"] for r in ok}

    train = job("train.py", "--config", str(ROOT / "configs" / "train" / "debug_cpu.yaml"), "--data", cache,
                "--storage", runs, "--steps", "2", "--workers", "1", "--set", "ckpt_every=2", "--set", "name=e2e")
    result = json.loads(train.stdout[train.stdout.index("{\n"):])
    assert result["checkpoint"] and (Path(result["checkpoint"]) / ".metadata").is_file()
    assert Path(result["sample"]).is_file() and Path(result["sample"]).stat().st_size > 0
