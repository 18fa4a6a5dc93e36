"""Tiny random models and a tiny curated Lance table, built locally (no hub), saved with
``save_pretrained`` so the tests load them through the same code path a real run uses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from curation.schema import SCHEMA

WORDS = ("a red blue green cat dog house tree car sky sea photo of the on in with big small text sign "
         "image describe color shape size texture quantity spatial relationships objects and background "
         "system user assistant 猫 狗 房子").split()


def make_tiny_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=1.0)
    vae.save_pretrained(path)
    return path


def make_tiny_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(WORDS)) + list(":,.\n"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.save_pretrained(path)
    return fast


def make_tiny_qwen_vl(path: Path, hidden: int = 32) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = make_tiny_tokenizer(path)
    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=len(tok) - 1, video_token_id=len(tok) - 1, vision_start_token_id=2, vision_end_token_id=3)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)
    return path


def make_tiny_dinov2(path: Path) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             patch_size=4, image_size=32)).save_pretrained(path)
    return path


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    from PIL import Image

    # Smooth colour blobs: structured enough that a tiny model can fit them.
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    c = rng.random((3, 3))
    img = np.stack([np.sin(6 * (c[k, 0] * xx + c[k, 1] * yy) + 6 * c[k, 2]) for k in range(3)], -1)
    buf = io.BytesIO()
    Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_curated_table(uri: str, n: int = 12, seed: int = 0) -> list[str]:
    """A curated table following curation/schema.py: n kept rows of two aspect ratios, one rejected."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n + 1):
        w, h = [(64, 64), (96, 48), (48, 96)][i % 3]
        rows.append({"id": f"img{i:03d}", "uri": f"synthetic#{i}", "caption": f"a {WORDS[1 + i % 3]} photo of a {WORDS[4 + i % 4]}",
                     "width": w, "height": h, "format": "JPEG", "stage": "stage1", "keep": i < n,
                     "reject_reason": None if i < n else "nsfw", "image": _jpeg(rng, w, h)})
    cols = {f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in SCHEMA}
    lance.write_dataset(pa.table(cols, schema=SCHEMA), uri, mode="overwrite")
    return [r["id"] for r in rows if r["keep"]]


def make_captions_table(uri: str, curated_uri: str, ids: list[str]) -> dict[str, str]:
    """A captions table written by the captioning job's own row builder and writer
    (``captioning.pipeline.result_row`` / ``CaptionWriter``, schema ``captioning/schema.py``), with
    answers valid under the v1 prompt set's JSON schemas. Per id, by position k: k % 4 == 0 every
    caption type, 1 general only, 2 general + text, 3 a failed row (falls back to the alt text); the
    last id is left out (not captioned). Returns id -> what the row is."""
    from captioning.client import Outcome
    from captioning.config import PACKAGE_DIR, load_config
    from captioning.pipeline import CaptionWriter, result_row
    from captioning.prompts import ROUTE, PromptSet

    v1 = PromptSet.load(PACKAGE_DIR, "v1")
    cfg = load_config(input=curated_uri, output=uri, model="tiny-test-vlm", prompt_version="v1")
    source_version = lance.dataset(curated_uri).version

    def ok(kind: str, value: dict) -> Outcome:
        text = json.dumps(value, ensure_ascii=False)
        return Outcome(kind, 1, text=text, value=v1.validate(kind, text))

    rows, what = [], {}
    for k, i in enumerate(ids[:-1]):
        c = WORDS[1 + k % 3]
        general = {"en": {"short": f"a {c} cat photo", "medium": f"a photo of a {c} cat on the sea with a small tree",
                          "dense": f"a big photo of a {c} cat in the house with a small tree and a blue sky, "
                                   f"the cat is on the big red car in the image with a green sign and text"},
                   "zh": {"short": "一只猫的照片", "medium": "海边一只猫的照片，旁边有一棵小树和一座房子。",
                          "dense": "一张大照片：房子里有一只猫，旁边有一棵小树和蓝色的天空，猫在一辆大红车上，"
                                   "图片里还有一个绿色的牌子和文字，背景是蓝色的大海和白色的云，光线明亮柔和，画面构图简洁。"}}
        kinds = ["general", "text", "knowledge", "structured"] if k % 4 == 0 else ["general", "text"] if k % 4 == 2 else ["general"]
        route = {"has_text": "text" in kinds, "is_structured": "structured" in kinds, "has_known_entities": "knowledge" in kinds}
        outs = [ok("general", general)]
        if "text" in kinds:
            outs.append(ok("text", {"layout": "sign", "blocks": [{"text": "SALE", "position": "top", "role": "title"},
                                                                 {"text": "big sale", "position": "bottom", "role": "body"}],
                                    "en": 'a green sign with the text "SALE" on top', "zh": '一个绿色的牌子，顶部用白色大字写着"SALE"。'}))
        if "knowledge" in kinds:
            outs.append(ok("knowledge", {"entities": [{"name": "cat", "type": "species", "confidence": "high"}],
                                         "en": "a cat, a small domestic animal kept as a pet",
                                         "zh": "猫是一种常见的家养小动物，常被当作宠物饲养。"}))
        if "structured" in kinds:
            outs.append(ok("structured", {"kind": "diagram", "entities": [
                {"id": "a", "label": "cat", "attributes": {"color": c}}, {"id": "b", "label": "house", "attributes": {}}],
                "relations": [{"source": "a", "target": "b", "type": "in", "label": ""}],
                "en": "a diagram of a cat in a house", "zh": "一张示意图：一只猫在一座房子里面，箭头指向房子。"}))
        if k % 4 == 3:
            outs[0] = Outcome("general", 3, error_kind="length", error="answer cut at max_tokens")
        rows.append(result_row(cfg, i, ok(ROUTE, route), outs, source_version))
        what[i] = "failed" if k % 4 == 3 else "+".join(kinds)
    writer = CaptionWriter(cfg, curated_uri, source_version)
    writer.commit(rows)
    what[ids[-1]] = "missing"
    return what
