"""Captioning through outages and limits, against a real local HTTP server with scripted answers
(stopped and started again on the same port for outages): backoff, Retry-After, timeouts, the
circuit breaker, --server-patience, commit failures, no ok row overwritten, image and token limits.
The same outage against the real vLLM server is in test_vllm_integration.py."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time
from pathlib import Path

import lance
from conftest import (
    SERVED,
    TINY_ANSWERS,
    TINY_PROMPTS,
    ScriptedServer,
    caption_job,
    completion,
    free_port,
    image_of,
    jpeg,
    kind_of,
    synthetic_image,
    valid,
    write_curated,
)
from PIL import Image

from captioning.client import CaptionClient
from captioning.config import load_config
from captioning.pipeline import CaptionWriter, failed_row, run
from captioning.prompts import PromptSet


def cfg_for(tmp_path, url, **kw):
    return load_config(**{"input": str(tmp_path / "curated.lance"), "output": str(tmp_path / "captions.lance"),
                          "model": SERVED, "server": url, "backoff_s": 0.05, "backoff_max_s": 0.2, "max_attempts": 2,
                          "commit_every": 2, "progress": False, "ocr_engine": "none", **TINY_PROMPTS, **kw})


def ask(cfg, kind="route"):
    prompts = PromptSet.load(cfg.prompt_root, cfg.prompt_version)

    async def go():
        client = CaptionClient(cfg, prompts)
        try:
            return await client.request(kind, jpeg(synthetic_image(0, (64, 64))), "r1"), client
        finally:
            await client.aclose()

    return asyncio.run(go())


def cli(tmp_path, url, *extra):
    argv = ["--input", str(tmp_path / "curated.lance"), "--output", str(tmp_path / "captions.lance"), "--model", SERVED,
            "--server", url, "--prompt-root", TINY_PROMPTS["prompt_root"], "--prompt-version", "tiny",
            "--no-progress", "--ocr-engine", "none", "--commit-every", "2", "--concurrency", "2", *extra]
    return caption_job.main(argv)


def rows_of(tmp_path) -> dict[str, dict]:
    return {r["id"]: r for r in lance.dataset(tmp_path / "captions.lance").to_table().to_pylist()}


def test_connection_errors_while_the_server_answers_back_off_with_jitter_and_count(scripted, tmp_path):
    with scripted(lambda b: "drop") as srv:  # POSTs dropped, the health probe (GET) answers
        out, client = ask(cfg_for(tmp_path, srv.url, max_attempts=3, backoff_s=0.3, backoff_max_s=0.4))
    assert not out.ok and out.error_kind == "connection" and out.attempts == 3 and len(srv.requests) == 3
    gaps = [b - a for a, b in zip(srv.times, srv.times[1:], strict=False)]
    assert 0.15 <= gaps[0] <= 0.3 + 0.25 and 0.2 <= gaps[1] <= 0.4 + 0.25  # [d/2, d], d = 0.3, then min(0.6, cap 0.4)
    assert client.breaker.outages == 0


def test_retry_after_is_honoured_and_timeouts_are_separate(scripted, tmp_path):
    replies = iter([(429, "slow down", {"Retry-After": "1"})])
    with scripted(lambda b: next(replies, None) or valid(b)) as srv:
        out, client = ask(cfg_for(tmp_path, srv.url, backoff_s=0.01, backoff_max_s=0.01))
    assert out.ok and out.attempts == 2 and srv.times[1] - srv.times[0] >= 1.0
    t = client.http.timeout
    assert (t.connect, t.read, t.pool) == (10.0, 600.0, None)

    def slow(body):
        time.sleep(1.5)
        return valid(body)

    with scripted(slow) as srv:
        start = time.monotonic()
        out, _ = ask(cfg_for(tmp_path, srv.url, read_timeout_s=0.3, connect_timeout_s=5, max_attempts=1))
        elapsed = time.monotonic() - start
    assert out.error_kind == "timeout" and "ReadTimeout" in out.error and elapsed < 1.4


def _restart_after(srv: ScriptedServer, n_requests: int, down_s: float | None, holder: dict) -> threading.Thread:
    """Stop `srv` once it has seen n_requests chat requests, keep the port closed for down_s, start a
    new server on the same port (holder["server"]); down_s None: stay down."""
    def go():
        while len(srv.requests) < n_requests:
            time.sleep(0.01)
        srv.stop()
        if down_s is not None:
            time.sleep(down_s)
            holder["server"] = ScriptedServer(srv.respond, port=srv.httpd.server_address[1]).__enter__()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_outage_mid_run_pauses_every_request_and_resumes_with_no_row_failed(tmp_path):
    write_curated(tmp_path / "curated.lance", [True] * 8)
    srv = ScriptedServer(valid, port=free_port()).__enter__()
    holder: dict = {}
    t = _restart_after(srv, 10, 2.0, holder)
    try:
        summary = run(cfg_for(tmp_path, srv.url, server_patience_s=30, concurrency=4))
    finally:
        t.join(timeout=10)
        holder.get("server", srv).stop()
    rows = rows_of(tmp_path)
    assert len(rows) == 8 and all(r["caption_status"] == "ok" for r in rows.values()), [r["caption_error"] for r in rows.values()]
    assert summary.outages >= 1 and summary.paused_s >= 1.0 and summary.failed == 0
    # A request cut by the outage was sent again, never counted as a failed attempt.
    assert all(r["attempts"] == 7 for r in rows.values())  # route + 3 types x 2 languages, no retries


def test_outage_longer_than_patience_commits_what_finished_exits_3_and_the_rerun_completes(tmp_path, capsys):
    write_curated(tmp_path / "curated.lance", [True] * 6)
    port = free_port()
    srv = ScriptedServer(valid, port=port).__enter__()
    stopper = _restart_after(srv, 16, None, {})  # stopped for good after 16 requests (2+ rows)
    start = time.monotonic()
    code = cli(tmp_path, srv.url, "--server-patience", "2", "--concurrency", "1")
    err = capsys.readouterr().err.strip().splitlines()
    stopper.join(timeout=5)
    assert code == 3 and len(err) == 1, err
    assert "unreachable for 2 s (--server-patience)" in err[0] and "rerun the same command to resume" in err[0]
    assert time.monotonic() - start < 20
    first = rows_of(tmp_path)
    assert 1 <= len(first) < 6 and all(r["caption_status"] == "ok" for r in first.values())  # nothing marked failed

    with ScriptedServer(valid, port=port) as again:
        assert cli(tmp_path, again.url) == 0
    out = capsys.readouterr().out
    assert f"skipped {len(first)} already captioned" in out
    after = rows_of(tmp_path)
    assert len(after) == 6 and all(r["caption_status"] == "ok" for r in after.values())
    assert all(after[i]["captioned_at"] == r["captioned_at"] for i, r in first.items())


def test_a_failing_lance_commit_exits_4_and_the_rerun_loses_nothing(tmp_path, capsys):
    write_curated(tmp_path / "curated.lance", [True] * 6)
    out_dir = tmp_path / "captions.lance"
    moved = tmp_path / "moved.lance"

    def sabotage(body):
        # Once the first commit is visible, the output path stops being a Lance table: the next
        # commit fails in Lance itself (a real storage failure, no mock).
        if not moved.exists() and out_dir.is_dir():
            try:
                committed = lance.dataset(out_dir).count_rows()
            except (ValueError, OSError):
                committed = 0
            if committed:
                out_dir.rename(moved)
                out_dir.write_text("not a table")
        return valid(body)

    with ScriptedServer(sabotage) as srv:
        code = cli(tmp_path, srv.url, "--concurrency", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "Lance commit to --output" in err[0] and "were not written" in err[0], err
    out_dir.unlink()
    moved.rename(out_dir)
    before = rows_of(tmp_path)
    with ScriptedServer(valid) as srv:
        assert cli(tmp_path, srv.url) == 0
    after = rows_of(tmp_path)
    assert len(after) == 6 and set(before) < set(after) and all(r["caption_status"] == "ok" for r in after.values())


def test_no_ok_caption_is_overwritten_and_recaption_keeps_the_previous_version(tmp_path):
    write_curated(tmp_path / "curated.lance", [True] * 4)
    root = tmp_path / "prompts_b"  # a second prompt version: the tiny set copied as tiny_b
    for sub in ("prompts", "schemas"):
        shutil.copytree(Path(TINY_PROMPTS["prompt_root"]) / sub / "tiny", root / sub / "tiny_b")
    with ScriptedServer(valid) as srv:
        run(cfg_for(tmp_path, srv.url))
    ok = rows_of(tmp_path)
    assert all(r["caption_status"] == "ok" for r in ok.values())
    b = {"prompt_root": str(root), "prompt_version": "tiny_b"}

    with ScriptedServer(lambda body: (500, "engine dead")) as srv:
        plain = run(cfg_for(tmp_path, srv.url, **b))  # another version, no --recaption: ok rows are done
        assert plain.skipped == 4 and not srv.requests
        failing = run(cfg_for(tmp_path, srv.url, recaption=True, **b))
    assert failing.kept_previous == 4 and failing.captioned == 0
    assert rows_of(tmp_path) == ok  # the failed recaption replaced nothing

    # The guard also holds at the table: a failed row committed for an ok id leaves the ok row.
    cfg = cfg_for(tmp_path, "http://127.0.0.1:9/v1")
    writer = CaptionWriter(cfg, cfg.input, 1)
    writer.commit([failed_row(cfg, "id000", "http_5xx", "HTTP 500", 1)])
    assert rows_of(tmp_path)["id000"] == ok["id000"]

    with ScriptedServer(valid) as srv:
        again = run(cfg_for(tmp_path, srv.url, recaption=True, **b))
    assert again.recaptioned == 4
    for r in rows_of(tmp_path).values():
        assert (r["caption_status"], r["prompt_version"], r["previous_prompt_version"], r["previous_model"]) == (
            "ok", "tiny_b", "tiny", SERVED)


def test_images_are_downscaled_to_max_pixels_and_sent_with_their_real_mime_type(tmp_path):
    def encoded(im, fmt):
        buf = io.BytesIO()
        im.save(buf, fmt)
        return buf.getvalue()

    big, small = synthetic_image(1, (2400, 1600)), synthetic_image(2, (120, 90))
    images = [jpeg(big), encoded(small, "PNG"), jpeg(small), b"not an image"]
    write_curated(tmp_path / "curated.lance", [True] * 4, images)
    with ScriptedServer(valid) as srv:
        summary = run(cfg_for(tmp_path, srv.url, max_pixels=200_000))
    sent = {}
    for body in srv.requests:
        url = body["messages"][-1]["content"][0]["image_url"]["url"]
        sent.setdefault(url.split(";")[0][5:], set()).add(image_of(body))
    assert summary.resized == 1
    (down,) = [Image.open(io.BytesIO(b)) for b in sent["image/jpeg"] if Image.open(io.BytesIO(b)).width > 200]
    assert down.width * down.height <= 200_000 and abs(down.width / down.height - 1.5) < 0.01
    assert sent["image/png"] == {images[1]} and images[2] in sent["image/jpeg"]  # small ones go as stored
    bad = rows_of(tmp_path)["id003"]
    assert bad["caption_status"] == "failed" and bad["caption_error_kind"] == "bad_image"


def test_cut_answers_are_retried_with_a_larger_limit_up_to_the_cap(scripted, tmp_path):
    def cut_below_64(body):
        return valid(body) if body["max_tokens"] >= 64 else (200, completion('{"has_te', finish="length"))

    with scripted(cut_below_64) as srv:
        out, _ = ask(cfg_for(tmp_path, srv.url, route_max_tokens=16, max_tokens_cap=64, max_attempts=3))
    assert out.ok and [b["max_tokens"] for b in srv.requests] == [16, 32, 64]
    with scripted(cut_below_64) as srv:
        out, _ = ask(cfg_for(tmp_path, srv.url, route_max_tokens=16, max_tokens_cap=32, max_attempts=3))
    assert not out.ok and out.error_kind == "length" and "max_tokens=32" in out.error and "cap max_tokens_cap=32" in out.error
    assert [b["max_tokens"] for b in srv.requests] == [16, 32, 32]


def test_an_answer_still_cut_at_the_cap_is_asked_as_shorter_requests_and_the_reason_kept(tmp_path):
    """general.en is always cut: it is asked again as short+medium and dense alone (schemas narrowed
    to those fields, merged into the stored shape); where dense alone is still cut, the row fails
    with reason length and says which shorter request was cut."""
    write_curated(tmp_path / "curated.lance", [True] * 2)
    long_image = jpeg(synthetic_image(1, (96, 80)))  # id001's image: its dense level never fits

    def answer(body):
        name = body["response_format"]["json_schema"]["name"].split("_", 1)[0]  # e.g. general-en-dense
        if name == "general-en" or (name == "general-en-dense" and image_of(body) == long_image):
            return 200, completion('{"en":{"sho', finish="length")
        if name.startswith("general-en-"):
            fields = name.removeprefix("general-en-").split("-")
            return 200, completion(json.dumps({"en": {f: TINY_ANSWERS["general.en"]["en"][f] for f in fields}}))
        return valid(body)

    with ScriptedServer(answer) as srv:
        summary = run(cfg_for(tmp_path, srv.url, max_tokens=16, max_tokens_cap=32))
    rows = rows_of(tmp_path)
    prompts = PromptSet.load(TINY_PROMPTS["prompt_root"], "tiny")
    ok, cut = rows["id000"], rows["id001"]
    assert ok["caption_status"] == "ok" and json.loads(ok["caption_general"]) == TINY_ANSWERS["general"]
    prompts.validate("general", ok["caption_general"])
    assert cut["caption_status"] == "failed" and cut["caption_error_kind"] == "length" and summary.failures == {"length": 1}
    assert "asked again as shorter requests (general.en.short-medium, general.en.dense)" in cut["caption_error"]
    assert "general.en.dense: answer cut at max_tokens=32" in cut["caption_error"]
    sent = [b for b in srv.requests if kind_of(b).startswith("general.en")]
    by_name = {}
    for b in sent:
        by_name.setdefault(b["response_format"]["json_schema"]["name"].split("_", 1)[0], []).append(b)
    assert sorted(b["max_tokens"] for b in by_name["general-en"]) == [16, 16, 32, 32]  # two rows, cap 32
    for name, fields in (("general-en-short-medium", ["short", "medium"]), ("general-en-dense", ["dense"])):
        schema = by_name[name][0]["response_format"]["json_schema"]["schema"]
        assert list(schema["properties"]["en"]["properties"]) == fields == schema["properties"]["en"]["required"]
        assert by_name[name][0]["messages"][-1]["content"][1]["text"].endswith(
            "write only these fields: " + ", ".join(f'"{f}"' for f in fields) + ".")


def test_a_request_whose_connection_dies_without_a_reset_is_an_outage_when_the_probe_fails_too(tmp_path):
    """The server's port closes while a request is in flight and its connection stays open without
    an answer (a host or network gone: no reset reaches the client): the read timeout asks the
    breaker, the probe is refused, the job pauses, and the request is sent again once the server is
    back, not counted (max_attempts 1 would otherwise fail it as a timeout)."""
    first = threading.Event()

    def hang_first(body):
        if not first.is_set():
            first.set()
            time.sleep(4)  # the answer never reaches the client: its read timeout is 1 s
        return valid(body)

    srv = ScriptedServer(hang_first, port=free_port()).__enter__()
    holder: dict = {}
    t = _restart_after(srv, 1, 1.6, holder)  # port closed once the request is in, open again 1.6 s later
    try:
        out, client = ask(cfg_for(tmp_path, srv.url, read_timeout_s=1.0, max_attempts=1, server_patience_s=20))
    finally:
        t.join(timeout=10)
        holder.get("server", srv).stop()
    assert out.ok and out.attempts == 1, out
    assert client.breaker.outages == 1 and client.breaker.paused_s > 0.2
