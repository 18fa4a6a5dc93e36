"""Semantic dedup: planted near copies among clustered embeddings, the greedy survivor rule, and the
standalone job end to end on a Lance table in the curated schema (real Ray, real Lance)."""

from __future__ import annotations

import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from curation import semdedup
from curation.schema import EMBEDDING, scoring_schema

sys.path.insert(0, str(Path(__file__).parents[2] / "jobs"))
import semantic_dedup as job  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(n: int = 6000, n_copies: int = 300, d: int = 64, seed: int = 0):
    """Embeddings in 40 topical clusters (as real CLIP embeddings are) and ``n_copies`` near copies
    of random rows (cosine ~0.99 to their source; unrelated rows of a topic sit near 0.6)."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(40, d)))
    x = _unit(centres[rng.integers(0, 40, n)] + rng.normal(size=(n, d)) * 0.13)
    src = rng.choice(n, n_copies, replace=False)
    copies = _unit(x[src] + rng.normal(size=(n_copies, d)) * 0.012)
    return np.concatenate([x, copies]).astype(np.float16), src


def greedy_reference(e: np.ndarray, rank_pos: np.ndarray, threshold: float) -> np.ndarray:
    """The documented rule, written plainly (O(n^2)): in ranking order a row is absorbed by the
    first survivor it is near; returns the absorbing row or -1."""
    order = np.argsort(rank_pos)
    survivors: list[int] = []
    by = np.full(len(e), -1)
    for i in order:
        near = [s for s in survivors if float(e[i] @ e[s]) >= threshold]
        if near:
            by[i] = near[0]
        else:
            survivors.append(i)
    return by


def test_planted_copies_found_without_false_merges(ray_local):
    e, src = planted()
    n = len(e) - len(src)
    ids = np.array([f"img{i:05d}" for i in range(len(e))], dtype=object)
    r = semdedup.run(ids, e, [], eps=0.05)
    # ~6300 / 1000 final clusters, made in two levels (3 coarse clusters, each split again).
    assert 5 <= r.n_clusters <= 8 and set(np.unique(r.cluster)) == set(range(r.n_clusters))
    pair_found = ~r.keep[n:] | ~r.keep[src]
    assert pair_found.mean() >= 0.99
    rejected = np.flatnonzero(~r.keep)
    # Only copies or their sources are rejected, each pointing at its own partner, which is kept.
    planted_pairs = {(ids[s], ids[n + j]) for j, s in enumerate(src)} | {(ids[n + j], ids[s]) for j, s in enumerate(src)}
    assert all((ids[i], r.semdup_of[i]) in planted_pairs for i in rejected)
    pos = {v: k for k, v in enumerate(ids)}
    assert all(r.keep[pos[r.semdup_of[i]]] for i in rejected)
    assert np.all(r.similarity[rejected] >= 0.95) and np.all(np.isnan(r.similarity[r.keep]))
    # The public function gives the same decisions.
    keep, of, sim = semdedup.semantic_dedup(ids, e, [], 0.05, None)
    assert np.array_equal(keep, r.keep) and list(of) == list(r.semdup_of)


def test_survivor_ranking_is_honoured(ray_local):
    rng = np.random.default_rng(3)
    base = _unit(rng.normal(size=(3, 32)))
    e = _unit(np.repeat(base, 3, axis=0) + rng.normal(size=(9, 32)) * 0.01)  # 3 groups of 3 copies
    ids = np.array(["g0a", "g0b", "g0c", "g1a", "g1b", "g1c", "g2a", "g2b", "g2c"], dtype=object)
    aesthetic = np.array([5.0, 6.5, 6.0, 6.0, 6.0, 6.0, 4.0, 4.0, np.nan])
    pixels = np.array([1e6, 1e6, 1e6, 1e6, 4e6, 4e6, 1e6, 1e6, 9e6])
    keep, of, sim = semdedup.semantic_dedup(ids, e, [aesthetic, pixels, ids], 0.05, None)
    # Group 0: best aesthetic wins. Group 1: tie -> more pixels; tie again -> smaller id.
    # Group 2: a missing aesthetic ranks last whatever its size; tie -> smaller id.
    assert list(ids[keep]) == ["g0b", "g1b", "g2a"]
    assert list(of[~keep]) == ["g0b", "g0b", "g1b", "g1b", "g2a", "g2a"]
    assert np.all(sim[~keep] > 0.99)


def test_greedy_rule_matches_the_plain_reference_across_blocks(monkeypatch):
    rng = np.random.default_rng(7)
    # Chains on a circle in 2-D, plus random 16-D rows with many near pairs: a survivor absorbs
    # its neighbours, a row near only an absorbed row stays.
    ang = np.radians([0, 15, 30, 100, 110, 120, 130])
    chain = np.stack([np.cos(ang), np.sin(ang)], 1)
    by = semdedup.dedup_cluster(chain.astype(np.float32), 1 - 0.05)[0]
    assert list(by) == [-1, 0, -1, -1, 3, -1, 5]  # 30 deg is 15 from an absorbed row only: kept
    x = _unit(rng.normal(size=(60, 16)))
    e = _unit(np.concatenate([x, x[rng.integers(0, 60, 140)] + rng.normal(size=(140, 16)) * 0.08])).astype(np.float32)
    rank = rng.permutation(len(e))
    ref = greedy_reference(e, rank, 0.97)
    order = np.argsort(rank)
    for block in (1024, 7):  # one block, and many blocks (survivors carried between blocks)
        monkeypatch.setattr(semdedup, "_BLOCK", block)
        got = semdedup.dedup_cluster(e[order], 0.97)[0]
        mapped = np.where(got >= 0, order[np.maximum(got, 0)], -1)
        assert np.array_equal(mapped, ref[order]), block


def test_missing_embeddings_are_kept_and_bad_input_is_refused(ray_local):
    e, _ = planted(200, 20, 16)
    e[[3, 50]] = np.nan
    ids = np.array([str(i) for i in range(len(e))], dtype=object)
    r = semdedup.run(ids, e, [], 0.05)
    assert r.keep[[3, 50]].all() and (r.cluster[[3, 50]] == -1).all() and (r.cluster[r.cluster >= 0] == 0).all()
    with pytest.raises(ValueError, match="eps"):
        semdedup.run(ids, e, [], 1.0)
    with pytest.raises(ValueError, match="shape"):
        semdedup.run(ids[:5], e, [], 0.05)


# --------------------------------------------------------------------------- the job
def curated_table(path: Path, e: np.ndarray, null_rows=()) -> None:
    """A table in the curated schema (curation.schema: what the stage that runs CLIP writes)."""
    n, d = e.shape
    schema = scoring_schema(d)
    rng = np.random.default_rng(1)
    mask = np.zeros(n, bool)
    mask[list(null_rows)] = True
    emb = pa.FixedSizeListArray.from_arrays(pa.array(e.astype(np.float16).ravel()), d, mask=pa.array(mask))
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols |= {"id": pa.array([f"row{i:05d}" for i in range(n)]), EMBEDDING: emb,
             "width": pa.array(rng.integers(512, 2048, n), pa.int32()),
             "height": pa.array(rng.integers(512, 2048, n), pa.int32()),
             "aesthetic": pa.array(rng.uniform(3, 8, n), pa.float32())}
    lance.write_dataset(pa.table(cols, schema=schema), str(path))


def test_job_end_to_end_and_rerun_is_idempotent(ray_local, tmp_path, capsys):
    e, src = planted(3000, 100, 32)
    n = 3000
    inp, out = tmp_path / "stage4.lance", tmp_path / "semdup.lance"
    curated_table(inp, e, null_rows=[7])
    argv = ["--input", str(inp), "--output", str(out), "--embedding-column", EMBEDDING, "--no-progress"]
    assert job.main(argv) == 0
    ds = lance.dataset(str(out))
    t = ds.to_table().sort_by("id")
    assert t.num_rows == len(e) and len(set(t.column("id").to_pylist())) == len(e)
    keep = t.column("keep").to_numpy(zero_copy_only=False)
    ids = t.column("id").to_pylist()
    assert keep[7] and t.column("semdup_cluster")[7].as_py() is None  # no embedding: kept
    found = ~keep[n:] | ~keep[src]
    assert found.mean() >= 0.99
    # The survivor of each planted pair is the one with the higher aesthetic score.
    aes = dict(zip(*lance.dataset(str(inp)).to_table(columns=["id", "aesthetic"]).to_pydict().values(), strict=True))
    for i in np.flatnonzero(~keep):
        assert aes[t.column("semdup_of")[i].as_py()] >= aes[ids[i]]
    assert set(t.column("reject_reason").drop_null().to_pylist()) == {"semdup"}
    assert t.column("input_version").unique().to_pylist() == [lance.dataset(str(inp)).version]
    assert t.column("input_uri").unique().to_pylist() == [str(inp)]
    first = capsys.readouterr().out
    assert "rejected as semdup" in first
    # Rerun: same input version and config -> the table is left as it is.
    assert job.main(argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert lance.dataset(str(out)).version == ds.version
    # Another eps: recomputed and rewritten in one commit, still one row per id.
    assert job.main(argv + ["--eps", "0.2"]) == 0
    t2 = lance.dataset(str(out)).to_table()
    assert t2.num_rows == len(e) and len(t2.column("id").unique()) == len(e)
    assert len(t2.column("config_hash").unique()) == 1 and t2.column("config_hash")[0] != t.column("config_hash")[0]


def test_job_bad_arguments_name_the_flag(tmp_path, capsys):
    e, _ = planted(50, 5, 8)
    inp = tmp_path / "in.lance"
    curated_table(inp, e)
    out = str(tmp_path / "o.lance")
    cases = [
        (["--input", str(inp), "--output", out, "--embedding-column", "nope"], "--embedding-column: no column 'nope'"),
        (["--input", str(inp), "--output", out, "--eps", "1.5"], "--eps: must be in [0, 1)"),
        (["--input", str(tmp_path / "missing.lance"), "--output", out], "--input: no Lance table"),
        (["--input", str(inp), "--output", out, "--set", "dedup.epz=0.1"], "dedup.epz: unknown field"),
        (["--input", str(inp), "--output", out, "--embedding-column", "width"], "must be a fixed-size list"),
        (["--input", str(inp), "--output", out, "--filter", "nonsense = = 3"], "filter: cannot apply"),
    ]
    for argv, msg in cases:
        assert job.main(argv + ["--no-progress"]) == 2
        assert msg in capsys.readouterr().err, msg
    assert not Path(out).exists()  # nothing written by a refused run
