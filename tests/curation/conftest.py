"""Curation fixtures: real sample photos with generated corruptions and duplicates, and tiny local
models (random open_clip, trained BPE tokenizer) loaded through the same code a real run uses."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from curation import samples
from curation.config import load_config


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("samples") / "images"
    notes = samples.write_sample_folder(root)
    return root, notes


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("models")
    name, cfg_json, weights = samples.make_tiny_clip(d / "clip")
    return {"clip_model": name, "clip_config": cfg_json, "clip_weights": weights,
            "tokenizer": samples.make_tiny_tokenizer(d / "tokenizer")}


@pytest.fixture(scope="session")
def sample_config(tmp_path_factory, models) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("cfg") / "stage1.yaml"
    path.write_text(yaml.safe_dump({
        "batch_size": 8,
        "scoring": {"clip": {"model": models["clip_model"], "model_config": models["clip_config"],
                             "weights": models["clip_weights"]},
                    "tokenizer": models["tokenizer"], "rotation": {"detector": "clip"}},
        # The random CLIP's similarities and rotation guesses mean nothing: thresholds that let
        # them through, so the other filters' decisions are what the tests check.
        "thresholds": {"clip": {"min_score": -1.0}, "rotation": {"min_confidence": 1.0},
                       "token_length": {"max_tokens": 512}},
    }))
    return path


@pytest.fixture(scope="session")
def cfg(sample_config):
    return load_config(sample_config)


@pytest.fixture(scope="session")
def kill_and_rerun() -> Callable[[list[str], Callable[[], int], int], None]:
    """``run(cmd, count_rows, total)``: start a stage job, ``kill -9`` it (the driver and every Ray
    process it started) after its first commit, check the table holds some but not all of ``total``
    rows, then run the same command again to completion. The caller checks what the rerun wrote."""
    root = Path(__file__).resolve().parents[2]

    def run(cmd: list[str], count_rows: Callable[[], int], total: int) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env=env, cwd=root)
        deadline, seen = time.time() + 240, []
        for line in p.stdout:
            seen.append(line)
            if "committed" in line or time.time() > deadline:
                break
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        partial = count_rows()
        assert 0 < partial < total, f"{partial} rows after the kill; the job had printed:\n" + "".join(seen[-40:])
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    return run
