"""Project jobs submitted to a two-node cluster with ``ray job submit --working-dir .`` (as the README
says): the job succeeds, every input has one output row, and the scoring tasks ran on both nodes —
read from Ray's state API, not from logs."""

from __future__ import annotations

import lance

from curation.readers import list_folder


def test_stage1_job_runs_on_both_nodes(cluster, sample_dir, sample_config, tmp_path):
    root, notes = sample_dir
    out = tmp_path / "stage1.lance"
    sub_id, r = cluster.submit("python", "jobs/filter_stage1.py", "--input", str(root), "--output", str(out),
                               "--config", str(sample_config), "--skip", "clip,nsfw", "--no-progress",
                               "--set", "batch_size=4", "--commit-every", "8")
    info = cluster.job(sub_id)
    assert r.returncode == 0 and info.status == "SUCCEEDED", r.stdout[-3000:] + r.stderr[-2000:] + cluster.logs()
    assert "report:" in r.stdout  # the summary and the report's place come back through the job's logs
    t = lance.dataset(str(out)).to_table(columns=["id", "uri", "keep"])
    assert t.num_rows == len(notes) == list_folder(str(root)).num_rows
    assert len(set(t.column("id").to_pylist())) == t.num_rows and t.column("keep").null_count == 0
    nodes = cluster.task_nodes(info.job_id, "score")
    assert set(nodes) == set(cluster.node_ids), (nodes, cluster.node_ids)


def _captioning_fixtures():
    """tests/captioning/conftest.py's scripted OpenAI-compatible server and tiny prompt set."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "captioning" / "conftest.py"
    spec = importlib.util.spec_from_file_location("captioning_test_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_caption_job_on_the_cluster(cluster, tmp_path):
    """jobs/caption.py against the captioning tests' scripted server: one captions row per kept
    curated row, every one ok."""
    from captioning.testing import write_curated

    cap = _captioning_fixtures()
    keep = [True, False, True, True, False, True]
    write_curated(tmp_path / "curated.lance", keep)
    out = tmp_path / "captions.lance"
    with cap.ScriptedServer(cap.valid) as srv:
        sub_id, r = cluster.submit("python", "jobs/caption.py", "--input", str(tmp_path / "curated.lance"),
                                   "--output", str(out), "--model", cap.SERVED, "--server", srv.url,
                                   "--prompt-root", cap.TINY_PROMPTS["prompt_root"], "--prompt-version",
                                   cap.TINY_PROMPTS["prompt_version"], "--ocr-engine", "none", "--no-progress")
    info = cluster.job(sub_id)
    assert r.returncode == 0 and info.status == "SUCCEEDED", r.stdout[-3000:] + r.stderr[-2000:]
    rows = lance.dataset(str(out)).to_table(columns=["id", "caption_status"]).to_pylist()
    assert sorted(x["id"] for x in rows) == [f"id{i:03d}" for i, k in enumerate(keep) if k]
    assert {x["caption_status"] for x in rows} == {"ok"}
