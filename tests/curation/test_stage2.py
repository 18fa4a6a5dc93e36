"""Stage-2 edit pairs through the job on pairs made from real photos (scikit-image / scikit-learn):
every pair filter's decision, the reason naming the image, one row per pair, --rethreshold,
missing columns, kill + rerun (resume) with nothing lost or duplicated."""

from __future__ import annotations

import dataclasses
import shutil

import lance
import pyarrow.parquet as pq
import pytest

from common.typed_config import ConfigError
from curation.readers import make_id
from curation.stage2 import load_pair_config, main, run_pair_stage, write_sample_pairs

SKIP = ("source_nsfw", "target_nsfw", "direction")  # NudeNet is stage 1's; the tiny CLIP is random


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s2")
    want = write_sample_pairs(str(tmp / "pairs.parquet"))
    # Of the two duplicate pairs (same source, same instruction), the smaller id survives.
    a, b = sorted(("dup_a", "dup_b"), key=lambda k: make_id(str(tmp / "pairs.parquet"), k))
    want[a], want[b] = None, "pair_dedup"
    return tmp, tmp / "pairs.parquet", want


@pytest.fixture(scope="module")
def scored(ray_local, pairs_file, models):
    tmp, path, want = pairs_file
    cfg = load_pair_config(None, {"scoring.tokenizer": models["tokenizer"], "batch_size": 8, "source": "edit:photos"})
    out = tmp / "s2.lance"
    summary = run_pair_stage(str(path), str(out), cfg, SKIP, commit_every=8, progress=False)
    return cfg, out, summary


def _rows(out):
    return {r["uri"].rsplit("#", 1)[1]: r for r in lance.dataset(str(out)).to_table(
        columns=["uri", "id", "keep", "reject_reason", "error", "dup_of", "source", "ssim", "phash_distance",
                 "instruction_language", "skipped"]).to_pylist()}


def test_pair_filters_on_real_photo_pairs(scored, pairs_file):
    cfg, out, summary = scored
    _, path, want = pairs_file
    rows = _rows(out)
    assert summary.rows == len(rows) == len(want) == pq.read_metadata(path).num_rows  # one row per pair
    for key, why in want.items():
        r = rows[key]
        assert r["reject_reason"] == why, (key, r)
        assert r["keep"] == (why is None) and r["source"] == "edit:photos"
        assert r["id"] == make_id(str(path), key) and set(r["skipped"]) == set(SKIP)
    assert rows["broken_target"]["error"].startswith("target: ")  # the reason names the image
    assert "truncated" in rows["broken_target"]["error"]  # cut mid-scan: caught by the draft decode too
    kept, dup = sorted((rows["dup_a"], rows["dup_b"]), key=lambda r: r["id"])
    assert dup["dup_of"] == kept["id"] and kept["dup_of"] is None
    assert rows["chinese_instruction"]["instruction_language"] == "zh"
    assert (out.parent / "s2.lance.report.html").stat().st_size > 10_000


def test_rethreshold_and_missing_columns(scored, pairs_file, tmp_path, capsys):
    cfg, out, _ = scored
    tmp, path, want = pairs_file
    # Stricter no-op rule from stored scores only: the sepia edits of grey-ish photos stay kept,
    # the local edits (small changed area) now count as no-ops.
    assert main(["--output", str(out), "--rethreshold", "--no-report", "--set", "thresholds.noop.max_changed=0.5",
                 "--set", "thresholds.noop.min_ssim=0.5", "--set", "thresholds.noop.max_phash=64"]) == 0
    rows = _rows(out)
    assert all(rows[k]["reject_reason"] == "noop" for k in want if "_local_" in k)
    assert main(["--output", str(out), "--rethreshold", "--no-report"]) == 0
    assert {k: r["reject_reason"] for k, r in rows.items()} != {k: r["reject_reason"] for k, r in _rows(out).items()}
    assert all(_rows(out)[k]["reject_reason"] == w for k, w in want.items())
    # a pair file without a target image column stops before any work, naming it
    pq.write_table(pq.read_table(path).drop(["target_image"]), tmp_path / "bad.parquet")
    assert main(["--pairs", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "x.lance")]) == 2
    assert "the target image" in capsys.readouterr().err and not (tmp_path / "x.lance").exists()
    with pytest.raises(ConfigError, match="thresholds.noop.min_ssim"):
        load_pair_config(None, {"thresholds.noop.min_ssim": 3})


