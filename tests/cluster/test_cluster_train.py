"""A 2-worker training run on the two-node cluster, submitted with ``ray job submit --working-dir .``:
STRICT_SPREAD puts one worker on each node (gloo over TCP between them), a worker process is
SIGKILLed after a checkpoint, Ray Train (FailureConfig) restarts the worker group from the latest
checkpoint, and the data stream resumes at exactly that checkpoint's position. Placement, the kill
target and the restart are read from Ray's state API; the cache is built by jobs/encode_latents.py
on the same cluster from a curated table written with curation/schema.py."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

import tiny  # noqa: E402  (tests/training/tiny.py: the training tests' tiny models and curated table)

STEPS, CKPT, BATCH = 30, 4, 8
WORKER_CLASS = "RayTrainWorker"  # Ray Train V2's worker actor


@pytest.fixture(scope="module")
def latent_cache(cluster, tmp_path_factory) -> str:
    """jobs/encode_latents.py, submitted to the cluster, on a 12-image curated table (alt texts)."""
    from captioning.testing import build_tiny_qwen2vl

    root = tmp_path_factory.mktemp("train_cache")
    tiny.make_curated_table(str(root / "curated.lance"))
    vae, text = tiny.make_tiny_vae(root / "vae"), build_tiny_qwen2vl(root / "qwen")
    sub_id, r = cluster.submit("python", "jobs/encode_latents.py", "--curated", str(root / "curated.lance"),
                               "--out", str(root / "cache"), "--vae", str(vae), "--text-encoder", str(text),
                               "--resolution", "64", "--bucket-multiple", "16", "--max-text-len", "64", "--batch-size", "8")
    assert r.returncode == 0 and cluster.job(sub_id).status == "SUCCEEDED", r.stdout[-3000:] + r.stderr[-2000:]
    return str(root / "cache")


def _train_workers(cluster, job_id: str) -> list:
    from ray.util.state import list_actors

    return list_actors(address=cluster.address, filters=[("class_name", "=", WORKER_CLASS), ("job_id", "=", job_id)],
                       detail=True, limit=1000, raise_on_missing_output=False, timeout=30)


def _job_id(cluster, sub_id: str) -> str | None:
    try:
        return cluster.job(sub_id).job_id
    except RuntimeError:  # 404 until the CLI has uploaded the working dir and submitted
        return None


def _alive_pair(cluster, job_id: str) -> list | None:
    alive = [a for a in _train_workers(cluster, job_id) if a.state == "ALIVE" and a.pid]
    return alive if len(alive) == 2 else None


def _wait(what: str, cond, fut, timeout: float = 240, every: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if fut.done():  # the job ended before we got here: show why
            _, r = fut.result()
            raise AssertionError(f"job ended while waiting for {what}: " + r.stdout[-3000:] + r.stderr[-2000:])
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _latest_checkpoint(run: Path) -> int | None:
    try:
        snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return None
    latest = snap.get("latest_checkpoint_result")
    return int(latest["checkpoint_dir_name"].split("_")[1]) if latest else None


def _uninterrupted(cluster, cache: str, steps: int) -> dict[int, dict[int, tuple[list[int], list[int]]]]:
    """rank -> step -> what an uninterrupted run feeds that rank: the trainer's step -> micro-batch
    plan over the cache's index (built by a driver on the cluster, as jobs/train.py builds it)."""
    import ray

    from training.config import load_config
    from training.data import build_index
    from training.plan import plan_micro_batches

    d = load_config(Path(__file__).parents[2] / "configs/train/debug_cpu.yaml", [f"data.global_batch_size={BATCH}"]).data
    ray.init(address=f"127.0.0.1:{cluster.gcs_port}", include_dashboard=False, log_to_driver=False)
    try:
        index = build_index(cache)
    finally:
        ray.shutdown()
    micro = d.micro_batch_size or BATCH // 2
    n = BATCH // 2 // micro
    out: dict = {0: {}, 1: {}}
    for step in range(steps):
        plans = plan_micro_batches(index, step, global_batch=BATCH, micro=micro, seed=d.seed, t2i_ratio=d.t2i_ratio,
                                   caption_kinds=d.caption_kinds, caption_types=d.caption_types, languages=d.languages)
        for rank in out:
            mine = plans[rank * n:(rank + 1) * n]
            out[rank][step + 1] = ([int(r) for mp in mine for r in mp.latent_rows], [int(r) for mp in mine for r in mp.text_rows])
    return out


