"""Signals in: one schema for eval results, bad cases and feedback; malformed records become rejected
rows with a reason; the same case twice is one case; reruns write nothing."""

from __future__ import annotations

import base64
import json

import lance
import pyarrow as pa
import pyarrow.parquet as pq

from captioning.testing import jpeg, synthetic_image
from flywheel.config import SignalSource
from flywheel.signals import ingest
from flywheel.store import connect, open_table, read


def _write_jsonl(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


def test_three_sources_rejects_and_stable_ids(tmp_path):
    img = jpeg(synthetic_image(1, (64, 48)))
    (tmp_path / "bad.jpg").write_bytes(img)
    good = [
        {"source": "eval", "prompt": "a red bus", "benchmark": "geneval", "metric": "score", "score": 0.2,
         "checkpoint": "c1"},
        {"source": "bad_case", "prompt": "a zebra crossing", "complaint": "no stripes", "generated_image": "bad.jpg",
         "user": "u1"},
        {"source": "feedback", "prompt": "make it blue", "task": "ti2i", "rating": 1,
         "source_image": "data:image/jpeg;base64," + base64.b64encode(img).decode()},
    ]
    _write_jsonl(tmp_path / "night1.jsonl", good + [
        good[0],                                            # same case again in the same file
        "{not json",                                        # unparsable
        {"source": "eval", "prompt": "x", "metric": "score", "score": "high"},  # wrong type
        {"source": "feedback", "prompt": "y"},              # neither rating nor complaint
        {"source": "bad_case", "prompt": "z", "generated_image": "missing.png"},
        {"source": "alien", "prompt": "w"},
        [1, 2, 3],
    ])
    pq.write_table(pa.Table.from_pylist([{"prompt": "a red bus", "benchmark": "geneval", "metric": "score",
                                          "score": 0.2, "checkpoint": "c1"},    # = good[0] from another file
                                         {"prompt": "", "metric": "score", "score": 0.9}]),
                   tmp_path / "evals.parquet")
    lance.write_dataset(pa.Table.from_pylist([{"prompt": "ugly hands", "rating": 2.0, "generated_image": img}]),
                        str(tmp_path / "fb.lance"))
    sources = {"night": SignalSource(path=str(tmp_path / "*.jsonl"), source="bad_case"),
               "evals": SignalSource(path=str(tmp_path / "evals.parquet"), source="eval"),
               "fb": SignalSource(path=str(tmp_path / "fb.lance"), source="feedback"),
               "none": SignalSource(path=str(tmp_path / "nothing/*.jsonl"))}
    db = connect(str(tmp_path / "fw"))
    s = ingest(db, sources)
    assert (s.files, s.new_cases, s.duplicates, s.rejected) == (3, 4, 2, 7), s.text()
    cases = read(open_table(db, "cases")).to_pylist()
    by_prompt = {c["prompt"]: c for c in cases}
    assert by_prompt["a zebra crossing"]["source"] == "bad_case"
    assert json.loads(by_prompt["a zebra crossing"]["extra"]) == {"user": "u1"}
    assert by_prompt["ugly hands"]["source"] == "feedback"
    blobs = dict(open_table(db, "cases").to_lance().read_blobs(
        "generated_image", ids=open_table(db, "cases").to_lance().to_table(
            columns=["case_id"], filter="prompt = 'a zebra crossing'", with_row_id=True)["_rowid"].to_pylist()))
    assert list(blobs.values()) == [img]
    rejects = {r["origin"].rsplit("/", 1)[1]: r["reason"] for r in read(open_table(db, "signal_rejects")).to_pylist()}
    assert rejects["night1.jsonl#5"].startswith("not JSON")
    assert rejects["night1.jsonl#6"].startswith("score:")
    assert "rating or a complaint" in rejects["night1.jsonl#7"]
    assert rejects["night1.jsonl#8"] == "generated_image: no such image file: missing.png"
    assert rejects["night1.jsonl#9"].startswith("source:")
    assert rejects["night1.jsonl#10"].startswith("record: expected a JSON object")
    assert rejects["evals.parquet#1"].startswith("prompt:")

    versions = {n: open_table(db, n).version for n in ("cases", "signal_rejects")}
    again = ingest(db, sources)
    assert (again.new_cases, again.new_rejects, again.duplicates) == (0, 0, 6)
    assert {n: open_table(db, n).version for n in versions} == versions


def test_empty_and_unreadable_files_are_a_quiet_night(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    db = connect(str(tmp_path / "fw"))
    s = ingest(db, {"a": SignalSource(path=str(tmp_path / "empty.jsonl")),
                    "b": SignalSource(path=str(tmp_path / "broken.parquet"))})
    assert (s.files, s.records, s.new_cases) == (2, 1, 0)
    (row,) = read(open_table(db, "signal_rejects")).to_pylist()
    assert row["reason"].startswith("cannot read file:")
