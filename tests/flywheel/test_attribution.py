"""Attribution on a pool with a plentiful and a scarce concept, the project's scripted
OpenAI-compatible server as the LLM judge and prompt generaliser: the scarce failure routes to
pre-training with the right neighbours, the vague one to the prompt track, the clear one to RL; the
server down leaves judge steps pending, retried on the next run; a rerun writes nothing."""

from __future__ import annotations

import json
import re

from fwtest import captioning_test_servers, flywheel_config, fresh_workdir

from flywheel.attribution import attribute
from flywheel.config import load_config
from flywheel.index import TextEmbedder
from flywheel.llm import LLM
from flywheel.signals import ingest
from flywheel.store import connect, open_table, read
from flywheel.tracks import preferences, pretrain, prompt_cases

T = captioning_test_servers()
VARIANTS = ["A zebra in the snow", "a zebra in the snow!", "A zebra standing by the water", "zebra foal at dawn",
            "a herd of zebras at a river", "zebra, watercolour"]


def answer(body):
    text = body["messages"][-1]["content"]
    kind = T.kind_of(body)
    if kind == "judge":
        vague = "too_short" in re.search(r"Rule checks that fired: (.*)", text).group(1)
        verdict = {"verdict": "under_specified" if vague else "clear", "reason": "few words" if vague else "plain"}
        return 200, T.completion(json.dumps(verdict))
    bound = body["response_format"]["json_schema"]["schema"]["properties"]["variants"]["maxItems"]
    return 200, T.completion(json.dumps({"variants": VARIANTS[:bound]}))  # as structured output would


def run_night(cfg, db, emb):
    llm = LLM(cfg.llm, cfg.pretrain.max_variants)
    a = attribute(cfg, db, emb, llm)
    return a, pretrain(cfg, db, emb, llm), preferences(db), prompt_cases(db)


def versions(db):
    return {n: open_table(db, n).version for n in ("routes", "queue", "preferences", "prompt_rewrites")}


def test_routes_tracks_pending_and_rerun(tmp_path, pool, tiny_models, built):
    img = b"\xff\xd8 not really a jpeg, stored verbatim"
    sig = tmp_path / "signals.jsonl"
    sig.write_text("\n".join(json.dumps(r) for r in [
        {"source": "bad_case", "prompt": "a zebra standing by the water", "category": "zebra", "complaint": "stripes wrong"},
        {"source": "bad_case", "prompt": "a red bus crossing a long bridge in the city", "complaint": "two drivers",
         "generated_image": "data:image/jpeg;base64,/9ggbm90IHJlYWxseSBhIGpwZWcsIHN0b3JlZCB2ZXJiYXRpbQ=="},
        {"source": "feedback", "prompt": "bus thing", "rating": 1},
        {"source": "eval", "prompt": "a red bus", "metric": "score", "score": 0.9},  # passes: not routed
    ]) + "\n")
    with T.ScriptedServer(answer) as server:
        url = server.url
    # the server is stopped now: the first night runs with the LLM down
    path = flywheel_config(tmp_path, pool, tiny_models, workdir=fresh_workdir(built, tmp_path),
                           signals={"s": {"path": str(sig)}},
                           llm={"server": url, "model": T.SERVED, "max_attempts": 1, "backoff_s": 0.0},
                           pretrain={"max_variants": 3})
    cfg = load_config(path)
    db = connect(cfg.workdir)
    emb = TextEmbedder(cfg.index.clip)
    assert ingest(db, cfg.signals).new_cases == 4
    a, p, _, _ = run_night(cfg, db, emb)
    assert (a.failing, a.routed, a.pending) == (3, {"pretrain": 1}, 2), a.text()
    routes = {r["case_id"]: r for r in read(open_table(db, "routes")).to_pylist()}
    cases = {c["prompt"]: c["case_id"] for c in read(open_table(db, "cases"), ["case_id", "prompt"]).to_pylist()}
    zebra = routes[cases["a zebra standing by the water"]]
    assert zebra["track"] == "pretrain" and zebra["scarce"] and zebra["actions"] == "pending"
    assert zebra["category_count"] == 3 and zebra["typical_category_count"] >= 2
    assert zebra["density"] == 3 and zebra["typical_density"] > 4 * zebra["density"], zebra["reason"]
    assert sorted(zebra["neighbour_ids"][:3]) == sorted(pool["ids"]["zebra"] + [pool["balance_id"]])
    pending = routes[cases["bus thing"]]
    assert pending["status"] == "pending" and "llm server" in pending["judge_error"]
    queue = read(open_table(db, "queue")).to_pylist()
    # retrieval ran without the LLM: the zebra rows, including the one rejected only by balancing
    assert sorted(q["pool_id"] for q in queue) == sorted(pool["ids"]["zebra"] + [pool["balance_id"]])
    assert {q["reject_reason"] for q in queue} == {None, "balance"} and p.pending_cases == 1

    with T.ScriptedServer(answer) as server:
        cfg = load_config(path, {"llm.server": server.url})
        a, p, prefs, prompts = run_night(cfg, db, emb)
        assert (a.considered, a.routed, a.pending) == (2, {"prompt": 1, "rl": 1}, 0), a.text()
        assert (p.variants, p.pending_cases, prefs, prompts) == (3, 0, 1, 1)
        routes = {r["case_id"]: r for r in read(open_table(db, "routes")).to_pylist()}
        assert routes[cases["bus thing"]]["track"] == "prompt"
        assert json.loads(routes[cases["bus thing"]]["judge_answer"])["verdict"] == "under_specified"
        assert any(f.startswith("vague_word:thing") for f in routes[cases["bus thing"]]["rule_flags"])
        rl = routes[cases["a red bus crossing a long bridge in the city"]]
        assert rl["track"] == "rl" and not rl["scarce"] and rl["density"] >= 20
        assert routes[cases["a zebra standing by the water"]]["actions"] == "done"
        variants = [q["text"] for q in read(open_table(db, "queue")).to_pylist() if q["kind"] == "prompt_variant"]
        assert variants == ["A zebra in the snow", "zebra foal at dawn", "a herd of zebras at a river"]
        (pref,) = read(open_table(db, "preferences")).to_pylist()
        assert pref["reason"] == "two drivers"
        ds = open_table(db, "preferences").to_lance()
        assert [b for _, b in ds.read_blobs("rejected_image", ids=[0])] == [img]
        assert read(open_table(db, "prompt_rewrites")).to_pylist()[0]["status"] == "awaiting_enhancer"

        before, n_requests = versions(db), len(server.requests)
        run_night(cfg, db, emb)  # nothing new: no request, no write
        assert versions(db) == before and len(server.requests) == n_requests
