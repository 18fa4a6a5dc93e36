"""The trainer's step on 2 Ray Train workers (gloo, CPU, FSDP2), run once for the module:

* gradient accumulation keeps gradients sharded: after every micro-batch each parameter's ``.grad``
  is a DTensor whose local shard has the parameter shard's shape, and FSDP holds no unsharded
  accumulated gradient; 4 micro-batches of 1 give the same gradients, loss and updated weights as one
  micro-batch of 4;
* FSDP2 + torch.compile (aot_eager: Dynamo + AOTAutograd, no Inductor codegen on CPU) + activation
  checkpointing, applied by parallelize.py, give the eager loss and gradients to tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def _worker(config: dict) -> None:
    import numpy as np
    import ray.train
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    from training.config import ParallelConfig
    from training.flow import FlowArgs
    from training.mmdit import MMDiT, make_args
    from training.parallelize import parallelize
    from training.trainer import MicroBatch, train_step

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()

    def build(pc: ParallelConfig):
        with torch.device("meta"):
            m = MMDiT(make_args("tiny", in_channels=4, text_dim=16, depth=3))
        parallelize(m, pc, distributed=True)
        m.to_empty(device="cpu")
        torch.manual_seed(100 + rank)
        with torch.no_grad():
            m.init_weights()
            for p in m.parameters():  # break adaLN-Zero so every parameter gets a gradient
                p.add_(0.02 * torch.randn_like(p))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.001)
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    g = torch.Generator().manual_seed(rank)
    x1, text = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 6, 16, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    seeds = np.arange(4) + 1000 * rank
    fa = FlowArgs(caption_dropout=0.0, shift_base_tokens=16)

    def split(k):  # the rank's 4 samples as k micro-batches
        n = 4 // k
        return [MicroBatch(x1[i:i + n], text[i:i + n], mask[i:i + n], None, seeds[i:i + n]) for i in range(0, 4, n)]

    shapes_ok, unsharded_held, grads = [], [], {}

    def inspect(m_idx, model):
        ok = all(isinstance(p.grad, DTensor) and p.grad.placements == (Shard(0),)
                 and p.grad.to_local().shape == p.to_local().shape for p in model.parameters())
        shapes_ok.append(ok)
        held = 0
        for mod in model.modules():
            if isinstance(mod, FSDPModule):
                group = mod._get_fsdp_state()._fsdp_param_group
                held += sum(getattr(fp, "unsharded_accumulated_grad", None) is not None for fp in (group.fsdp_params if group else []))
        unsharded_held.append(held)
        grads[len(shapes_ok)] = [p.grad.to_local().clone() for p in model.parameters()]

    out = {}
    for name, k in (("one", 1), ("accumulated", 4)):
        m, opt, sched = build(ParallelConfig())
        res = train_step(m, opt, sched, None, split(k), fa, None, 1.0, on_micro=inspect)
        out[name] = {"loss": float(res["loss"]), "grad_norm": float(res["grad_norm"].full_tensor()),
                     "grad": [t.tolist() for t in grads[len(shapes_ok)]],
                     "weights": [p.to_local().detach().reshape(-1).tolist() for p in m.parameters()]}
    out["shapes_ok"], out["unsharded_held"] = shapes_ok, unsharded_held

    losses = {}
    for name, pc in (("eager", ParallelConfig()),
                     ("compiled_ac", ParallelConfig(activation_checkpointing=True, compile=True, compile_backend="aot_eager"))):
        m, opt, sched = build(pc)
        losses[name] = [float(train_step(m, opt, sched, None, split(2), fa, None, 1.0)["loss"]) for _ in range(3)]
        losses[name + "_grad_norm"] = float(train_step(m, opt, sched, None, split(2), fa, None, 1.0)["grad_norm"].full_tensor())
    out["compile"] = losses
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def step_results(ray_local, tmp_path_factory):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    out = tmp_path_factory.mktemp("step")
    TorchTrainer(_worker, train_loop_config={"out": str(out)}, scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="step", storage_path=str(out / "runs"))).fit()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _close(a, b, tol):
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True)) < tol


def test_accumulation_keeps_gradients_sharded_and_equals_one_big_micro_batch(step_results):
    for r in step_results:
        assert len(r["shapes_ok"]) == 5 and all(r["shapes_ok"])  # 1 + 4 micro-batches, every one sharded
        assert r["unsharded_held"] == [0] * 5
        one, acc = r["one"], r["accumulated"]
        assert acc["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert acc["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert _close(acc["grad"], one["grad"], 1e-6)
        assert _close(acc["weights"], one["weights"], 1e-6)
    # Each rank holds a different shard (the two ranks' gradient shards are not copies of one another).
    assert not _close(step_results[0]["one"]["grad"][:1], step_results[1]["one"]["grad"][:1], 1e-9)


def test_fsdp2_with_compile_and_activation_checkpointing_matches_eager(step_results):
    for r in step_results:
        c = r["compile"]
        assert c["compiled_ac"] == pytest.approx(c["eager"], rel=1e-4)
        assert c["compiled_ac_grad_norm"] == pytest.approx(c["eager_grad_norm"], rel=1e-3)
        assert c["eager"][-1] != c["eager"][0]  # the weights moved: the later losses are after real updates
