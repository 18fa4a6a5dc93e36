import base64
import json
import re

import pytest

from captioning.config import PACKAGE_DIR, ConfigError
from captioning.prompts import KINDS, ROUTE, InvalidResponse, PromptSet
from captioning.routing import caption_types, route_columns

V1_VALID = {
    "route": {"has_text": True, "is_structured": True, "has_known_entities": False},
    "general": {
        "en": {"short": "A red bus on a wet street.",
               "medium": "A red double-decker bus drives along a wet city street at night under orange lamps.",
               "dense": "A red double-decker bus fills the centre of the frame, driving left to right along a "
                        "wet asphalt street at night; orange street lamps reflect in puddles, a sign reading "
                        "\"OPEN 24 HOURS\" glows above a shop on the right, shot at eye level."},
        "zh": {"short": "湿漉漉街道上的红色公交车。",
               "medium": "夜晚，一辆红色双层公交车行驶在潮湿的城市街道上，橙色路灯照亮了路面。",
               "dense": "一辆红色双层公交车位于画面中央，在夜晚潮湿的沥青街道上从左向右行驶；橙色路灯倒映在水洼中，"
                        "右侧商店上方的招牌写着\"OPEN 24 HOURS\"，平视拍摄。"},
    },
    "text": {"layout": "poster",
             "blocks": [{"text": "SUMMER SALE", "position": "top", "role": "title"},
                        {"text": "50% OFF\nall items", "position": "center", "role": "body"}],
             "en": "A poster titled \"SUMMER SALE\" with \"50% OFF\" and \"all items\" in the centre.",
             "zh": "一张海报，标题为\"SUMMER SALE\"，中间写着\"50% OFF\"和\"all items\"。"},
    "knowledge": {"entities": [{"name": "Eiffel Tower", "type": "landmark", "confidence": "high"}],
                  "en": "The Eiffel Tower in Paris, a wrought-iron lattice tower completed in 1889.",
                  "zh": "巴黎的埃菲尔铁塔，一座于1889年建成的锻铁格构塔。"},
    "structured": {"kind": "flowchart",
                   "entities": [{"id": "a", "label": "Start", "attributes": {"shape": "oval"}},
                                {"id": "b", "label": "Check input", "attributes": {"shape": "diamond"}}],
                   "relations": [{"source": "a", "target": "b", "type": "flows_to", "label": ""}],
                   "en": "A flowchart that goes from \"Start\" to a decision \"Check input\".",
                   "zh": "一个流程图，从\"Start\"到判断节点\"Check input\"。"},
}


@pytest.fixture(scope="module")
def v1():
    return PromptSet.load(PACKAGE_DIR, "v1")


def test_v1_prompt_set_embeds_each_schema_in_its_prompt(v1):
    shorter = {sub for subs in v1.shorter.values() for sub in subs}  # general's short+medium, dense alone
    assert v1.shorter == {"general": ("general.short-medium", "general.dense")}
    assert set(v1.prompts) == set(KINDS) | shorter == set(v1.schemas)
    for kind in (*KINDS, *shorter):
        assert json.dumps(v1.schemas[kind], ensure_ascii=False) in v1.prompts[kind]
        assert "{schema}" not in v1.prompts[kind]
    assert "Chinese" in v1.system[""] and "English" in v1.system[""]


@pytest.mark.parametrize("kind", KINDS)
def test_v1_schema_accepts_a_complete_bilingual_answer(v1, kind):
    text = json.dumps(V1_VALID[kind], ensure_ascii=False)
    assert v1.validate(kind, text) == V1_VALID[kind]


@pytest.mark.parametrize("kind", ["general", "text", "knowledge", "structured"])
def test_v1_caption_types_require_both_languages(v1, kind):
    answer = json.loads(json.dumps(V1_VALID[kind]))
    answer.pop("zh")
    with pytest.raises(InvalidResponse) as e:
        v1.validate(kind, json.dumps(answer))
    assert e.value.kind == "schema" and "zh" in e.value.detail


def test_validate_classifies_invalid_answers(v1):
    with pytest.raises(InvalidResponse) as e:  # a raw control character inside a string
        v1.validate("route", '{"has_text": "\x1f"}')
    assert e.value.kind == "invalid_json"
    with pytest.raises(InvalidResponse) as e:
        v1.validate("route", '{"has_text": true, "is_structured": false}')
    assert e.value.kind == "schema"
    too_long = json.loads(json.dumps(V1_VALID["general"]))
    too_long["en"]["short"] = "x" * 301
    with pytest.raises(InvalidResponse) as e:
        v1.validate("general", json.dumps(too_long))
    assert e.value.kind == "schema" and "en/short" in e.value.detail


def test_messages_carry_the_image_and_the_instruction(v1):
    msgs = v1.messages("text", b"\xff\xd8jpeg-bytes")
    assert msgs[0]["role"] == "system"
    image, text = msgs[1]["content"]
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == b"\xff\xd8jpeg-bytes"
    assert text["text"] == v1.prompts["text"]
    fmt = v1.response_format("text")
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == v1.schemas["text"]


def test_unknown_prompt_version_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="prompt_version"):
        PromptSet.load(PACKAGE_DIR, "v999")
    (tmp_path / "prompts" / "x").mkdir(parents=True)
    (tmp_path / "schemas" / "x").mkdir(parents=True)
    with pytest.raises(ConfigError, match="lacks"):
        PromptSet.load(tmp_path, "x")


def test_routing_always_writes_general_and_follows_the_answer():
    assert caption_types({"has_text": False, "is_structured": False, "has_known_entities": False}) == ["general"]
    assert caption_types({"has_text": True, "is_structured": True, "has_known_entities": True}) == [
        "general", "text", "knowledge", "structured"]
    assert route_columns({"has_text": True, "is_structured": False, "has_known_entities": False}) == {
        "route_text": True, "route_structured": False, "route_knowledge": False}
    assert set(route_columns(None).values()) == {None}


def test_v2_asks_each_language_natively_and_merges_into_the_stored_shape():
    v2 = PromptSet.load(PACKAGE_DIR, "v2")
    cjk = re.compile(r"[\u4e00-\u9fff]")
    assert v2.parts[ROUTE] == (ROUTE,)
    assert cjk.search(v2.system["zh"]) and not cjk.search(v2.system[""])
    for kind in KINDS[1:]:
        assert v2.parts[kind] == (f"{kind}.en", f"{kind}.zh")
        # The Chinese request: a Chinese instruction whose answer holds only "zh" (nothing to translate from).
        assert cjk.search(v2.prompts[f"{kind}.zh"]) and set(v2.schemas[f"{kind}.zh"]["properties"]) == {"zh"}
        assert "zh" not in v2.schemas[f"{kind}.en"]["properties"]
        assert v2.messages(f"{kind}.zh", b"img", "image/png")[0]["content"] == v2.system["zh"]
        assert v2.messages(f"{kind}.en", b"img", "image/png")[1]["content"][0]["image_url"]["url"].startswith("data:image/png;")
        full = V1_VALID[kind]
        en = {k: v for k, v in full.items() if k != "zh"}
        text, value = v2.merge(kind, [json.dumps(en, ensure_ascii=False), json.dumps({"zh": full["zh"]}, ensure_ascii=False)])
        assert value == full and json.loads(text) == full
        with pytest.raises(InvalidResponse):
            v2.merge(kind, [json.dumps(en)])  # a part missing: the stored schema refuses it
