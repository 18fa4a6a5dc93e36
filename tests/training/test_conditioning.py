"""Edit conditioning (report §3.2): the tiny random Qwen2-VL reads the instruction together with the
source image; the kept states are the instruction's (and the closing template's), computed in the
image's context."""

from __future__ import annotations

import numpy as np
import pytest

from captioning.testing import build_tiny_qwen2vl, synthetic_image
from training.conditioning import EditEncoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return EditEncoder.load(str(build_tiny_qwen2vl(tmp_path_factory.mktemp("vlm"))), max_len=64)


def test_instruction_states_depend_on_the_source_image_and_exclude_image_tokens(encoder):
    a, b = synthetic_image(1, (112, 84)), synthetic_image(2, (112, 84))
    ins = "make the bus red and add a sign that reads OPEN"
    sa, sb, sa2 = encoder.encode([ins, ins], [a, b]) + encoder.encode([ins], [a])
    suffix = encoder.processor.tokenizer(ins + "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert sa.shape == sb.shape == (len(suffix), encoder.dim)  # no system-prompt or image-token states
    assert np.allclose(sa, sa2, atol=1e-5)  # deterministic, and batch padding changes nothing
    assert np.abs(sa - sb).max() > 1e-4  # the same instruction reads differently next to another image
    zh = encoder.encode(["把天空变成红色"], [a])[0]
    assert zh.shape[1] == encoder.dim and np.isfinite(zh).all()


def test_an_encoder_without_image_processor_is_refused_naming_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="^--text-encoder"):
        EditEncoder.load(str(tmp_path))


def test_encode_job_reads_edit_instructions_with_their_source_image_and_stores_semantic_stats(cache, tiny_models, source_tables):
    """The cache (jobs/encode_latents.py on the tiny tables): the instruction rows hold exactly what the
    edit encoder gives for (instruction, source image); the SeFi statistics are in the metadata."""
    import io

    import lance
    from PIL import Image

    from training.latents_schema import from_bytes, read_metadata
    from training.sefi import STATS_KEY

    txt = lance.dataset(f"{cache['dir']}/text.lance").to_table(filter="kind = 'instruction'").to_pylist()
    assert len(txt) == 6
    r = sorted(txt, key=lambda r: r["id"])[0]
    source = r["id"].split("|")[1]
    cur = lance.dataset(source_tables["curated"])
    addr = cur.to_table(columns=["id"], filter=f"id = '{source}'", with_row_address=True).column("_rowaddr").to_pylist()
    with cur.take_blobs("image", addresses=addr)[0] as f:
        img = Image.open(io.BytesIO(f.readall()))
        img.load()
    want = EditEncoder.load(tiny_models["text"], max_len=64).encode([r["text"]], [img])[0]
    got = from_bytes(r["states"], (r["length"], want.shape[1])).astype("float32")
    assert got.shape == want.shape and abs(got - want).max() < 1e-2  # fp16 storage
    stats = read_metadata(lance.dataset(f"{cache['dir']}/latents.lance").schema)[STATS_KEY]
    assert len(stats["mean"]) == len(stats["std"]) == 2 and min(stats["std"]) > 0