def _consumed(run: Path) -> dict[int, list[dict]]:
    return {int(p.stem.split("_")[1]): [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted((run / "consumed").glob("rank_*.jsonl"))}


def test_strict_spread_run_resumes_at_the_checkpoints_data_position_after_a_worker_is_killed(cluster, latent_cache, tmp_path):
    storage, name = tmp_path / "runs", "spread"
    run = storage / name
    sub_id = f"train{time.time_ns()}"
    args = ["python", "jobs/train.py", "--config", "configs/train/debug_cpu.yaml", "--data", latent_cache,
            "--storage", str(storage), "--workers", "2", "--steps", str(STEPS)]
    for kv in (f"name={name}", "cluster.placement_strategy=STRICT_SPREAD", "cluster.cpus_per_worker=1",
               f"ckpt_every={CKPT}", "keep_checkpoints=100", "log_every=1", "max_failures=1",
               f"data.global_batch_size={BATCH}", "monitor.log_consumed=true", "monitor.tensorboard=false",
               "min_step_seconds=0.25"):  # >= 7.5 s of steps: the kill lands mid-run on a fast machine too
        args += ["--set", kv]
    t0 = time.time()
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(cluster.submit, *args, submission_id=sub_id)
        job_id = _wait("the job's driver", lambda: _job_id(cluster, sub_id), fut)
        first = _wait("2 train workers", lambda: _alive_pair(cluster, job_id), fut)
        # Ray Train's checkpoint manager records a checkpoint once the controller has registered it:
        # from then on a restart resumes from it. Kill a couple of steps past it, so that the
        # restarted attempt replays steps the first attempt already ran.
        latest = _wait("a registered checkpoint", lambda: _latest_checkpoint(run), fut, every=0.1)
        _wait(f"step {latest + 2}", lambda: max((x["step"] for x in _consumed(run).get(0, [])), default=0) >= latest + 2,
              fut, every=0.05)
        victim = first[1]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = max(x["step"] for x in _consumed(run)[0])
        t_kill = time.time() - t0
        _, r = fut.result()
    print(f"train job: worker killed at step {killed_at} after {t_kill:.0f} s, job ended after {time.time() - t0:.0f} s")
    info = cluster.job(sub_id)
    assert r.returncode == 0 and info.status == "SUCCEEDED", r.stdout[-4000:] + r.stderr[-2000:]
    assert killed_at < STEPS, "the run ended before the kill: nothing was tested"

    # Placement, from the state API: each worker group had one worker on each node.
    actors = _train_workers(cluster, job_id)
    first_ids = {a.actor_id for a in first}
    second = [a for a in actors if a.actor_id not in first_ids]
    assert {a.node_id for a in first} == set(cluster.node_ids)
    assert len(second) == 2 and {a.node_id for a in second} == set(cluster.node_ids), actors
    dead = next(a for a in actors if a.actor_id == victim.actor_id)
    assert dead.state == "DEAD" and dead.pid == victim.pid

    # The restart resumed from a registered checkpoint and finished the run.
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = {x["resumed_from"] for x in rows} - {0}
    assert len(resumed) == 1, rows
    (r0,) = resumed
    assert r0 > 0 and r0 % CKPT == 0 and r0 <= killed_at
    state = json.loads((run / f"step_{r0:08d}" / "trainer_state.json").read_text())
    assert state["data_position"]["next_step"] == r0 and state["data_position"]["samples_consumed"] == r0 * BATCH
    final = json.loads((run / f"step_{STEPS:08d}" / "trainer_state.json").read_text())
    assert final["step"] == STEPS and final["data_position"]["samples_consumed"] == STEPS * BATCH
    assert max(x["step"] for x in rows) == STEPS

    # The data stream: attempt 1 consumed steps 1..k, attempt 2 steps r0+1..STEPS, each rank its own
    # half of every global batch. Every step's rows are those an uninterrupted run draws, so the
    # steps both attempts ran got identical rows: attempt 2 started at exactly the checkpoint's data
    # position (nothing skipped, nothing repeated).
    consumed = _consumed(run)
    assert sorted(consumed) == [0, 1]
    want = _uninterrupted(cluster, latent_cache, STEPS)
    for rank, lines in consumed.items():
        a1 = {x["step"]: x for x in lines if x["resumed_from"] == 0}
        a2 = {x["step"]: x for x in lines if x["resumed_from"] == r0}
        assert len(a1) + len(a2) == len(lines)
        assert sorted(a1) == list(range(1, max(a1) + 1)) and max(a1) >= r0
        assert sorted(a2) == list(range(r0 + 1, STEPS + 1))
        for attempt in (a1, a2):
            for step, x in attempt.items():
                assert (x["latent_rows"], x["text_rows"]) == want[rank][step], (rank, step, x["resumed_from"])
        assert all(len(x["latent_rows"]) == BATCH // 2 for x in lines)
