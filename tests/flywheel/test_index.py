"""The retrieval engine over a pool written with the producers' schema modules: hybrid search finds
a concept's rows (rows rejected only by balance included), a refresh with nothing new writes nothing,
a changed caption is re-embedded."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
from fwtest import flywheel_config, fresh_workdir

from flywheel.config import load_config
from flywheel.index import TABLE, PoolIndex, TextEmbedder, build_index
from flywheel.store import connect


def test_build_search_refresh(tmp_path, pool, tiny_models, built):
    n = len(pool["ids"]["bus"]) + len(pool["ids"]["zebra"]) + 1  # + the row rejected only by balance
    s = built["summary"]
    assert (s.pool_rows, s.embedded, s.total, s.vector_index) == (n, n, n, "exact"), s.text()
    cfg = load_config(flywheel_config(tmp_path, pool, tiny_models, workdir=fresh_workdir(built, tmp_path)))
    db = connect(cfg.workdir)
    idx = PoolIndex(db, cfg.index)
    q = "zebra on the grass"
    hits = idx.hybrid(q, TextEmbedder(cfg.index.clip).embed([q])[0], k=10)
    matched = hits.filter(hits["fts_match"])["id"].to_pylist()
    assert sorted(matched) == sorted(pool["ids"]["zebra"] + [pool["balance_id"]])
    assert idx.category_counts()["bus"] == len(pool["ids"]["bus"])
    if pool["embed_dim"]:
        img = idx.images(TextEmbedder(cfg.index.clip).embed([q])[0], k=5)
        assert img.num_rows == 5 and (np.diff(img["similarity"].to_numpy()) <= 1e-6).all()
    stored = db.open_table(TABLE).to_lance().to_table(columns=["text_vector"], filter=f"id = '{matched[0]}'")
    assert abs(np.linalg.norm(stored["text_vector"][0].values.to_numpy()) - 1) < 1e-4

    version = db.open_table(TABLE).version
    again = build_index(cfg, db)
    assert (again.embedded, again.deleted) == (0, 0) and db.open_table(TABLE).version == version

    # a caption changes upstream -> only that row is re-embedded; then restore it
    cap = lance.dataset(pool["captions"])
    zid = pool["ids"]["zebra"][0]
    row = cap.to_table(filter=f"id = '{zid}'")
    col = cap.schema.get_field_index("caption_knowledge")
    old = row["caption_knowledge"][0].as_py()
    try:
        cap.merge_insert("id").when_matched_update_all().execute(
            row.set_column(col, "caption_knowledge", pa.array([old.replace("zebra", "okapi")])))
        assert build_index(cfg, db).embedded == 1
        assert "okapi" in PoolIndex(db, cfg.index).category_counts()
    finally:
        lance.dataset(pool["captions"]).merge_insert("id").when_matched_update_all().execute(
            row.set_column(col, "caption_knowledge", pa.array([old])))
