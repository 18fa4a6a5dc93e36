"""Test inputs for the PE jobs: a captions table written by the captioning job's own row builder and
writer (schema captioning/schema.py, answers valid under the v1 caption schemas), and a scripted
OpenAI-compatible answerer for the PE requests (the semantic checks need answers a random model
cannot give)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lance

# id suffix -> what the row has (see write_captions)
KINDS = {"gen": ["general"], "txt": ["general", "text"], "all": ["general", "text", "knowledge", "structured"],
         "por": ["general", "knowledge"], "bad": None}


def caption_values(i: int, kinds: list[str]) -> dict[str, dict]:
    """Valid v1 answers of every caption type in `kinds` for row i (names and quoted text included)."""
    person = "por" if "knowledge" in kinds and "text" not in kinds else None
    subject = "a young woman in a red coat" if person else f"a wooden cabin number {i} beside a lake"
    out = {"general": {
        "en": {"short": f"Photo of {subject}", "medium": f"A photo of {subject}, soft evening light over the water.",
               "dense": f"A wide photo of {subject} in the Swiss Alps near Lake Geneva, warm golden evening light, "
                        "rough pine texture, snowy peaks in the background, a small red boat on the left."},
        "zh": {"short": "湖边的木屋照片", "medium": "一张湖边木屋的照片，傍晚柔和的光线洒在水面上。",
               "dense": "一张广角照片：瑞士阿尔卑斯山中日内瓦湖畔的一座木屋，温暖的金色傍晚光线，粗糙的松木纹理，"
                        "背景是积雪的山峰，左侧有一条红色小船，画面宁静。"}}}
    if "text" in kinds:
        out["text"] = {"layout": "sign", "blocks": [{"text": "OPEN DAILY", "position": "top", "role": "title"},
                                                    {"text": "Cafe Lumen", "position": "bottom", "role": "logo"}],
                       "en": 'A wooden sign reading "OPEN DAILY" above the logo "Cafe Lumen".',
                       "zh": '木牌上写着"OPEN DAILY"，下方是标志"Cafe Lumen"。'}
    if "knowledge" in kinds:
        out["knowledge"] = {"entities": [{"name": "Lake Geneva", "type": "landmark", "confidence": "high"}],
                            "en": "Lake Geneva lies between Switzerland and France.",
                            "zh": "日内瓦湖位于瑞士和法国之间，是阿尔卑斯山区最大的湖泊之一。"}
    if "structured" in kinds:
        out["structured"] = {"kind": "diagram", "entities": [{"id": "a", "label": "cabin", "attributes": {}},
                                                             {"id": "b", "label": "lake", "attributes": {}}],
                             "relations": [{"source": "a", "target": "b", "type": "beside", "label": ""}],
                             "en": "A diagram of the cabin beside the lake.", "zh": "一张示意图：木屋位于湖泊的旁边，箭头从木屋指向湖泊。"}
    return out


def write_captions(uri: str | Path, curated_uri: str | Path, spec: list[str]) -> list[str]:
    """A captions table for the curated table `curated_uri` (captioning.testing.write_curated), one
    row per spec entry (a key of KINDS; "bad" = a failed row), built by captioning.pipeline's
    result_row and committed by its CaptionWriter. Returns the ids."""
    from captioning.client import Outcome
    from captioning.config import PACKAGE_DIR, load_config
    from captioning.pipeline import CaptionWriter, result_row
    from captioning.prompts import ROUTE, PromptSet

    v1 = PromptSet.load(PACKAGE_DIR, "v1")
    cfg = load_config(input=str(curated_uri), output=str(uri), model="test-vlm", prompt_version="v1")
    version = lance.dataset(str(curated_uri)).version
    ids = lance.dataset(str(curated_uri)).to_table(columns=["id"]).column("id").to_pylist()

    def ok(kind: str, value: dict) -> Outcome:
        text = json.dumps(value, ensure_ascii=False)
        return Outcome(kind, 1, text=text, value=v1.validate(kind, text))

    rows = []
    for i, (row_id, what) in enumerate(zip(ids, spec, strict=False)):
        kinds = KINDS[what] or ["general"]
        values = caption_values(i, kinds)
        route = ok(ROUTE, {"has_text": "text" in kinds, "is_structured": "structured" in kinds,
                           "has_known_entities": "knowledge" in kinds})
        outs = [ok(k, values[k]) for k in kinds]
        if KINDS[what] is None:
            outs = [Outcome("general", 3, error_kind="length", error="answer cut at max_tokens")]
        rows.append(result_row(cfg, row_id, route, outs, version))
    CaptionWriter(cfg, str(curated_uri), version).commit(rows)
    return [r["id"] for r in rows]


ANNOTATION = re.compile(r"(?:Annotation|Prompt):\n(.*?)\n\nAnswer with JSON", re.S)


def request_kind(body: dict[str, Any]) -> str:
    """classify | degrade.<k> | edit | enhance | plain, from the request's schema name."""
    rf = body.get("response_format")
    return "plain" if not rf else rf["json_schema"]["name"].rsplit("_", 1)[0].replace("-", ".")


def request_text(body: dict[str, Any]) -> str:
    """The annotation (or prompt) the request is about."""
    user = body["messages"][-1]["content"]
    m = ANNOTATION.search(user)
    return m.group(1) if m else user


def scripted_answer(body: dict[str, Any], invent: str | None = None) -> dict[str, Any]:
    """A schema-valid answer: classify by keywords; degrade to the first sentence of the annotation
    (plus `invent`, a phrase NOT in the annotation, when given: the meaning check must reject it)."""
    kind, text = request_kind(body), request_text(body)
    if kind == "classify":
        cat = "portrait" if "woman" in text else "text" if '"' in text else "general"
        return {"category": cat}
    if kind.startswith("degrade"):
        k = int(kind.split(".")[1])
        short = re.split(r"(?<=[.。])", text, maxsplit=1)[0][:120] + (f" {invent}" if invent else "")
        return {"p_short": short, "removed": [f"detail {j}" for j in range(k)]}
    if kind == "edit":
        return {"prompt": text.split(".")[0] + (f" {invent}" if invent else "")}
    return {"prompt": f"An enhanced, detailed version of: {text}"}


def captioning_test_module():
    """tests/captioning/conftest.py under a module name of its own: its ScriptedServer, completion()
    and the session fixtures tiny_vlm / vllm_server (the captioning tests' real CPU vLLM server)."""
    import importlib.util
    import sys

    name = "captioning_test_conftest"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "tests" / "captioning" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
