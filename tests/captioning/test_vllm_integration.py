"""End to end with a REAL vLLM OpenAI server (tiny random Qwen2-VL on CPU) and a curated table written
by jobs/filter_stage1.py: schema validity, Lance row counts, resume after a kill, failures by reason."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import pytest
import yaml
from conftest import SERVED, TINY_PROMPTS, shared_vllm_server, synthetic_image, vllm_available

from captioning.prompts import PromptSet
from captioning.routing import caption_types
from captioning.schema import CAPTION_TYPES

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"}
TINY = PromptSet.load(TINY_PROMPTS["prompt_root"], "tiny")


@pytest.fixture(scope="module")
def curated(tmp_path_factory, tiny_vlm) -> str:
    """A dozen images through stage 1 (clip, nsfw skipped): one exact duplicate and one image below
    the minimum resolution are rejected, the rest kept. The session's vLLM server boots meanwhile
    (each is mostly one process: together they use both cores)."""
    if vllm_available() is None:
        shared_vllm_server(tmp_path_factory.getbasetemp(), SERVED, wait=False)
    base = tmp_path_factory.mktemp("stage1")
    images = base / "images"
    images.mkdir()
    for i in range(12):
        synthetic_image(i).save(images / f"img{i:02d}.jpg", quality=90)
    shutil.copy(images / "img00.jpg", images / "img00_copy.jpg")
    synthetic_image(99, (160, 120)).save(images / "small.jpg", quality=90)
    out = str(base / "curated.lance")
    cmd = [sys.executable, str(ROOT / "jobs" / "filter_stage1.py"), "--input", str(images), "--output", out,
           "--skip", "clip,nsfw", "--set", f"scoring.tokenizer={tiny_vlm}", "--num-cpus", "1",
           "--no-progress", "--no-report"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def caption_cli(curated: str, output: str, server_url: str, *extra: str, config: dict | None = None,
                tmp: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(ROOT / "jobs" / "caption.py"), "--input", curated, "--output", output,
           "--model", SERVED, "--server", server_url, "--prompt-root", TINY_PROMPTS["prompt_root"],
           "--prompt-version", "tiny", "--no-progress", *extra]
    if config:
        path = (tmp or Path(output).parent) / "caption.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--config", str(path)]
    return cmd


def run_cli(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def kept_ids(curated: str) -> set[str]:
    return set(lance.dataset(curated).to_table(columns=["id"], filter="keep = true").column("id").to_pylist())


TEST_CONFIG = {"max_tokens": 160, "route_max_tokens": 96, "concurrency": 8, "commit_every": 4}


def test_captions_a_stage1_table_end_to_end_with_valid_json(curated, vllm_server, tmp_path):
    src = lance.dataset(curated)
    kept = kept_ids(curated)
    assert 0 < len(kept) < src.count_rows()  # some rows were rejected by stage 1
    output = str(tmp_path / "captions.lance")
    proc = run_cli(caption_cli(curated, output, vllm_server.url, config=TEST_CONFIG))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = lance.dataset(output).to_table().to_pylist()
    assert len(rows) == len(kept) and {r["id"] for r in rows} == kept
    ok = [r for r in rows if r["caption_status"] == "ok"]
    assert len(ok) >= len(kept) // 2, [r["caption_error"] for r in rows]
    for r in rows:
        assert r["caption_status"] in ("ok", "failed")
        assert (r["model"], r["prompt_version"], r["source_version"]) == (SERVED, "tiny", src.version)
        if r["caption_status"] == "failed":
            assert r["caption_error"] and r["caption_error_kind"]
            continue
        decision = TINY.validate("route", r["route_json"])
        wanted = caption_types(decision)
        assert r["route_text"] is decision["has_text"]
        for t in CAPTION_TYPES:
            if t in wanted:
                assert json.loads(r[f"caption_{t}"]) == TINY.validate(t, r[f"caption_{t}"])
            else:
                assert r[f"caption_{t}"] is None
    assert f"captioned {len(kept)} rows ({len(ok)} ok" in proc.stdout
    assert "routing: general=" in proc.stdout and "zh with CJK" in proc.stdout
    assert Path(output + ".report.html").exists()

    version = lance.dataset(output).version
    again = run_cli(caption_cli(curated, output, vllm_server.url, config=TEST_CONFIG))
    assert again.returncode == 0 and f"skipped {len(ok)} already captioned" in again.stdout
    after = lance.dataset(output)
    assert after.count_rows() == len(kept)
    assert after.version == version or len(ok) < len(kept)  # nothing to do -> no new commit


def test_killed_run_loses_nothing_and_captions_nothing_twice(curated, vllm_server, tmp_path):
    kept = kept_ids(curated)
    output = str(tmp_path / "captions.lance")
    config = {**TEST_CONFIG, "concurrency": 1, "commit_every": 2}
    proc = subprocess.Popen(caption_cli(curated, output, vllm_server.url, config=config), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            committed = lance.dataset(output).count_rows()
        except (ValueError, OSError):
            committed = 0
        if committed >= 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    proc.wait(timeout=30)
    before = {r["id"]: r for r in lance.dataset(output).to_table().to_pylist()}
    assert 2 <= len(before) < len(kept), "the run should have been killed part-way"

    resumed = run_cli(caption_cli(curated, output, vllm_server.url, config=TEST_CONFIG))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ok_before = sum(r["caption_status"] == "ok" for r in before.values())
    assert f"skipped {ok_before} already captioned" in resumed.stdout
    after = lance.dataset(output).to_table().to_pylist()
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids)) == len(kept) and set(ids) == kept
    for r in after:
        if r["id"] in before and before[r["id"]]["caption_status"] == "ok":
            assert r["captioned_at"] == before[r["id"]]["captioned_at"]  # not captioned twice


def test_truncated_answers_are_recorded_as_failed_then_replaced_in_place(curated, vllm_server, tmp_path):
    kept = kept_ids(curated)
    output = str(tmp_path / "captions.lance")
    cut = {**TEST_CONFIG, "route_max_tokens": 3, "max_attempts": 2}
    proc = run_cli(caption_cli(curated, output, vllm_server.url, config=cut))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(kept)} failed" in proc.stdout and f"failed rows by reason: length={len(kept)}" in proc.stdout
    rows = lance.dataset(output).to_table().to_pylist()
    assert len(rows) == len(kept)
    assert all(r["caption_status"] == "failed" and r["caption_error_kind"] == "length" and r["attempts"] == 2
               for r in rows)

    fixed = run_cli(caption_cli(curated, output, vllm_server.url, config=TEST_CONFIG))
    assert fixed.returncode == 0
    after = lance.dataset(output).to_table().to_pylist()
    assert sorted(r["id"] for r in after) == sorted(kept)  # replaced in place, never appended
    assert sum(r["caption_status"] == "ok" for r in after) >= len(kept) // 2



def _committed(uri: str) -> int:
    try:
        return lance.dataset(uri).count_rows()
    except (ValueError, OSError):
        return 0


def test_the_real_server_killed_and_restarted_mid_run_pauses_one_run_and_stops_the_impatient_one(
        curated, vllm_server, tmp_path):
    """Two runs against the real vLLM server; mid-run the server's whole process group is killed
    (SIGKILL: connections reset, the port refused) and a new server started on the same port. The run
    with the default --server-patience pauses through the restart and ends with exit 0, every row ok
    or failed for a non-connection reason; the run with --server-patience 2 exits 3 with one line,
    its finished rows committed, and the same command run again completes. (Kept last in the module:
    the session's server is restarted.)"""
    kept = kept_ids(curated)
    config = {**TEST_CONFIG, "concurrency": 1, "commit_every": 2, "ocr_engine": "none", "backoff_s": 0.2,
              "backoff_max_s": 1.0}
    outs = {name: str(tmp_path / name / "captions.lance") for name in ("patient", "brief")}
    cmds = {name: caption_cli(curated, out, vllm_server.url, *(["--server-patience", "2"] if name == "brief" else []),
                              config=config, tmp=tmp_path) for name, out in outs.items()}
    procs = {name: subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in cmds.items()}
    try:
        deadline = time.monotonic() + 300
        while (min(_committed(o) for o in outs.values()) < 2 and time.monotonic() < deadline
               and all(p.poll() is None for p in procs.values())):
            time.sleep(0.05)
        assert all(p.poll() is None for p in procs.values()), "a run ended before the outage"
        os.killpg(vllm_server.proc.pid, signal.SIGKILL)
        vllm_server.proc.wait(timeout=30)
        brief_out, brief_err = procs["brief"].communicate(timeout=120)
        vllm_server.start(timeout_s=600)  # the same port: what the patient run is probing
        patient_out, patient_err = procs["patient"].communicate(timeout=600)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        if vllm_server.proc.poll() is not None:  # leave the session's server running for later tests
            vllm_server.start(timeout_s=600)

    assert procs["patient"].returncode == 0, patient_err[-3000:]
    assert "server unreachable" in patient_out and "paused" in patient_out
    rows = lance.dataset(outs["patient"]).to_table().to_pylist()
    assert {r["id"] for r in rows} == kept and len(rows) == len(kept)
    assert not [r["caption_error"] for r in rows if r["caption_error_kind"] in ("connection", "timeout")]

    err = brief_err.strip().splitlines()
    assert procs["brief"].returncode == 3 and len(err) == 1, brief_err[-3000:]
    assert "unreachable for 2 s (--server-patience)" in err[0] and "rerun the same command to resume" in err[0]
    first = {r["id"]: r for r in lance.dataset(outs["brief"]).to_table().to_pylist()}
    assert 2 <= len(first) < len(kept)
    assert not [r for r in first.values() if r["caption_error_kind"] in ("connection", "timeout")]
    again = run_cli(cmds["brief"])
    assert again.returncode == 0, again.stderr[-3000:]
    ok_first = sum(r["caption_status"] == "ok" for r in first.values())
    assert f"skipped {ok_first} already captioned" in again.stdout
    after = {r["id"]: r for r in lance.dataset(outs["brief"]).to_table().to_pylist()}
    assert set(after) == kept and lance.dataset(outs["brief"]).count_rows() == len(kept)
    assert all(after[i]["captioned_at"] == r["captioned_at"] for i, r in first.items() if r["caption_status"] == "ok")
