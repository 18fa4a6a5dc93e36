"""The nightly job end to end on the test pool: routes, queue, a review, the mixture with lineage,
the HTML report; a second run writes nothing; an empty signal file is a quiet night; a bad config
exits 2 naming the field; a run killed mid-way and rerun ends as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import flywheel_nightly
import pyarrow as pa
from fwtest import ROOT, flywheel_config, fresh_workdir

from flywheel.config import load_config
from flywheel.nightly import run_nightly, versions
from flywheel.schema import REVIEWS
from flywheel.store import connect, open_table, read, upsert

SIGNALS = [
    {"source": "bad_case", "prompt": "a zebra standing by the water", "category": "zebra"},
    {"source": "bad_case", "prompt": "a red bus crossing a long bridge in the city", "complaint": "two drivers"},
    {"source": "feedback", "prompt": "bus thing", "rating": 1},
]


def _config(tmp_path, pool, tiny_models, built, signals):
    sig = tmp_path / "signals.jsonl"
    sig.write_text("".join(json.dumps(r) + "\n" for r in signals))
    return flywheel_config(tmp_path, pool, tiny_models, workdir=fresh_workdir(built, tmp_path),
                           signals={"s": {"path": str(sig)}}, report=str(tmp_path / "report.html"))


def _state(db):
    return {n: sorted(map(str, read(db.open_table(n)).to_pylist()))
            for n in ("cases", "routes", "queue", "preferences", "prompt_rewrites", "mixture")}


def test_nightly_idempotent_review_merge_and_report(tmp_path, pool, tiny_models, built, capsys):
    path = _config(tmp_path, pool, tiny_models, built, SIGNALS)
    assert flywheel_nightly.main(["--config", str(path), "--quiet"]) == 0
    cfg = load_config(path)
    db = connect(cfg.workdir)
    routes = {r["track"] for r in read(open_table(db, "routes")).to_pylist()}
    assert routes == {"pretrain", "prompt", "rl"}  # no LLM configured: the prompt rules decide
    queue = read(open_table(db, "queue")).to_pylist()
    assert {q["pool_id"] for q in queue} == set(pool["ids"]["zebra"] + [pool["balance_id"]])
    first = versions(db)
    assert flywheel_nightly.main(["--config", str(path), "--quiet"]) == 0
    assert versions(db) == first
    assert "nothing changed" in capsys.readouterr().out

    # a reviewer approves one item and rejects another -> the next night merges the approval
    now = datetime.now(UTC)
    upsert(open_table(db, "reviews"), pa.Table.from_pylist(
        [dict(item_id=queue[0]["item_id"], decision="approve", reviewer="ann", reviewed_at=now),
         dict(item_id=queue[1]["item_id"], decision="reject", reviewer="ann", reviewed_at=now)], schema=REVIEWS))
    s = run_nightly(cfg, step_log=lambda _: None)
    assert set(s.changed) == {"mixture"}  # (and the runs row that records it)
    (m,) = read(open_table(db, "mixture")).to_pylist()
    assert (m["item_id"], m["pool_id"], m["reviewer"], m["pool_uri"]) == \
        (queue[0]["item_id"], queue[0]["pool_id"], "ann", pool["curated"])
    assert m["case_id"] == queue[0]["case_id"] and m["pool_version"] == 1
    report = (tmp_path / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 3 and "What changed since the last run" in report


def test_empty_signals_quiet_night_and_bad_config(tmp_path, pool, tiny_models, built, capsys):
    path = _config(tmp_path, pool, tiny_models, built, [])
    db = connect(load_config(path).workdir)
    assert flywheel_nightly.main(["--config", str(path), "--quiet"]) == 0  # creates the empty tables
    before = versions(db)
    assert read(open_table(db, "cases")).num_rows == 0 and read(open_table(db, "routes")).num_rows == 0
    assert flywheel_nightly.main(["--config", str(path), "--quiet"]) == 0
    assert versions(db) == before and "quiet night" in capsys.readouterr().out
    assert flywheel_nightly.main(["--config", str(path), "--set", "attribution.scarce_rato=0.3"]) == 2
    assert "attribution.scarce_rato: unknown field (did you mean 'attribution.scarce_ratio'?)" in capsys.readouterr().err
    assert flywheel_nightly.main(["--config", str(path), "--set", "pools.main.curated=/nonexistent.lance"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: flywheel nightly failed:") and "\n" not in err


def test_killed_run_reruns_to_the_uninterrupted_result(tmp_path, pool, tiny_models, built):
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "kill"
    ref_dir.mkdir(), kill_dir.mkdir()
    ref = load_config(_config(ref_dir, pool, tiny_models, built, SIGNALS))
    run_nightly(ref, step_log=lambda _: None)
    path = _config(kill_dir, pool, tiny_models, built, SIGNALS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "jobs" / "flywheel_nightly.py"), "--config", str(path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill it right after attribution committed its routes
        if line.startswith("[") and "attribution:" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    db = connect(load_config(path).workdir)
    assert open_table(db, "routes").count_rows() == 3 and open_table(db, "queue").count_rows() == 0
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    strip = lambda rows: [{k: v for k, v in json.loads(json.dumps(r, default=str)).items()  # noqa: E731
                           if not k.endswith("_at")} for r in rows]
    got, want = connect(load_config(path).workdir), connect(ref.workdir)
    for n in ("cases", "routes", "queue", "preferences", "prompt_rewrites"):
        key = {"cases": "case_id", "queue": "item_id"}.get(n, "case_id")
        a = sorted(strip(read(got.open_table(n)).to_pylist()), key=lambda r: r[key])
        b = sorted(strip(read(want.open_table(n)).to_pylist()), key=lambda r: r[key])
        for r in a + b:
            r.pop("origin", None), r.pop("index_version", None)
        assert a == b, n
    time.sleep(0)
