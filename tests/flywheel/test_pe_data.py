"""PE data job against the project's scripted OpenAI-compatible server (tests/captioning/conftest.py):
the semantic checks a random model cannot exercise: triplets and CoT, meaning-check rejects with the
reason, seeded strategy draws, edit summaries, the SFT export split, outages and resume."""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import threading
from pathlib import Path

import lance
import pytest

from captioning.testing import write_curated
from common.typed_config import ConfigError
from flywheel.pe_config import CATEGORIES, DIFFICULTIES, PEConfig, load
from flywheel.pe_data import draw, meaning_check, names_in
from flywheel.pe_export import split_of
from flywheel.pe_testing import (
    captioning_test_module,
    request_kind,
    request_text,
    scripted_answer,
    write_captions,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))
_cap = captioning_test_module()
ScriptedServer, completion, SERVED = _cap.ScriptedServer, _cap.completion, _cap.SERVED

import build_pe_data  # noqa: E402

SPEC = ["gen", "txt", "por", "all", "bad", "gen", "txt", "por", "gen", "all"]


@pytest.fixture
def captions(tmp_path) -> tuple[str, list[str]]:
    write_curated(tmp_path / "curated.lance", [True] * len(SPEC))
    uri = str(tmp_path / "captions.lance")
    return uri, write_captions(uri, tmp_path / "curated.lance", SPEC)


def answer(invent: dict[str, str] | None = None, fail: set[str] | None = None):
    """Scripted server behaviour: valid answers; `invent[text marker]` appends a phrase that is not in
    the annotation; requests whose annotation contains a `fail` marker get HTTP 500."""
    def respond(body):
        text = request_text(body)
        if fail and any(m in text for m in fail):
            return 500, {"error": "scripted failure"}
        extra = next((v for k, v in (invent or {}).items() if k in text), None)
        return 200, completion(json.dumps(scripted_answer(body, extra), ensure_ascii=False))
    return respond


def build(captions: str, output: str, server: str, *extra: str) -> int:
    return build_pe_data.main(["--captions", captions, "--output", output, "--server", server, "--model", SERVED,
                               "--no-progress", "--set", "client.backoff_s=0.01", *extra])


def rows_of(uri: str) -> dict[str, dict]:
    return {r["id"]: r for r in lance.dataset(uri).to_table().to_pylist()}


