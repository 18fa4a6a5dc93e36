"""Fixtures for captioning tests: tiny curated Lance tables, a scripted HTTP server for retry paths,
and (session-wide) a tiny random Qwen2-VL served by a REAL vLLM OpenAI server on the CPU."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from captioning.testing import (  # noqa: F401 (re-exported for the test modules)
    VLLMServer,
    build_tiny_qwen2vl,
    free_port,
    jpeg,
    shared_tiny_vlm,
    shared_vllm_server,
    synthetic_image,
    vllm_available,
    write_curated,
)

DATA = Path(__file__).parent / "data"
TINY_PROMPTS = dict(prompt_root=str(DATA), prompt_version="tiny")
SERVED = "tiny-qwen2-vl"

# Valid answers for the tiny test schemas (tests/captioning/data/schemas/tiny).
TINY_ANSWERS = {
    "route": {"has_text": True, "is_structured": False, "has_known_entities": True},
    "general": {"en": {"short": "cat", "medium": "red", "dense": "box"},
                "zh": {"short": "猫", "medium": "红色", "dense": "盒"}},
    "text": {"layout": "poster", "blocks": [{"text": "sale", "position": "top", "role": "title"}],
             "en": "sale", "zh": "促销"},
    "knowledge": {"entities": [{"name": "cat", "type": "species", "confidence": "high"}], "en": "cat", "zh": "猫"},
    "structured": {"kind": "chart", "entities": [{"id": "a", "label": "x", "attributes": {}}], "relations": [],
                   "en": "bar", "zh": "图"},
}


# The tiny set asks each caption type in one request per language (like v2): the English part has the
# language-neutral fields and "en", the Chinese part "zh" only.
TINY_ANSWERS |= {f"{k}.{lang}": {n: v for n, v in TINY_ANSWERS[k].items() if n == lang or (lang == "en" and n != "zh")}
                 for k in ("general", "text", "knowledge", "structured") for lang in ("en", "zh")}


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))  # jobs/_bootstrap.py, as when the job runs as a script
_spec = importlib.util.spec_from_file_location("caption_job", ROOT / "jobs" / "caption.py")
caption_job = importlib.util.module_from_spec(_spec)  # jobs/caption.py, for in-process CLI runs
_spec.loader.exec_module(caption_job)


def valid(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A scripted reply: the valid tiny answer for the request's kind."""
    return 200, completion(json.dumps(TINY_ANSWERS[kind_of(body)], ensure_ascii=False))


def completion(content: str, finish: str = "stop") -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "model": SERVED,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}]}


Reply = tuple[int, Any] | tuple[int, Any, dict[str, str]] | str  # (status, payload[, headers]) or "drop"


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5; the job opens up to `concurrency` (32) connections at
    # once, and on a busy 2-core machine the kernel resets the overflow before the accept loop catches
    # up (ConnectionResetError on a request the server never saw: an extra attempt, a flaky count).
    # uvicorn, which vLLM runs, listens with a backlog of 2048.
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        # A client that goes away mid-request (a job stopping on --server-patience) is what these tests
        # make happen; socketserver would print its traceback to sys.stderr, which the tests read for
        # the job's own one-line message. Kept for inspection instead.
        self.errors = [*getattr(self, "errors", []), sys.exc_info()[1]]


class ScriptedServer:
    """A real local HTTP server whose chat answers come from a Python function (for retry paths that
    a vLLM server cannot be made to produce on demand: 429, 5xx, dropped connections)."""

    def __init__(self, respond: Callable[[dict[str, Any]], Reply], port: int = 0):
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.times: list[float] = []  # time.monotonic() of each chat request
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = (json.dumps(payload) if not isinstance(payload, str) else payload).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": SERVED, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.times.append(time.monotonic())
                outer.requests.append(body)
                reply = outer.respond(body)
                if reply == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._send(*reply)

        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering (connections are refused from now on; HTTP/1.0: no connection stays open)."""
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


def kind_of(body: dict[str, Any]) -> str:
    return body["response_format"]["json_schema"]["name"].split("_", 1)[0].replace("-", ".")  # <kind>_<version>


def image_of(body: dict[str, Any]) -> bytes:
    url = body["messages"][-1]["content"][0]["image_url"]["url"]
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture
def scripted():
    """Factory: `with scripted(fn) as server:` starts a ScriptedServer answering with fn(body)."""
    return ScriptedServer


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    return shared_tiny_vlm(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def vllm_server(tiny_vlm, tmp_path_factory):
    """One real vLLM OpenAI-compatible server (CPU, float32, eager) for the whole session (shared with
    tests/e2e; stopped when the process exits)."""
    reason = vllm_available()
    if reason:
        pytest.skip(reason)
    return shared_vllm_server(tmp_path_factory.getbasetemp(), SERVED)
