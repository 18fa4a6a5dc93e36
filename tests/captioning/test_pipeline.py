"""The job's Lance contract (one row per kept id, failures recorded, resume) and its CLI errors, with a
scripted local HTTP server standing in for vLLM (the real server is in test_vllm_integration.py)."""

import json
from pathlib import Path

import lance
import pytest
from conftest import (
    ROOT,
    SERVED,
    TINY_ANSWERS,
    TINY_PROMPTS,
    caption_job,
    completion,
    image_of,
    jpeg,
    kind_of,
    synthetic_image,
    valid,
    write_curated,
)

from captioning.config import load_config
from captioning.pipeline import run
from captioning.schema import SCHEMA


def cfg_for(tmp_path, url, **kw):
    return load_config(**{"input": str(tmp_path / "curated.lance"), "output": str(tmp_path / "captions.lance"),
                          "model": SERVED, "server": url, "backoff_s": 0.0, "max_attempts": 2,
                          "commit_every": 2, "progress": False, **TINY_PROMPTS, **kw})


def test_only_kept_rows_are_captioned_once_each_with_routing_and_provenance(tmp_path, scripted):
    keep = [True, False, True, True, False, True, True]
    src = write_curated(tmp_path / "curated.lance", keep)
    with scripted(valid) as srv:
        summary = run(cfg_for(tmp_path, srv.url))
    out = lance.dataset(tmp_path / "captions.lance")
    rows = {r["id"]: r for r in out.to_table().to_pylist()}
    assert sorted(rows) == [f"id{i:03d}" for i, k in enumerate(keep) if k]
    assert summary.kept == 5 and summary.ok == 5 and summary.failed == 0
    # Route says text + knowledge: 1 routing + 3 caption types x 2 languages per row; the text
    # caption's transcription ("sale") is not in these images, so OCR disagrees and it is asked once
    # more (both languages).
    assert summary.requests == len(srv.requests) == 5 * (1 + 3 * 2 + 2)
    # Chinese is asked by a Chinese instruction under a Chinese system prompt, never with the English answer.
    zh = [b for b in srv.requests if kind_of(b).endswith(".zh")]
    assert len(zh) == 5 * 4 and all(b["messages"][0]["content"] == "只输出 JSON。" for b in zh)
    assert all(b["messages"][-1]["content"][1]["text"].startswith("用中文") for b in zh)
    assert all(set(b["response_format"]["json_schema"]["schema"]["properties"]) == {"zh"} for b in zh)
    assert (summary.ocr_checked, summary.ocr_retried, summary.ocr_flagged) == (5, 5, 5)
    assert out.version >= 2  # committed every 2 rows (a commit takes whatever finished meanwhile)
    for r in rows.values():
        assert r["caption_status"] == "ok" and r["caption_error"] is None
        assert (r["route_text"], r["route_knowledge"], r["route_structured"]) == (True, True, False)
        assert json.loads(r["caption_general"]) == TINY_ANSWERS["general"]
        assert r["caption_text"] is not None and r["caption_knowledge"] is not None
        assert r["caption_structured"] is None
        assert r["ocr_flag"] is True and r["ocr_agreement"] == 0.0 and r["ocr_engine"] == "rapidocr"
        assert (r["model"], r["prompt_version"], r["source_version"]) == (SERVED, "tiny", src.version)
    assert out.schema.metadata[b"captioning.source_version"] == str(src.version).encode()
    assert set(SCHEMA.names) <= set(out.schema.names)
    assert summary.stats["routing"] == {"general": 5, "text": 5, "structured": 0, "knowledge": 5}


def test_failed_rows_are_recorded_then_replaced_in_place_by_a_rerun(tmp_path, scripted):
    images = [jpeg(synthetic_image(i, (96, 80))) for i in range(6)]
    write_curated(tmp_path / "curated.lance", [True] * 6, images)
    broken = {images[1], images[4]}
    with scripted(lambda b: (500, "engine dead") if image_of(b) in broken else valid(b)) as srv:
        first = run(cfg_for(tmp_path, srv.url))
    assert (first.ok, first.failed, dict(first.failures)) == (4, 2, {"http_5xx": 2})
    before = {r["id"]: r for r in lance.dataset(tmp_path / "captions.lance").to_table().to_pylist()}
    assert before["id001"]["caption_status"] == "failed"
    assert before["id001"]["caption_error"].startswith("route: http_5xx: HTTP 500")
    assert before["id001"]["attempts"] == 2 and before["id001"]["caption_general"] is None

    with scripted(valid) as srv:
        second = run(cfg_for(tmp_path, srv.url))
    assert second.skipped == 4 and second.captioned == 2 and second.ok == 2
    assert {image_of(b) for b in srv.requests} == broken  # only the failed rows were asked again
    after = {r["id"]: r for r in lance.dataset(tmp_path / "captions.lance").to_table().to_pylist()}
    assert sorted(after) == sorted(before) and len(after) == 6
    assert all(r["caption_status"] == "ok" for r in after.values())
    for i in ("id000", "id002", "id003", "id005"):  # ok rows were not captioned twice
        assert after[i]["captioned_at"] == before[i]["captioned_at"]


