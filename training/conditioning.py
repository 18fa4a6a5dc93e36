"""Edit (TI2I) conditioning as the report's §3.2 describes it: the condition encoder (a Qwen VLM) reads
the edit instruction *together with the source image* in one chat turn, so the instruction's hidden
states are computed in the context of the image. The image tokens' own states are then dropped: the
report replaces the VLM's visual representation with the VAE latent of the image (the trainer's
reference latent tokens), ``h = Concat(E_x, h_y)``. What is kept is the states of the tokens after the
image: the instruction and the closing chat-template tokens, the same span the T2I caption encoder
keeps after its template prefix.

``EditEncoder`` is loaded once per Ray actor (``EditInstructionEncoder`` reads the source images from
the curated table by row address) and writes rows of the text table (``training/latents_schema.py``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from training.encoders import _from_pretrained, _resolve
from training.latents_schema import to_bytes

# Qwen-Image-Edit's system prompt for its VLM condition encoder.
EDIT_SYSTEM = ("Describe the key features of the input image (color, shape, size, texture, objects, background), then "
               "explain how the user's text instruction should alter or modify the image. Generate a new image that meets "
               "the user's requirements while maintaining consistency with the original input where appropriate.")


@dataclass
class EditEncoder:
    model: torch.nn.Module
    processor: object
    vision_end_id: int
    layer: int
    max_len: int
    dim: int

    @classmethod
    def load(cls, path: str, device: str = "cpu", dtype=torch.float32, layer: int = -1, max_len: int = 512,
             flag: str = "--text-encoder") -> EditEncoder:
        from transformers import AutoModel, AutoProcessor

        path = _resolve(path, flag)
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError):
            processor = None
        if getattr(processor, "image_processor", None) is None or "<|vision_end|>" not in processor.tokenizer.get_vocab():
            raise FileNotFoundError(f"{flag}: {path} has no image processor / vision tokens; TI2I instructions are encoded "
                                    "with the source image (report §3.2), which needs a Qwen VLM checkpoint with its processor")
        model = _from_pretrained(flag, path, AutoModel.from_pretrained, dtype=dtype).to(device).eval()
        cfg = getattr(model.config, "text_config", model.config)
        return cls(model, processor, processor.tokenizer.convert_tokens_to_ids("<|vision_end|>"), layer, max_len, cfg.hidden_size)

    @torch.no_grad()
    def encode(self, instructions: list[str], images: list) -> list[np.ndarray]:
        """One float32 array [L_i, dim] per (instruction, PIL image): the states after the image."""
        chats = [[{"role": "system", "content": [{"type": "text", "text": EDIT_SYSTEM}]},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in instructions]
        texts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        inputs = self.processor(text=texts, images=[im.convert("RGB") for im in images], padding=True, return_tensors="pt")
        dev = next(self.model.parameters()).device
        out = self.model(**{k: v.to(dev) for k, v in inputs.items()}, output_hidden_states=True)
        h = out.hidden_states[self.layer].float().cpu()
        res = []
        for i, (ids, m) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True)):
            end = int((ids == self.vision_end_id).nonzero()[-1])
            keep = m.clone()
            keep[: end + 1] = False  # system prompt, image tokens
            res.append(h[i][keep][: self.max_len].numpy())
        return res


class EditInstructionEncoder:
    """Ray Data actor: (id, kind, lang, text, ref_addr) instruction rows -> text-table rows, each
    instruction encoded with its source image read from the curated table."""

    def __init__(self, text_encoder: str, curated: str, curated_version: int, device: str = "cpu", layer: int = -1,
                 max_len: int = 512):
        import lance

        self.curated = lance.dataset(curated, version=curated_version)
        self.enc = EditEncoder.load(text_encoder, device=device, layer=layer, max_len=max_len)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        images = []
        for blob in self.curated.take_blobs("image", addresses=batch.column("ref_addr")):
            with blob as f:
                im = Image.open(io.BytesIO(f.readall()))
                im.load()
            images.append(im)
        states = self.enc.encode(batch.column("text").to_pylist(), images)
        out = batch.drop_columns(["ref_addr"])
        return out.append_column("length", pa.array([len(a) for a in states], pa.int32())).append_column(
            "states", pa.array([to_bytes(a) for a in states], pa.large_binary()))


def edit_instruction_rows(pair_texts: pa.Table, pair_rows: pa.Table) -> pa.Table:
    """The instruction rows with each pair's source-image row address (``ref_addr``), joined on id."""
    addr = dict(zip(pair_rows.column("id").to_pylist(), pair_rows.column("ref_addr").to_pylist(), strict=True))
    return pair_texts.append_column("ref_addr", pa.array([addr[i] for i in pair_texts.column("id").to_pylist()], pa.uint64()))


def reads_images(text_encoder: str) -> bool:
    """Whether the condition encoder is a VLM with an image processor (then edit instructions are
    encoded with their source image); a text-only encoder encodes them as plain text."""
    from transformers import AutoProcessor

    try:
        proc = AutoProcessor.from_pretrained(_resolve(text_encoder, "--text-encoder"))
    except (OSError, ValueError, FileNotFoundError):
        return False
    return getattr(proc, "image_processor", None) is not None and "<|vision_end|>" in proc.tokenizer.get_vocab()


def edit_instructions_dataset(s, curated_version: int, pair_texts: pa.Table, pair_rows: pa.Table, num_gpus: float):
    """Ray Data pipeline of the encode job (``training/encode.py``) for the instruction rows, each read
    with its source image by :class:`EditInstructionEncoder` on an actor pool."""
    import ray

    rows = edit_instruction_rows(pair_texts, pair_rows)
    return ray.data.from_arrow(rows).map_batches(
        EditInstructionEncoder, fn_constructor_args=(s.text_encoder, s.curated, curated_version, s.device, s.text_layer, s.max_text_len),
        batch_size=s.batch_size, batch_format="pyarrow", concurrency=s.concurrency, num_gpus=num_gpus,
        # No CPU reserved: it runs beside the caption actor pool, and on a small node two pools that each
        # hold a CPU leave none for the read and write tasks (Ray Data then waits forever).
        num_cpus=0)
