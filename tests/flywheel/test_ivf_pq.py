"""The engine's vector-index path on a real LanceDB table, for both index types (IVF_HNSW_SQ, the
default, and IVF_PQ): with `index.ivf_min_rows` lowered, a few thousand planted clustered vectors get
indices (parameters from `index_params`), nearest-neighbour recall against exact search stays high,
hybrid answers are the same one at a time, batched and from concurrent threads, a row added later with
merge_insert (the engine's write) is found before and after the index is refreshed, and switching
`index.vector_index` rebuilds the index as the new type."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from common.typed_config import ConfigError
from flywheel.config import IndexConfig, load_config
from flywheel.index import INDEX_TYPES, TABLE, VECTORS, PoolIndex, _maintain_indices, index_params
from flywheel.schema import pool_index_schema
from flywheel.store import connect, open_table, upsert

DIM, N, CLUSTERS = 64, 3000, 30


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _rows(ids: list[str], v: np.ndarray) -> pa.Table:
    schema = pool_index_schema(DIM)
    m = len(ids)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), DIM)
    return pa.table({"id": ids, "pool": ["main"] * m, "pool_version": pa.array([1] * m, pa.int64()),
                     "stage": ["stage1"] * m, "keep": [True] * m, "reject_reason": pa.nulls(m, pa.string()),
                     "kind": ["image"] * m, "base_id": pa.nulls(m, pa.string()),
                     "text": [f"planted vector {i}" for i in ids], "categories": [["planted"]] * m,
                     "text_vector": fixed, "image_vector": fixed, "has_image_vector": [True] * m,
                     "text_hash": ids, "indexed_at": pa.array([0] * m, pa.timestamp("us", tz="UTC"))},
                    schema=schema)


CONFIGS = {  # small-table parameters of each index type, and what index_params must derive
    "IVF_PQ": (IndexConfig(vector_index="IVF_PQ", ivf_min_rows=1000, rows_per_partition=500, sub_vector_dim=8,
                           nprobes=4, refine_candidates=100), {"num_partitions": 6, "num_sub_vectors": 8}),
    "IVF_HNSW_SQ": (IndexConfig(vector_index="IVF_HNSW_SQ", ivf_min_rows=1000, hnsw_rows_per_partition=1000,
                                hnsw_nprobes=2), {"num_partitions": 3, "m": 20, "ef_construction": 150}),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_vector_index_recall_and_merge_insert(tmp_path, kind):
    rng = np.random.default_rng(0)
    centres = _unit(rng.normal(size=(CLUSTERS, DIM)))
    low_rank = rng.normal(size=(8, DIM)).astype(np.float32) / np.sqrt(DIM)  # clustered, anisotropic
    data = _unit(centres[rng.integers(0, CLUSTERS, N)] + rng.normal(size=(N, 8)).astype(np.float32) @ low_rank * 2
                 + rng.normal(scale=0.05, size=(N, DIM)))
    cfg, params = CONFIGS[kind]
    db = connect(str(tmp_path / "fw.lancedb"))
    tbl = open_table(db, TABLE, pool_index_schema(DIM))
    upsert(tbl, _rows([f"r{i}" for i in range(N)], data), compare=("text_hash",), key="id")
    assert _maintain_indices(tbl, cfg, tbl.count_rows(), changed=True).startswith(f"{kind} ({params['num_partitions']} partitions")
    built = {i.columns[0]: i for i in tbl.list_indices()}
    assert all(built[c].index_type == INDEX_TYPES[kind] and built[c].num_indexed_rows == N for c in VECTORS), built
    assert index_params(N, DIM, cfg) == params

    queries = _unit(data[rng.integers(0, N, 50)] + rng.normal(scale=0.05, size=(50, DIM)))
    truth = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    idx = PoolIndex(db, cfg)
    got = [idx.nearest(q, 10, columns=("id",)) for q in queries]
    recall = np.mean([len({int(x[1:]) for x in g["id"].to_pylist()} & set(t.tolist())) / 10
                      for g, t in zip(got, truth, strict=True)])
    assert recall >= 0.9, recall
    for g, q in zip(got[:5], queries, strict=False):  # nearest's similarity is the exact cosine, best first
        assert np.allclose(g["similarity"].to_numpy(), data[[int(x[1:]) for x in g["id"].to_pylist()]] @ q, atol=1e-5)

    # hybrid (IVF_PQ leg + BM25 leg, RRF): the batched call answers exactly what single calls do; the
    # row whose caption names the query's word is an fts_match; a filter applies to both legs
    texts = [f"planted vector r{i}" for i in (5, 17, 2999)]
    single = [idx.hybrid(t, q, 10) for t, q in zip(texts, queries[:3], strict=True)]
    many = idx.hybrid_many(texts, queries[:3], 10)
    assert [m.to_pylist() for m in many] == [s.to_pylist() for s in single]
    with ThreadPoolExecutor(3) as ex:  # a server's concurrent queries on one PoolIndex
        assert [h.to_pylist() for h in ex.map(lambda j: idx.hybrid(texts[j], queries[j], 10), range(3))] == \
            [s.to_pylist() for s in single]
    for t, h, q in zip(texts, single, queries[:3], strict=True):
        assert h.num_rows == 10 and t.split()[-1] in h.filter(h["fts_match"])["id"].to_pylist(), h.to_pylist()
        vec = h["id"].to_pylist()
        assert np.allclose(h["similarity"].to_numpy(), data[[int(x[1:]) for x in vec]] @ q, atol=1e-5)
        assert (np.diff(h["_relevance_score"].to_numpy()) <= 0).all()
    odd = idx.hybrid(texts[0], queries[0], 10, where="id LIKE '%1'")
    assert odd.num_rows == 10 and all(x.endswith("1") for x in odd["id"].to_pylist()), odd.to_pylist()

    # a row merged in after the build: searched flat beside the index, then folded in by optimize
    new = _unit(rng.normal(size=(1, DIM)))
    assert upsert(tbl, _rows(["added"], new), compare=("text_hash",), key="id") == 1
    for refresh in (False, True):
        if refresh:
            _maintain_indices(tbl, cfg, tbl.count_rows(), changed=True)
        idx = PoolIndex(db, cfg)
        hit = idx.nearest(new[0], 3)
        assert hit["id"][0].as_py() == "added" and hit["similarity"][0].as_py() > 0.99, hit.to_pylist()
        assert idx.images(new[0], 1)["id"].to_pylist() == ["added"]


def test_vector_index_type_switch_and_config(tmp_path):
    """Changing `index.vector_index` rebuilds the built index as the new type on the next refresh;
    an unknown type stops at load naming the field."""
    rng = np.random.default_rng(1)
    data = _unit(rng.normal(size=(1200, DIM)))
    db = connect(str(tmp_path / "fw.lancedb"))
    tbl = open_table(db, TABLE, pool_index_schema(DIM))
    upsert(tbl, _rows([f"r{i}" for i in range(len(data))], data), compare=("text_hash",), key="id")
    for kind in ("IVF_PQ", "IVF_HNSW_SQ"):
        _maintain_indices(tbl, CONFIGS[kind][0], tbl.count_rows(), changed=False)
        assert {i.columns[0]: i.index_type for i in tbl.list_indices()} == \
            {"text": "FTS", **{c: INDEX_TYPES[kind] for c in VECTORS}}
    hit = PoolIndex(db, CONFIGS["IVF_PQ"][0]).nearest(data[7], 1)  # the built type wins over the config's
    assert hit["id"].to_pylist() == ["r7"] and hit["similarity"][0].as_py() > 0.999
    with pytest.raises(ConfigError, match="index.vector_index"):
        load_config(overrides={"workdir": str(tmp_path), "index.vector_index": "IVF_FLAT"})
