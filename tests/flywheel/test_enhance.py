"""Prompt-engineering track against the project's scripted OpenAI-compatible server: the
enhance_prompts job (original, enhanced, model, time; resume; bad input named), the fine-tuned PE's
plain format, and the function the flywheel calls for routed cases."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lance
import pytest

from captioning.client import ServerUnreachable
from flywheel.enhance import enhance_texts, prompt_id
from flywheel.pe_testing import captioning_test_module, request_kind, request_text, scripted_answer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))
_cap = captioning_test_module()
ScriptedServer, completion, SERVED = _cap.ScriptedServer, _cap.completion, _cap.SERVED

import enhance_prompts  # noqa: E402


def respond(body):
    if "REFUSE" in request_text(body):
        return 400, {"error": "bad request"}
    if request_kind(body) == "plain":  # a fine-tuned PE: reasoning, then the prompt
        return 200, completion(f"<think>\n1. add lighting\n</think>\n\nA detailed picture of {request_text(body)}")
    return 200, completion(json.dumps(scripted_answer(body), ensure_ascii=False))


def run(server: str, *args: str) -> int:
    return enhance_prompts.main(["--server", server, "--model", SERVED, "--no-progress",
                                 "--set", "client.backoff_s=0.01", *args])


def test_enhance_job_stores_original_enhanced_model_time_and_resumes(tmp_path, capsys):
    src, out = tmp_path / "prompts.jsonl", str(tmp_path / "enhanced.lance")
    src.write_text('{"id": "p1", "prompt": "a cat"}\n{"prompt": "一只熊猫在竹林里"}\n{"id": "p3", "prompt": "REFUSE this"}\n')
    with ScriptedServer(respond) as server:
        assert run(server.url, "--input", str(src), "--output", out) == 0
        first = {r["id"]: r for r in lance.dataset(out).to_table().to_pylist()}
        assert sorted(first) == sorted(["p1", prompt_id("一只熊猫在竹林里"), "p3"])
        assert first["p1"]["enhanced"] == "An enhanced, detailed version of: a cat"
        assert first["p1"]["status"] == "ok" and first["p1"]["model"] == SERVED and first["p1"]["enhanced_at"]
        assert first[prompt_id("一只熊猫在竹林里")]["enhanced"].endswith("一只熊猫在竹林里")
        assert (first["p3"]["status"], first["p3"]["error_kind"], first["p3"]["enhanced"]) == ("failed", "http_4xx", None)
        n = len(server.requests)
        assert run(server.url, "--input", str(src), "--output", out) == 0  # resume: only the failed prompt again
        assert [request_text(b) for b in server.requests[n:]] == ["REFUSE this"]
    assert "skipped 2 already done" in capsys.readouterr().out
    again = {r["id"]: r for r in lance.dataset(out).to_table().to_pylist()}
    assert again["p1"]["enhanced_at"] == first["p1"]["enhanced_at"] and len(again) == 3


def test_plain_mode_takes_the_text_after_the_reasoning(tmp_path):
    src, out = tmp_path / "prompts.jsonl", str(tmp_path / "enhanced.lance")
    src.write_text('{"id": "a", "prompt": "a castle on a peak"}\n')
    with ScriptedServer(respond) as server:
        assert run(server.url, "--input", str(src), "--output", out, "--plain") == 0
        body = server.requests[0]
    assert "response_format" not in body or body["response_format"] is None
    assert body["messages"][-1]["content"] == "a castle on a peak"  # the SFT format: the prompt as the user turn
    (row,) = lance.dataset(out).to_table().to_pylist()
    assert row["enhanced"] == "A detailed picture of a castle on a peak" and row["prompt_version"] == "plain"


def test_bad_input_is_named_before_any_work(tmp_path, capsys):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    assert run("http://127.0.0.1:9/v1", "--input", str(src), "--output", str(tmp_path / "o.lance")) == 2
    assert "line 2" in capsys.readouterr().err and not (tmp_path / "o.lance").exists()


def test_flywheel_call_for_routed_cases():
    cases = {"case-1": "a red bus", "case-2": "REFUSE", "case-3": "a poster"}
    with ScriptedServer(respond) as server:
        out = enhance_texts(cases, server.url, SERVED, client={"backoff_s": 0.01})
        plain = enhance_texts({"c": "a dog"}, server.url, SERVED, plain=True)
    assert out["case-1"].rewrite == "An enhanced, detailed version of: a red bus" and out["case-1"].model == SERVED
    assert out["case-2"].rewrite is None and out["case-2"].error.startswith("http_4xx")
    assert plain["c"].rewrite == "A detailed picture of a dog"
    with pytest.raises(ServerUnreachable):
        enhance_texts(cases, "http://127.0.0.1:9/v1", SERVED, client={"max_attempts": 1})


def test_prompt_track_call_point_records_rewrites(tmp_path):
    """flywheel.tracks.enhance_prompts (FLYWHEEL's call point) with our Rewriter on a real LanceDB."""
    import pyarrow as pa

    from flywheel.enhance import rewrite_cases
    from flywheel.schema import PROMPT_REWRITES
    from flywheel.store import connect, open_table, upsert
    from flywheel.tracks import enhance_prompts

    db = connect(str(tmp_path / "fw.lancedb"))
    waiting = [dict(case_id=c, prompt=p, status="awaiting_enhancer") for c, p in [("c1", "a bus"), ("c2", "REFUSE")]]
    upsert(open_table(db, "prompt_rewrites"), pa.Table.from_pylist(waiting, schema=PROMPT_REWRITES))
    with ScriptedServer(respond) as server:
        assert enhance_prompts(db, server.url, SERVED, rewrite_cases) == 2
    rows = {r["case_id"]: r for r in open_table(db, "prompt_rewrites").to_arrow().to_pylist()}
    assert (rows["c1"]["status"], rows["c1"]["rewrite"], rows["c1"]["model"]) == (
        "rewritten", "An enhanced, detailed version of: a bus", SERVED)
    assert rows["c2"]["status"] == "failed" and rows["c2"]["rewrite"] is None


def test_nightly_prompt_enhancer_step_rewrites_or_leaves_cases_awaiting(tmp_path):
    """The nightly job's "prompt enhancer" step (run when `prompt_enhancer.server` is set): rewrites
    recorded while the PE is served; with the server down the cases stay awaiting for the next night."""
    import pyarrow as pa

    from flywheel.config import load_config
    from flywheel.nightly import run_enhancer
    from flywheel.schema import PROMPT_REWRITES
    from flywheel.store import connect, open_table, upsert

    db = connect(str(tmp_path / "fw.lancedb"))
    waiting = [dict(case_id=c, prompt=p, status="awaiting_enhancer") for c, p in [("c1", "a bus"), ("c2", "a poster")]]
    upsert(open_table(db, "prompt_rewrites"), pa.Table.from_pylist(waiting, schema=PROMPT_REWRITES))

    down = load_config(ROOT / "configs" / "flywheel.yaml", {"workdir": str(tmp_path / "fw.lancedb"),
                       "prompt_enhancer.server": "http://127.0.0.1:9/v1", "prompt_enhancer.model": SERVED})
    assert run_enhancer(down, db).startswith("prompt enhancer: unreachable, cases stay awaiting")
    statuses = {r["case_id"]: r["status"] for r in open_table(db, "prompt_rewrites").to_arrow().to_pylist()}
    assert statuses == {"c1": "awaiting_enhancer", "c2": "awaiting_enhancer"}

    with ScriptedServer(respond) as server:
        up = load_config(ROOT / "configs" / "flywheel.yaml", {"workdir": str(tmp_path / "fw.lancedb"),
                         "prompt_enhancer.server": server.url, "prompt_enhancer.model": SERVED})
        assert run_enhancer(up, db) == "prompt enhancer: 2 rewrites recorded"
    rows = {r["case_id"]: r for r in open_table(db, "prompt_rewrites").to_arrow().to_pylist()}
    assert rows["c1"]["rewrite"] == "An enhanced, detailed version of: a bus" and rows["c2"]["status"] == "rewritten"