def test_resume_after_partial_commit_loses_and_duplicates_nothing(scored, pairs_file, models):
    """A run killed after some commits is a table holding a prefix of the rows: emulate it by
    deleting rows of a finished table (uncommitted fragments are orphans Lance ignores), rerun."""
    cfg, out, _ = scored
    tmp, path, want = pairs_file
    part = tmp / "part.lance"
    shutil.copytree(out, part)
    ds = lance.dataset(str(part))
    first = sorted(r["id"] for r in _rows(out).values())[:10]
    ds.delete("id NOT IN (" + ",".join(f"'{i}'" for i in first) + ")")
    assert lance.dataset(str(part)).count_rows() == 10
    summary = run_pair_stage(str(path), str(part), cfg, SKIP, commit_every=8, progress=False, report=False)
    assert summary.scored_now == len(want) - 10
    ids = lance.dataset(str(part)).to_table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(want)
    assert {k: r["reject_reason"] for k, r in _rows(part).items()} == {k: r["reject_reason"] for k, r in _rows(out).items()}


def test_model_filters_run_on_an_actor_pool(ray_local, pairs_file, models, tmp_path):
    """With a model loaded (here the tiny random CLIP: direction and the image-image cosine) the
    work units go to an actor pool instead of tasks: same rows, CLIP scores where both images decode."""
    _, path, want = pairs_file
    cfg = load_pair_config(None, {"scoring.clip.model": models["clip_model"], "scoring.clip.weights": models["clip_weights"],
                                  "scoring.clip.model_config": models["clip_config"], "batch_size": 8,
                                  "thresholds.direction.min_similarity": -1.0, "thresholds.unrelated.min_clip": 1.1})
    out = tmp_path / "clip.lance"
    summary = run_pair_stage(str(path), str(out), cfg, ("source_nsfw", "target_nsfw", "instruction"), progress=False,
                             report=False)
    rows = {r["uri"].rsplit("#", 1)[1]: r for r in lance.dataset(str(out)).to_table(
        columns=["uri", "error", "clip_cosine", "directional_similarity", "reject_reason", "source_caption"]).to_pylist()}
    assert summary.rows == len(rows) == len(want)
    for key, r in rows.items():
        assert (r["clip_cosine"] is None) == (r["error"] is not None), key
        if r["error"] is None and r["source_caption"] and "_noop_" not in key:
            assert r["directional_similarity"] is not None, key
        if want[key] in ("noop", "unrelated", "broken", "source_resolution", "pair_dedup"):
            assert r["reject_reason"] == want[key], key


