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
