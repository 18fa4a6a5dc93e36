"""Precompute the trainer's latent cache: VAE latents (+ SeFi semantic channels) and condition-encoder
states of every caption variant, from the curated Lance table (and the captions table if given).

    python jobs/encode_latents.py --curated data/curated.lance --captions data/captions.lance \
        --vae /models/flux-vae --text-encoder /models/Qwen2.5-VL-7B-Instruct --resolution 256 --out data/cache_256

Rerunning is safe: each table is committed once; an up-to-date table is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.encode import EncodeSettings, run_encode  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--curated", help="curated Lance table (curation/schema.py)")
    ap.add_argument("--mixture", help="instead of --curated: a training mixture from jobs/build_mixture.py "
                                      "(curation/mixture.py): its T2I rows and its TI2I edit pairs")
    ap.add_argument("--stage2", help="instead of --curated: a stage-2 edit-pair table (jobs/filter_stage2.py, "
                                     "curation/stage2_schema.py): its kept pairs, as <out>/stage2_pairs.lance")
    ap.add_argument("--captions", help="optional captions Lance table written by jobs/caption.py (captioning/schema.py)")
    ap.add_argument("--out", required=True, help="cache directory: gets latents.lance and text.lance")
    ap.add_argument("--vae", required=True, help="diffusers AutoencoderKL / AutoencoderKLQwenImage: local dir or id")
    ap.add_argument("--text-encoder", required=True, help="Qwen2.5-VL / Qwen3-VL (or any transformers LM): dir or id")
    ap.add_argument("--text-layer", type=int, default=-1, help="hidden layer of the condition states (-1 = last)")
    ap.add_argument("--max-text-len", type=int, default=512)
    ap.add_argument("--semantic-encoder", help="SeFi: vision model (DINOv2/SigLIP) dir or id for semantic channels")
    ap.add_argument("--semantic-channels", type=int, default=0, help="SeFi: number of semantic channels")
    ap.add_argument("--resolution", type=int, required=True, help="stage resolution (bucket area = resolution^2)")
    ap.add_argument("--bucket-multiple", type=int, default=32, help="bucket sides are multiples of this")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=1, help="encoder actors (one per GPU with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="run the encoders on CUDA")
    ap.add_argument("--limit", type=int, help="encode only the first N kept rows (smoke runs)")
    a = ap.parse_args(argv)
    if sum(map(bool, (a.curated, a.mixture, a.stage2))) != 1:
        ap.error("give one of --curated, --mixture or --stage2")
    if a.stage2:  # its kept pairs in the mixture shape (curation/mixture.py), then read as a mixture
        from curation.mixture import pairs_mixture

        a.mixture = pairs_mixture(a.stage2, f"{a.out.rstrip('/')}/stage2_pairs.lance")["output"]
    # A mixture is both the image table and the edit-pair table (rows with source_id + instruction).
    s = EncodeSettings(curated=a.curated or a.mixture, edit_pairs=a.mixture, captions=a.captions, out=a.out, vae=a.vae, text_encoder=a.text_encoder,
                       text_layer=a.text_layer, max_text_len=a.max_text_len, semantic_encoder=a.semantic_encoder,
                       semantic_channels=a.semantic_channels, resolution=a.resolution, bucket_multiple=a.bucket_multiple,
                       batch_size=a.batch_size, concurrency=a.concurrency, device="cuda" if a.gpu else "cpu", limit=a.limit)
    try:
        summary = run_encode(s)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
