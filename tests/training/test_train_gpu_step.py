"""benchmarks/train_gpu_step.py runs the trainer's real step (FSDP2 in a one-rank group, EMA) on CPU
with the tiny preset and prints its figures; the GPU figure needs a GPU machine."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_gpu_step_benchmark_runs_on_cpu_with_the_tiny_preset():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_gpu_step.py"), "--device", "cpu", "--preset", "tiny",
                          "--steps", "2", "--warmup", "1", "--micro-batch", "2", "--n-micro", "2", "--resolution", "64",
                          "--text-len", "16", "--text-dim", "32"], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"mfu: \d+\.\d\d", lines[-1])
    assert "FSDP2 (1 rank)" in lines[0] and "micro-batch 2 x 2" in lines[0]
    assert re.search(r"peak memory .* GiB; arithmetic estimate", out.stdout)
    tflops = float(re.search(r"([\d.e+-]+) TFLOP/s of", out.stdout).group(1))
    assert tflops > 0
