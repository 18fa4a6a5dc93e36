"""The PE jobs against a REAL vLLM OpenAI server (tiny random Qwen2-VL on CPU, one per session): the
output contract (strict JSON through structured outputs, one row per input id, every column the
schema promises) and resume after kill -9. The tiny model writes junk, so nothing here reads wording."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lance
import pytest

from captioning.testing import write_curated
from flywheel.pe_config import PROMPT_ROOT
from flywheel.pe_schema import ENHANCED, PE_DATA
from flywheel.pe_testing import captioning_test_module, write_captions

ROOT = Path(__file__).resolve().parents[2]
_cap = captioning_test_module()
tiny_vlm, vllm_server, SERVED = _cap.tiny_vlm, _cap.vllm_server, _cap.SERVED  # the captioning session fixtures

pytestmark = pytest.mark.vllm
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SPEC = ["gen", "txt", "por", "all", "bad", "gen", "txt", "gen"]


@pytest.fixture(scope="module")
def tiny_prompts(tmp_path_factory) -> Path:
    """The v1 PE prompt set with short instructions and tight string patterns: a random model fills
    a string until its pattern ends it, so answers finish inside a small max_tokens."""
    root = tmp_path_factory.mktemp("pe_prompts")
    d = root / "tiny"
    d.mkdir()
    for f in PROMPT_ROOT.joinpath("v1").glob("*"):
        d.joinpath(f.name).write_text(f.read_text())
    short = {"classify": "Category of:\n{p_fine}", "degrade": "Apply:\n{steps}\nto ({language}, {ratio}):\n{p_fine}",
             "edit": "Summarise:\n{p_fine}", "enhance": "Enhance:\n{prompt}"}
    word = {"type": "string", "pattern": "^[a-z]{1,6}$"}
    for kind, text in short.items():
        d.joinpath(f"{kind}.txt").write_text(text)
        schema = json.loads(d.joinpath(f"{kind}.json").read_text())
        for name in ("p_short", "prompt"):
            if name in schema["properties"]:
                schema["properties"][name] = word
        if "removed" in schema["properties"]:
            schema["properties"]["removed"]["items"] = word
        d.joinpath(f"{kind}.json").write_text(json.dumps(schema))
    return root


def cli(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / script), *args, "--no-progress"]


def test_pe_data_contract_and_resume_after_kill(vllm_server, tiny_prompts, tmp_path):
    write_curated(tmp_path / "curated.lance", [True] * len(SPEC))
    ids = write_captions(tmp_path / "captions.lance", tmp_path / "curated.lance", SPEC)
    out = str(tmp_path / "pe.lance")
    cmd = cli("build_pe_data.py", "--captions", str(tmp_path / "captions.lance"), "--output", out,
              "--server", vllm_server.url, "--model", SERVED, "--prompt-root", str(tiny_prompts),
              "--prompt-version", "tiny", "--commit-every", "2", "--concurrency", "1",
              "--set", "client.max_tokens=160", "--export", str(tmp_path / "sft"))
    # Killed after its first commit, then rerun: every id exactly once, nothing lost.
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if lance.dataset(out).count_rows() >= 2:
                break
        except (ValueError, OSError):
            pass
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = lance.dataset(out).to_table(columns=["id", "status", "created_at"]).to_pylist()
    assert 2 <= len(first) <= len(SPEC)
    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    done = [r for r in first if r["status"] in ("ok", "rejected")]
    assert f"skipped {len(done)} already done" in rerun.stdout, rerun.stdout

    table = lance.dataset(out).to_table()
    assert table.schema.names == PE_DATA.names
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(ids) and table.num_rows == len(ids)
    assert all(rows[r["id"]]["created_at"] == r["created_at"] for r in done)  # done rows were not redone
    assert rows[ids[SPEC.index("bad")]]["error_kind"] == "no_caption"
    good = [r for i, r in rows.items() if SPEC[ids.index(i)] != "bad"]
    for r in good:  # every request answered schema-valid JSON (structured outputs), or failed with a reason
        assert r["status"] in ("ok", "rejected", "failed")
        assert (r["status"] == "ok") == (r["error_kind"] is None)
        assert r["model"] == SERVED and r["prompt_version"] == "tiny" and r["attempts"] >= 1
        if r["status"] != "failed":
            assert r["category"] in ("general", "portrait", "text", "complex_text")
            assert r["difficulty"] in ("light", "medium", "heavy") and r["language"] in ("en", "zh")
            assert len(r["removed"]) == len(r["strategies"]) >= 1
            assert len(r["cot"].splitlines()) == len(r["strategies"])
            assert r["length_ratio"] == pytest.approx(len(r["p_short"]) / len(r["p_fine"]), rel=1e-5)
    assert sum(r["status"] == "ok" for r in good) >= len(good) // 2
    exported = [json.loads(line) for f in ("train", "validation") for line in (tmp_path / "sft" / f"{f}.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in exported) == sorted(r["id"] for r in good if r["status"] == "ok")
    assert all([m["role"] for m in e["messages"]] == ["system", "user", "assistant"] for e in exported)
    assert Path(out + ".report.html").read_text().count("data:image/png;base64,") == 3


def test_enhance_prompts_contract_and_resume(vllm_server, tiny_prompts, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["a cat", "a poster that says HELLO", "一只猫", "a city at night"]
    prompts.write_text("\n".join(json.dumps({"prompt": t}, ensure_ascii=False) for t in texts[:2]) + "\n")
    out = str(tmp_path / "enhanced.lance")
    cmd = cli("enhance_prompts.py", "--input", str(prompts), "--output", out, "--server", vllm_server.url,
              "--model", SERVED, "--set", f"prompt_root={tiny_prompts}", "--prompt-version", "tiny",
              "--set", "client.max_tokens=64")
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {r["id"]: r for r in lance.dataset(out).to_table().to_pylist()}
    prompts.write_text("\n".join(json.dumps({"prompt": t}, ensure_ascii=False) for t in texts) + "\n")
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    table = lance.dataset(out).to_table()
    assert table.schema.names == ENHANCED.names
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(r["prompt"] for r in rows.values()) == sorted(texts)
    for i, r in rows.items():
        assert r["model"] == SERVED and r["enhanced_at"] is not None
        assert (r["status"] == "ok") == (r["enhanced"] is not None)
        if i in before and before[i]["status"] == "ok":  # resumed: an ok row is not asked again
            assert r["enhanced_at"] == before[i]["enhanced_at"]
    assert "skipped 2 already done" in second.stdout or any(b["status"] != "ok" for b in before.values())
