"""Stage-4 model throughput on a GPU: CLIP ViT-L/14 image tower (random weights: speed only) +
the LAION aesthetic head + NudeNet's NSFW detector, img/s through all three.

    python benchmarks/stage4_gpu.py                         # CUDA: ViT-L/14, bf16, batch 256
    python benchmarks/stage4_gpu.py --device cpu --tiny     # smoke test: tiny CLIP, a few images

A plain loop over batches already on the device (uint8 pixels at 224 px for CLIP and 320 px for
NudeNet, as the stage's preprocessing gives them): each batch is normalised on the device, embedded
by CLIP in bf16 (L2-normalised, as ``clip_embedding`` is stored), scored by the aesthetic head (the
real weights in ../shared/models/laion-aesthetic-v2 when present, else a random head of the same
shape) and by NudeNet's shipped ONNX model (onnxruntime; on CUDA through I/O binding on the
device's memory when ``onnxruntime-gpu`` provides the CUDA provider, otherwise on the CPU, said in
the output). Decoding and resizing are not timed: they are the CPU workers' part (``stage4.py``).
Prints each model's img/s alone; the last line is ``stage4 gpu img/s: X`` (all three, one after
the other on each batch). Target: >= 2,500 img/s on one H100/H200.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AESTHETIC = ROOT.parent / "shared/models/laion-aesthetic-v2/sac+logos+ava1-l14-linearMSE.pth"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def build(args, device):
    """(CLIP model, image size, aesthetic head, NSFW runner)."""
    import open_clip
    import torch

    from curation.aesthetic import AestheticMLP

    if args.tiny:
        from curation.samples import make_tiny_clip

        name, cfg, _ = make_tiny_clip(Path(tempfile.mkdtemp()) / "clip")
        open_clip.add_model_config(cfg)
        clip = open_clip.create_model(name, pretrained=None)
    else:
        clip = open_clip.create_model("ViT-L-14", pretrained=None)  # random weights: speed only
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clip = clip.to(device, dtype).eval().requires_grad_(False)
    dim = clip.visual.output_dim
    head = AestheticMLP(dim)
    real = dim == 768 and AESTHETIC.is_file()
    if real:
        head.load_state_dict(torch.load(AESTHETIC, map_location="cpu", weights_only=True))
    head = head.to(device).eval().requires_grad_(False)
    if args.compile:
        clip.visual = torch.compile(clip.visual)
    return clip, size, head, real, NsfwRunner(device)


class NsfwRunner:
    """NudeNet's 320 px ONNX detector on a (B, 3, 320, 320) uint8 batch on ``device``."""

    def __init__(self, device):
        import nudenet
        import onnxruntime as ort

        path = str(Path(nudenet.__file__).parent / "320n.onnx")
        self.cuda = device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.cuda else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, providers=providers)
        self.where = "CUDA (onnxruntime I/O binding)" if self.cuda else "CPU (onnxruntime has no CUDA provider here)"

    def __call__(self, x_u8):
        import torch

        x = (x_u8.float() / 255.0).contiguous()
        if not self.cuda:
            out = self.session.run(None, {"images": x.cpu().numpy()})[0]
            return torch.from_numpy(out[:, 4:].max(axis=(1, 2)))
        out = torch.empty((x.shape[0], 22, 2100), device=x.device, dtype=torch.float32)
        io = self.session.io_binding()
        io.bind_input("images", "cuda", x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        io.bind_output("output0", "cuda", x.device.index or 0, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(io)
        return out[:, 4:].amax(dim=(1, 2))  # best class confidence per image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny random CLIP (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 256 on CUDA, 8 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed batches (default 20 on CUDA, 2 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the CLIP image tower")
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny for the smoke test")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch, steps = args.batch or (256 if on_gpu else 8), args.steps or (20 if on_gpu else 2)
    clip, size, head, real, nsfw = build(args, device)
    print(f"device {torch.cuda.get_device_name(device) if on_gpu else 'cpu'}; CLIP "
          f"{'tiny' if args.tiny else 'ViT-L/14'} ({'bf16' if on_gpu else 'fp32'}) at {size} px; aesthetic head "
          f"{'real LAION weights' if real else 'random, same shape'}; NSFW NudeNet 320 px on {nsfw.where}; "
          f"batch {batch}, {steps} timed batches")

    g = torch.Generator(device="cpu").manual_seed(0)
    x224 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device)
    x320 = torch.randint(0, 256, (batch, 3, 320, 320), dtype=torch.uint8, generator=g).to(device)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    dtype = next(clip.parameters()).dtype

    def embed():
        x = ((x224.float() / 255.0 - mean) / std).to(dtype)
        return torch.nn.functional.normalize(clip.encode_image(x).float(), dim=-1)

    steps_of = {"clip": embed, "nsfw": lambda: nsfw(x320),
                "all": lambda: (head(embed()), nsfw(x320))}

    def rate(fn) -> float:
        with torch.inference_mode():
            for _ in range(2 if on_gpu else 1):  # warm-up (kernels, autotuning, compile)
                fn()
            if on_gpu:
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            if on_gpu:
                torch.cuda.synchronize(device)
        return batch * steps / (time.perf_counter() - t)

    rates = {k: rate(fn) for k, fn in steps_of.items()}
    print(f"CLIP image tower alone: {rates['clip']:.0f} img/s; NSFW alone: {rates['nsfw']:.0f} img/s")
    if on_gpu:
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"stage4 gpu img/s: {rates['all']:.0f}")


if __name__ == "__main__":
    main()
