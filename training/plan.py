"""The global batch of one step as micro-batches: each micro-batch draws its own task (T2I or TI2I, at
the stage's ratio) and aspect bucket, so T2I and TI2I samples share a global batch at the Table-2 ratio
while every forward pass has one shape (a TI2I micro-batch carries reference tokens, a T2I one does
not; mixing them inside one forward would pad every T2I sample with reference tokens).

A pure function of (seed, step): the micro-batch ``j`` of the step goes to rank ``j // n_micro`` as its
``j % n_micro``-th accumulation step, so a restart recomputes the same step exactly. The number of
TI2I micro-batches in a step is the ratio times the count, stochastically rounded, then the order is
shuffled: every step is within one micro-batch of the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data import LatentIndex, pick_variant


@dataclass(frozen=True)
class MicroPlan:
    ti2i: bool
    bucket: tuple[int, int]
    latent_rows: np.ndarray
    text_rows: np.ndarray
    sample_seeds: np.ndarray
    """One seed per sample (noise, timestep, dropout), from (seed, step, position in the global batch)."""


def plan_micro_batches(index: LatentIndex, step: int, *, global_batch: int, micro: int, seed: int, t2i_ratio: float,
                       caption_kinds: dict[str, float], caption_types: dict[str, float],
                       languages: dict[str, float]) -> list[MicroPlan]:
    rng = np.random.default_rng([seed, step])
    n = global_batch // micro
    want = (1 - t2i_ratio) * n
    n_ti2i = int(np.floor(want)) + int(rng.random() < want - np.floor(want))
    tasks = rng.permutation(np.arange(n) < n_ti2i)
    seeds = np.random.SeedSequence([seed, step]).generate_state(global_batch, dtype=np.uint32)
    out = []
    for j, ti2i in enumerate(tasks):
        keys, pools, probs = index.pools(bool(ti2i))
        b = rng.choice(len(keys), p=probs)  # buckets in proportion to their size
        rows = rng.choice(pools[b], size=micro, replace=True)
        text_rows = np.array([pick_variant(index.texts[r], caption_kinds, caption_types, languages, rng, instruction=bool(ti2i))
                              for r in rows])
        out.append(MicroPlan(bool(ti2i), (int(keys[b][0]), int(keys[b][1])), rows, text_rows, seeds[j * micro:(j + 1) * micro]))
    return out