def test_triplets_cot_report_and_export(captions, tmp_path):
    uri, ids = captions
    out, sft = str(tmp_path / "pe.lance"), tmp_path / "sft"
    cfg = load(PEConfig, None, {"captions": uri, "output": out, "server": "http://x", "model": SERVED})
    with ScriptedServer(answer()) as server:
        assert build(uri, out, server.url, "--export", str(sft), "--set", "validation_fraction=0.3") == 0
    rows = rows_of(out)
    assert sorted(rows) == sorted(ids)
    for i, r in rows.items():
        what = SPEC[ids.index(i)]
        if what == "bad":  # a failed captions row: a row with the reason, never silently dropped
            assert (r["status"], r["error_kind"]) == ("failed", "no_caption")
            continue
        assert r["status"] == "ok", r["error"]
        # the scripted classifier: quoted text -> text, a woman -> portrait (only the en captions name her)
        expected = "text" if what in ("txt", "all") else "portrait" if what == "por" and r["language"] == "en" else "general"
        assert r["category"] == expected
        d = cfg.difficulty[r["difficulty"]]
        assert d.min_strategies <= len(r["strategies"]) <= d.max_strategies
        assert all(cfg.strategies[s].probability.get(r["category"], 0) > 0 for s in r["strategies"])
        assert (r["language"], r["difficulty"], tuple(r["strategies"])) == dataclasses.astuple(draw(cfg, i, r["category"]))
        # the CoT undoes the steps last-first: step j names the inverse of strategy k-j with its removed note
        steps = r["cot"].splitlines()
        for j, (s, removed) in enumerate(zip(r["strategies"][::-1], r["removed"][::-1], strict=True)):
            assert steps[j] == f"{j + 1}. {cfg.strategies[s].inverse[r['language']]} {removed}"
        assert r["p_short"] in r["p_fine"] and 0 < r["length_ratio"] <= 1
        kinds = {"gen": ["dense"], "por": ["dense", "knowledge"], "txt": ["dense", "text"],
                 "all": ["dense", "text", "knowledge", "structured"]}[what]
        assert r["caption_kinds"] == kinds
    assert {r["language"] for r in rows.values() if r["status"] == "ok"} == {"en", "zh"}

    report = Path(out + ".report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 and "length ratio" in report
    split = {f: [json.loads(x) for x in (sft / f"{f}.jsonl").read_text().splitlines()] for f in ("train", "validation")}
    ok_ids = sorted(i for i, r in rows.items() if r["status"] == "ok")
    assert sorted(e["id"] for f in split.values() for e in f) == ok_ids
    for name, records in split.items():
        for e in records:
            assert split_of(e["id"], 0.3) == name
            r = rows[e["id"]]
            system, user, assistant = e["messages"]
            assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
            assert user["content"] == r["p_short"]
            assert assistant["content"] == f"<think>\n{r['cot']}\n</think>\n\n{r['p_fine']}"


def test_meaning_check_rejects_with_reason(captions, tmp_path):
    uri, ids = captions
    out = str(tmp_path / "pe.lance")
    invent = {"cabin number 0 ": "near the Eiffel Tower", "cabin number 5 ": 'with a sign "FREE WIFI"'}
    with ScriptedServer(answer(invent)) as server:
        assert build(uri, out, server.url, "--set", "languages={en: 1.0}") == 0
        degrades = [request_text(b) for b in server.requests if request_kind(b).startswith("degrade")]
    rows = rows_of(out)
    r0, r5 = rows[ids[0]], rows[ids[5]]
    assert (r0["status"], r0["error_kind"]) == ("rejected", "meaning")
    assert "'Eiffel Tower' not in P_fine" in r0["error"]
    assert (r5["status"], r5["error_kind"]) == ("rejected", "meaning") and "'FREE WIFI'" in r5["error"]
    for marker in invent:  # one retry with a new seed, then rejected
        assert sum(marker in t for t in degrades) == 2
    assert all(r["status"] == "ok" for i, r in rows.items() if i not in (ids[0], ids[5]) and SPEC[ids.index(i)] != "bad")
    # a rerun keeps the decisions (rejected is final for this model and prompt version)
    with ScriptedServer(answer()) as server:
        assert build(uri, out, server.url) == 0
        assert not server.requests


def test_meaning_check_rules():
    fine = 'A photo of the Eiffel Tower at dusk; a banner reads "BONJOUR PARIS". 《静夜思》全文写在左上角。'
    assert meaning_check("The Eiffel Tower at night", fine) == []  # sentence-initial "The" is not a name
    assert meaning_check('banner "BONJOUR PARIS", Eiffel tower', fine) == []
    assert meaning_check("Sunset over the Eiffel Tower", fine) == []  # a sentence's first capital says nothing...
    assert meaning_check("A photo of Big Ben at dusk", fine) == ["name 'Big Ben' not in P_fine"]  # ...inside it does
    assert meaning_check('a banner reads "BONJOUR"', fine) == []  # a quoted part of the text is still verbatim
    assert meaning_check('a banner reads "HELLO PARIS"', fine) == ["quoted text 'HELLO PARIS' not in P_fine"]
    assert meaning_check("《静夜思》", fine) == [] and meaning_check("《春晓》的全文", fine) == ["name '春晓' not in P_fine"]
    assert names_in("Then we saw McDonald's and NASA.") == ["McDonald's", "NASA"]


def test_strategy_draws_are_seeded_and_follow_the_config(captions, tmp_path):
    cfg = load(PEConfig, None, {"captions": "c", "output": "o", "server": "http://x", "model": "m"})
    n = 3000
    draws = [draw(cfg, f"id{i}", CATEGORIES[i % 4]) for i in range(n)]
    assert draws == [draw(cfg, f"id{i}", CATEGORIES[i % 4]) for i in range(n)]  # same id, same draw
    other = dataclasses.replace(cfg, seed=1)
    assert sum(d != draw(other, f"id{i}", CATEGORIES[i % 4]) for i, d in enumerate(draws)) > n // 2
    share = collections.Counter(d.difficulty for d in draws)
    for name in DIFFICULTIES:  # the difficulty mix of the config, within sampling noise
        assert abs(share[name] / n - cfg.difficulty[name].share) < 0.04
    assert abs(sum(d.language == "en" for d in draws) / n - cfg.languages["en"]) < 0.04
    portrait = collections.Counter(s for i, d in enumerate(draws) if i % 4 == 1 for s in d.strategies)
    assert portrait["drop_appearance"] > portrait["keywords"] > 0 and portrait["drop_structure"] == 0

    # the job: two fresh runs of the same input draw the same everything
    uri, ids = captions
    with ScriptedServer(answer()) as server:
        for out in ("a.lance", "b.lance"):
            assert build(uri, str(tmp_path / out), server.url) == 0
    cols = ["id", "language", "difficulty", "strategies", "category", "p_short", "cot"]
    a, b = (lance.dataset(str(tmp_path / o)).to_table(columns=cols).sort_by("id") for o in ("a.lance", "b.lance"))
    assert a.equals(b)


def test_edit_annotations_become_concise_prompts(captions, tmp_path, capsys):
    """Edit pairs in the stage-2 pair table's schema (curation/pair_readers.py): instruction_en +
    target_caption make the annotation, summarised without random degradation."""
    import pyarrow as pa

    from curation.pair_readers import PAIR_ITEM_SCHEMA

    uri, ids = captions
    notes = {"e1": "Replace the red boat on the left with a yellow kayak. Keep the cabin, the lake and the light unchanged.",
             "e2": "Add the words \"GRAND OPENING\" on the sign. Keep everything else as it is.",
             "e3": "Turn the sky into a starry night. Keep the cabin."}
    target = "A wooden cabin beside a lake at night."
    pairs = [{"id": k, "instruction_en": v, "target_caption": target if k == "e1" else None} for k, v in notes.items()]
    edits = str(tmp_path / "pairs.lance")
    lance.write_dataset(pa.Table.from_pylist(pairs, schema=PAIR_ITEM_SCHEMA), edits)
    out = str(tmp_path / "pe.lance")
    with ScriptedServer(answer({"starry night": "over Mount Fuji"})) as server:
        assert build(uri, out, server.url, "--edits", edits) == 0
    rows = rows_of(out)
    assert len(rows) == len(ids) + 3
    e1, e2, e3 = (rows[f"edit:{k}"] for k in notes)
    assert e1["task"] == "edit" and e1["status"] == "ok" and e1["strategies"] == [] and e1["cot"] is None
    assert e1["p_fine"] == notes["e1"] + "\n\n" + target and e2["p_fine"] == notes["e2"]
    assert e1["p_short"] == "Replace the red boat on the left with a yellow kayak"
    assert e2["status"] == "ok" and '"GRAND OPENING"' in e2["p_short"]
    assert e3["status"] == "rejected" and "'Mount Fuji' not in P_fine" in e3["error"]
    jsonl = tmp_path / "edits.jsonl"
    jsonl.write_text(json.dumps({"pair": "x", "instruction_en": "Make it red."}) + "\n")
    assert build(uri, out, "http://127.0.0.1:9/v1", "--edits", str(jsonl)) == 2  # no column 'id': named, before work
    assert "edits_id_column" in capsys.readouterr().err


def test_failed_requests_and_outage_resume_without_loss(captions, tmp_path, capsys):
    uri, ids = captions
    out = str(tmp_path / "pe.lance")
    # HTTP 500 for two rows: they end failed with the reason after max_attempts, the rest ok
    with ScriptedServer(answer(fail={"cabin number 1 ", "cabin number 8 "})) as server:
        assert build(uri, out, server.url, "--set", "languages={en: 1.0}", "--set", "client.max_attempts=2") == 0
    rows = rows_of(out)
    assert {i for i, r in rows.items() if r["error_kind"] == "http_5xx"} == {ids[1], ids[8]}
    # the server goes away mid-run: finished rows are committed, exit 3; the rerun completes
    out2 = str(tmp_path / "pe2.lance")
    stop = threading.Event()

    def respond(body):
        if len(server.requests) > 8 and not stop.is_set():
            stop.set()
            threading.Thread(target=server.stop).start()
        return answer()(body)

    with ScriptedServer(respond) as server:
        code = build(uri, out2, server.url, "--commit-every", "2", "--concurrency", "1",
                     "--server-patience", "1", "--set", "client.backoff_max_s=0.2")
    assert code == 3 and "rerun the same command" in capsys.readouterr().err
    partial = rows_of(out2)
    assert 0 < len(partial) < len(ids)
    with ScriptedServer(answer()) as server:
        assert build(uri, out2, server.url, "--set", "client.max_attempts=2") == 0
        assert build(uri, out, server.url, "--set", "languages={en: 1.0}") == 0  # the failed rows are redone
    final = rows_of(out2)
    assert sorted(final) == sorted(ids) and lance.dataset(out2).count_rows() == len(ids)
    assert all(final[i]["created_at"] == r["created_at"] for i, r in partial.items() if r["status"] == "ok")
    assert all(r["status"] == "ok" for i, r in rows_of(out).items() if SPEC[ids.index(i)] != "bad")


def test_bad_config_names_the_field(tmp_path):
    base = {"captions": "c", "output": "o", "server": "http://x", "model": "m"}
    for overrides, field in [({"strategies.drop_color.probability.portrat": 0.1}, "strategies.drop_color.probability.portrat"),
                             ({"difficulty.light.share": 0.9}, "difficulty"),
                             ({"client.max_atempts": 2}, "client.max_atempts"),
                             ({"languages": {"fr": 1.0}}, "languages.fr")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load(PEConfig, None, base | overrides)