def test_a_new_prompt_version_or_model_recaptions_in_place(tmp_path, scripted):
    write_curated(tmp_path / "curated.lance", [True] * 3)
    with scripted(valid) as srv:
        run(cfg_for(tmp_path, srv.url))
        again = run(cfg_for(tmp_path, srv.url, extra_request={"top_p": 0.9}))
        assert again.captioned == 0 and again.skipped == 3
    out = lance.dataset(tmp_path / "captions.lance")
    assert out.count_rows() == 3


def test_report_has_statistics_and_embedded_plots(tmp_path, scripted):
    write_curated(tmp_path / "curated.lance", [True] * 3)
    with scripted(valid) as srv:
        summary = run(cfg_for(tmp_path, srv.url, report=str(tmp_path / "r.html")))
    stats = summary.stats
    assert stats["zh_cjk_share"]["general"] == 1.0 and stats["captions"]["text"] == 3
    assert stats["length_summary"]["general"]["en"]["median"] == len("cat\nred\nbox")
    assert stats["text_quoted_share"] == 0.0  # "sale" is not quoted in the tiny answer
    page = Path(summary.report).read_text()
    assert page.count("data:image/png;base64,") == 3 and "routing: general=3" in page
    assert "OCR agreement of text captions" in page and "OCR check of 3 text captions" in page


def run_cli(*argv, capsys):
    code = caption_job.main(list(argv))
    return code, capsys.readouterr()


def test_cli_rejects_bad_input_before_any_work(tmp_path, capsys, scripted):
    out = str(tmp_path / "captions.lance")
    code, io = run_cli("--input", str(tmp_path / "missing.lance"), "--output", out, "--model", "m",
                       "--server", "http://127.0.0.1:9/v1", capsys=capsys)
    assert code == 2 and "--input" in io.err and "not a readable Lance table" in io.err
    code, io = run_cli("--output", out, "--model", "m", capsys=capsys)
    assert code == 2 and "'input' is required (--input)" in io.err
    code, io = run_cli("--input", "a", "--output", out, "--model", "m", "--commit-every", "0", capsys=capsys)
    assert code == 2 and "commit_every" in io.err
    write_curated(tmp_path / "curated.lance", [True])
    code, io = run_cli("--input", str(tmp_path / "curated.lance"), "--output", out, "--model", "/no/such/model",
                       capsys=capsys)
    assert code == 2 and "--model /no/such/model" in io.err
    (tmp_path / "bad.yaml").write_text("concurency: 3\n")
    code, io = run_cli("--config", str(tmp_path / "bad.yaml"), "--input", "a", "--output", out, "--model", "m",
                       capsys=capsys)
    assert code == 2 and "concurency: unknown field (did you mean 'concurrency'?)" in io.err
    assert not Path(out).exists()


def test_cli_exits_nonzero_when_the_server_is_unreachable(tmp_path, capsys):
    write_curated(tmp_path / "curated.lance", [True, True])
    code, io = run_cli("--input", str(tmp_path / "curated.lance"), "--output", str(tmp_path / "c.lance"),
                       "--model", SERVED, "--server", "http://127.0.0.1:9/v1", "--max-attempts", "2",
                       "--prompt-root", TINY_PROMPTS["prompt_root"], "--prompt-version", "tiny", capsys=capsys)
    assert code == 2 and "--server http://127.0.0.1:9/v1: unreachable after 2 attempts" in io.err
    assert not (tmp_path / "c.lance").exists()


def test_cli_prints_failures_by_reason_and_exits_zero(tmp_path, capsys, scripted):
    write_curated(tmp_path / "curated.lance", [True, True, True])
    with scripted(lambda b: (200, completion('{"has_text":', finish="length"))) as srv:
        code, io = run_cli("--input", str(tmp_path / "curated.lance"), "--output", str(tmp_path / "c.lance"),
                           "--model", SERVED, "--server", srv.url, "--max-attempts", "2", "--no-progress",
                           "--prompt-root", TINY_PROMPTS["prompt_root"], "--prompt-version", "tiny", capsys=capsys)
    assert code == 0
    assert "3 failed" in io.out and "failed rows by reason: length=3" in io.out
    assert Path(str(tmp_path / "c.lance") + ".report.html").exists()


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 3.0, "temperature"), ("max_attempts", "3", "max_attempts: expected an integer"), ("server", "localhost:8000", "http"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        load_config(input="a", output="b", model="m", **{field: value})


def test_example_config_loads():
    cfg = load_config(ROOT / "configs" / "caption.yaml", input="a", output="b", model="m")
    assert cfg.prompt_version == "v2" and cfg.commit_every == 256
