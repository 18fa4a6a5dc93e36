"""The step -> micro-batches plan on the index of a real cache: T2I and TI2I micro-batches share each
step at the configured ratio, each micro-batch has one bucket and one task, and the plan is a pure
function of (seed, step)."""

from __future__ import annotations

import numpy as np

from training.data import build_index
from training.plan import plan_micro_batches


def test_steps_mix_t2i_and_ti2i_micro_batches_at_the_ratio(cache):
    index = build_index(cache["dir"])
    kw = dict(global_batch=40, micro=2, seed=3, t2i_ratio=0.7, caption_kinds={"general": 1.0},
              caption_types={"short": 0.5, "medium": 0.5}, languages={"en": 0.5, "zh": 0.5})
    fractions = []
    for step in range(30):
        plans = plan_micro_batches(index, step, **kw)
        assert len(plans) == 20 and sum(len(p.latent_rows) for p in plans) == 40
        n_ti2i = sum(p.ti2i for p in plans)
        assert n_ti2i in (6, 7)  # 0.3 x 20 micro-batches = 6, stochastically rounded
        fractions.append(n_ti2i / 20)
        for p in plans:
            assert {tuple(index.bucket[r]) for r in p.latent_rows} == {p.bucket}
            assert index.has_ref[p.latent_rows].all() == p.ti2i or not p.ti2i
            kinds = {k for r, t in zip(p.latent_rows, p.text_rows, strict=True) for tr, k, _ in index.texts[r] if tr == t}
            assert kinds == {"instruction"} if p.ti2i else "instruction" not in kinds
        seeds = np.concatenate([p.sample_seeds for p in plans])
        assert len(set(seeds.tolist())) == 40  # one noise seed per sample
    assert abs(np.mean(fractions) - 0.3) < 0.02
    again = plan_micro_batches(index, 7, **kw)
    first = plan_micro_batches(index, 7, **kw)
    assert all(np.array_equal(a.latent_rows, b.latent_rows) and np.array_equal(a.text_rows, b.text_rows) for a, b in zip(again, first, strict=True))