def _scripted_server_module():
    """tests/captioning/conftest.py (the project's scripted OpenAI-compatible server), loaded under
    its own name: conftest modules of several test folders share the name ``conftest``."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "captioning" / "conftest.py"
    spec = importlib.util.spec_from_file_location("captioning_test_servers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_judge_retries_pauses_through_an_outage_and_records_failures():
    """The judge goes through the captioning client: a 503 with Retry-After is retried, an invalid
    answer is asked again and then recorded, an outage pauses the batch (breaker) until the server
    is back, a server gone past patience_s is recorded per row; nothing raises."""
    import json
    import threading
    import time

    from PIL import Image

    from curation.stage2 import JudgeScoring
    from curation.stage2_judge import judge_pairs, parse

    T = _scripted_server_module()
    im = Image.new("RGB", (64, 48), (200, 10, 10))
    seen: dict[str, int] = {}

    def answer(body):
        text = body["messages"][-1]["content"][-1]["text"].split("\n")[1]  # the instruction line
        n = seen[text] = seen.get(text, 0) + 1
        if "busy" in text and n == 1:
            return 503, {"error": "overloaded"}, {"Retry-After": "0"}
        if "garbled" in text:
            return 200, T.completion('{"instruction_following": 70, "consistency": 9}')
        return 200, T.completion(json.dumps({"instruction_following": 7, "consistency": 9}))

    cfg = JudgeScoring(url="", timeout_s=5.0, backoff_s=0.05, patience_s=20.0, max_attempts=3)
    ins = ["add a ball (busy)", "add a ball (garbled)", "add a hat"]
    with T.ScriptedServer(answer) as server:
        got = judge_pairs(dataclasses.replace(cfg, url=server.url), ["a", "b", "c"], [im] * 3, [im] * 3, ins)
        assert seen["add a ball (busy)"] == 2 and seen["add a ball (garbled)"] == 3  # retried / re-asked
        assert got[0] == (7.0, 9.0, None) and got[2] == (7.0, 9.0, None)
        assert got[1][:2] == (None, None) and got[1][2].startswith("schema after 3 attempts")
        # the stage's judge filter writes those scores into the batch's score columns
        from curation.filters import FILTERS
        from curation.stage2_filters import PairBatch
        from curation.stage2_schema import PAIR_SCORING_SCHEMA

        out = {f.name: [None] * 3 for f in PAIR_SCORING_SCHEMA}
        out.update(id=["p0", "p1", "p2"], instruction_en=["add a hat", None, "add a ball (garbled)"],
                   instruction_zh=[None, "加一顶帽子", None])
        pcfg = load_pair_config(None, {"scoring.judge.url": server.url, "scoring.judge.backoff_s": 0.05})
        FILTERS["judge"].score(PairBatch(out, [0, 1, 2], [im] * 3, [im] * 3, {}, pcfg, {}))
        assert out["judge_instruction"] == [7.0, 7.0, None] and out["judge_consistency"][:2] == [9.0, 9.0]
        assert out["judge_error"][:2] == [None, None] and out["judge_error"][2].startswith("schema")
        port = server.httpd.server_address[1]
    # an outage: the server comes back on the same port 1 s later; the requests wait, none fails
    back = T.ScriptedServer(answer, port=port)
    timer = threading.Timer(1.0, back.thread.start)
    timer.start()
    t = time.monotonic()
    try:
        got = judge_pairs(dataclasses.replace(cfg, url=f"http://127.0.0.1:{port}/v1"), ["d", "e"], [im] * 2, [im] * 2,
                          ["add a hat", "add a cat"])
    finally:
        timer.join()
        back.stop()
    assert got == [(7.0, 9.0, None)] * 2 and time.monotonic() - t >= 0.9
    # gone for good (longer than patience_s): every pair's judge_error says so, nothing raises
    got = judge_pairs(dataclasses.replace(cfg, url=f"http://127.0.0.1:{port}/v1", patience_s=0.5), ["f"], [im], [im],
                      ["add a hat"])
    assert got[0][:2] == (None, None) and got[0][2].startswith("server_gone")
    assert parse('{"instruction_following": 7, "consistency": 9}') == (7.0, 9.0)
    with pytest.raises(ValueError):
        parse('{"instruction_following": 70, "consistency": 9}')


def test_fast_ssim_equals_scikit_image_on_real_photo_pairs():
    from skimage.metrics import structural_similarity

    from curation import pairs
    from curation.samples import real_photos

    photos = [(n, im.resize((320, 240))) for n, im in real_photos()][:4]
    for kind, edit, src, tgt in list(pairs.calibration_pairs(photos, seed=2))[::5]:
        size = pairs._common_size(src, tgt, pairs.SSIM_SIZE)
        want = structural_similarity(pairs._grey(src, size), pairs._grey(tgt, size), data_range=255.0)
        assert pairs.ssim(src, tgt) == pytest.approx(want, abs=1e-5), (kind, edit)  # float32 box sums
        assert pairs.structure_scores(src, tgt) == (pairs.phash_distance(src, tgt), pairs.ssim(src, tgt),
                                                    pairs.changed_fraction(src, tgt))
