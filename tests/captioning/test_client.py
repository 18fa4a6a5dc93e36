"""Retry semantics of the HTTP client against a real local HTTP server with scripted answers."""

import asyncio
import json

import pytest
from conftest import SERVED, TINY_ANSWERS, TINY_PROMPTS, completion, kind_of

from captioning.client import CaptionClient, ServerUnreachable, check_server
from captioning.config import load_config
from captioning.prompts import PromptSet


def make_cfg(url, **kw):
    return load_config(**{"input": "in.lance", "output": "out.lance", "model": SERVED, "server": url,
                          "backoff_s": 0.01, "max_attempts": 3, **TINY_PROMPTS, **kw})


def ask(cfg, kind="route", row_id="r1"):
    prompts = PromptSet.load(cfg.prompt_root, cfg.prompt_version)

    async def go():
        client = CaptionClient(cfg, prompts)
        try:
            return await client.request(kind, b"jpeg", row_id)
        finally:
            await client.aclose()

    return asyncio.run(go())


def valid(body):
    return 200, completion(json.dumps(TINY_ANSWERS[kind_of(body)]))


def in_order(*replies):
    """Answer the n-th request with replies[n]; the last one repeats; a callable gets the body."""
    seen = []

    def respond(body):
        seen.append(body)
        r = replies[min(len(seen), len(replies)) - 1]
        return r(body) if callable(r) else r

    return respond


def test_429_and_5xx_are_retried_and_every_attempt_counts(scripted):
    with scripted(in_order((429, "slow down"), (503, "overloaded"), valid)) as srv:
        out = ask(make_cfg(srv.url))
    assert out.ok and out.attempts == 3 and len(srv.requests) == 3
    assert json.loads(out.text) == TINY_ANSWERS["route"]
    body = srv.requests[-1]
    assert body["model"] == SERVED and body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == [
        "has_text", "is_structured", "has_known_entities"]
    assert len({r["seed"] for r in srv.requests}) == 3  # a retry samples with a new seed


def test_persistent_5xx_fails_after_exactly_max_attempts(scripted):
    with scripted(lambda b: (500, "boom")) as srv:
        out = ask(make_cfg(srv.url, max_attempts=4))
    assert not out.ok and out.error_kind == "http_5xx" and "500" in out.error
    assert out.attempts == 4 and len(srv.requests) == 4


def test_bad_request_is_not_retried(scripted):
    with scripted(lambda b: (400, {"error": "prompt too long"})) as srv:
        out = ask(make_cfg(srv.url))
    assert out.error_kind == "http_4xx" and len(srv.requests) == 1


@pytest.mark.parametrize("reply,kind", [
    ((200, completion('{"has_text": tr', finish="length")), "length"),
    ((200, completion('{"has_text": "\x01"}')), "invalid_json"),
    ((200, completion('{"has_text": true}')), "schema"),
    ("drop", "connection"),
])
def test_truncated_invalid_and_dropped_answers_are_failed_attempts(scripted, reply, kind):
    with scripted(lambda b: reply) as srv:
        out = ask(make_cfg(srv.url, max_attempts=2))
    assert not out.ok and out.error_kind == kind and out.attempts == 2 and len(srv.requests) == 2


def test_an_invalid_answer_then_a_valid_one_succeeds(scripted):
    with scripted(in_order((200, completion('{"has_text": true}')), valid)) as srv:
        out = ask(make_cfg(srv.url))
    assert out.ok and out.attempts == 2


def test_check_server_names_the_flag_when_the_model_is_not_served(scripted):
    with scripted(valid) as srv:
        assert asyncio.run(check_server(make_cfg(srv.url))) == [SERVED]
        with pytest.raises(ServerUnreachable, match="--model 'other' is not served"):
            asyncio.run(check_server(make_cfg(srv.url, model="other")))


def test_check_server_gives_up_after_the_retry_bound():
    cfg = make_cfg("http://127.0.0.1:9/v1", max_attempts=2)
    with pytest.raises(ServerUnreachable, match="unreachable after 2 attempts"):
        asyncio.run(check_server(cfg))
