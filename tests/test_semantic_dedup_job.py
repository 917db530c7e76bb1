"""``vlp dedup semantic`` on Ray Data: the view it writes keeps exactly the rows the single-process
rule keeps (``dedup_cluster`` over the same embeddings and scores), its ledger names each dropped
row's kept twin, and a view as input restricts it to the view's rows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlp.curation.semantic_dedup import SemanticDedupConfig, dedup_cluster
from vlp.data.schema import IMAGE_TEXT_SCHEMA, SCHEMA_VERSION
from vlp.data.shards import ShardFolder
from vlp.data.storage import Storage
from vlp.scoring.select import Selection, select_rows, write_view
from vlp.scoring.sidecar import MANIFEST, scores_folder, sidecar_schema

pytestmark = pytest.mark.ray
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def scored(tmp_path):
    """Three shards whose stored embeddings hold 20 groups of near-copies (cosine > 0.97) among 40
    distinct rows, spread over the shards, with scores; returns the folder and the rows in order."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(60, 32)).astype(np.float32)
    emb, owners = [], []
    for i in range(60):
        copies = 1 + (3 if i < 20 else 0)
        for _ in range(copies):
            emb.append(base[i] + 0.03 * rng.normal(size=32).astype(np.float32))
            owners.append(i)
    order = rng.permutation(len(emb))
    emb = np.asarray(emb)[order]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    owners = np.asarray(owners)[order]
    scores = rng.uniform(0.1, 0.5, len(emb)).astype(np.float32)
    folder = tmp_path / "curated"
    out = tmp_path / "curated" / "_scores" / "clip"
    out.mkdir(parents=True)
    shards, start = [], 0
    for s, n in enumerate((50, 30, len(emb) - 80)):
        rows = [{"key": f"k{start + i:03d}", "caption": "x", "lang": ["en", "zh"][(start + i) % 2],
                 "image": b"", "image_format": "jpeg", "width": 8, "height": 8, "orig_width": 8,
                 "orig_height": 8, "sha256": "0" * 64, "phash": 0, "source": "s"} for i in range(n)]
        name = f"shard-{s:06d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_TEXT_SCHEMA), folder / name)
        pq.write_table(pa.table({"key": [r["key"] for r in rows],
                                 "clip_score": pa.array(scores[start:start + n], pa.float32()),
                                 "image_embedding": pa.array(emb[start:start + n].astype(np.float16).tolist(),
                                                             pa.list_(pa.float16())),
                                 "text_embedding": pa.array(emb[start:start + n].astype(np.float16).tolist(),
                                                            pa.list_(pa.float16()))},
                                schema=sidecar_schema(True)), out / name)
        shards.append({"name": name, "rows": n, "bytes": 0})
        start += n
    (folder / "_manifest.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "status": "complete", "kind": "image-text",
         "num_rows": len(emb), "shards": shards}))
    sha = ShardFolder.open(str(folder)).manifest_sha256
    (out / MANIFEST).write_text(json.dumps({"status": "complete", "shards_manifest_sha256": sha,
                                            "settings": {"embeddings": True}, "model": {"path": "m"}}))
    keys = np.array([f"k{i:03d}" for i in range(len(emb))])
    stored = emb.astype(np.float16).astype(np.float32)
    return str(folder), keys, stored, scores, owners


def test_the_job_keeps_what_the_single_process_rule_keeps(scored, tmp_path):
    from pipelines.semantic_dedup_job import run_semantic_dedup

    folder, keys, emb, scores, owners = scored
    config = SemanticDedupConfig(threshold=0.9, clusters=1)
    stats = run_semantic_dedup(folder, "clip", str(tmp_path / "view"), config, stream=io.StringIO())
    reference = dedup_cluster(emb, scores, keys, 0.9)
    kept = set(ShardFolder.open(str(tmp_path / "view")).read_column("key"))
    assert kept == set(keys[reference.kept])
    assert len(kept) == 60 and stats["dropped"] == 60  # one survivor per group of near-copies
    assert {owners[np.flatnonzero(keys == k)[0]] for k in kept} == set(range(60))
    ledger = pq.read_table(tmp_path / "view" / "_drops" / "semantic.parquet").to_pylist()
    for row in ledger:
        i, j = np.flatnonzero(keys == row["key"])[0], np.flatnonzero(keys == row["duplicate_of"])[0]
        assert row["reason"] == "duplicate_semantic" and owners[i] == owners[j]
        cosine = emb[i] @ emb[j] / np.linalg.norm(emb[i]) / np.linalg.norm(emb[j])
        assert row["similarity"] == pytest.approx(float(cosine), abs=1e-5)
        assert row["duplicate_of"] in kept and scores[j] >= scores[i]

    # auto clusters: no group split across clusters here, so the same survivors' owners
    auto = run_semantic_dedup(folder, "clip", str(tmp_path / "auto"), SemanticDedupConfig(threshold=0.9),
                              stream=io.StringIO())
    assert auto["clusters"] > 1 and auto["rows_kept"] == 60


def test_a_view_as_input_limits_dedup_to_its_rows(scored, tmp_path):
    from pipelines.semantic_dedup_job import run_semantic_dedup

    folder, keys, emb, scores, owners = scored
    f = ShardFolder.open(folder)
    selection = Selection(where=("lang == 'zh'",))
    write_view(f, select_rows(f, selection, Storage()), selection, str(tmp_path / "zh"), Storage())
    run_semantic_dedup(str(tmp_path / "zh"), "clip", str(tmp_path / "out"),
                       SemanticDedupConfig(threshold=0.9, clusters=1), stream=io.StringIO())
    zh = np.arange(len(keys)) % 2 == 1
    reference = dedup_cluster(emb[zh], scores[zh], keys[zh], 0.9)
    kept = set(ShardFolder.open(str(tmp_path / "out")).read_column("key"))
    assert kept == set(keys[zh][reference.kept])
    view = json.load(open(tmp_path / "out" / "_view.json"))
    assert view["source"] == folder and view["dedup"]["input"] == str(tmp_path / "zh")


def test_the_command_refuses_scores_without_embeddings_in_one_line(scored, tmp_path):
    folder, *_ = scored
    manifest = os.path.join(scores_folder(folder, "clip"), MANIFEST)
    data = json.load(open(manifest))
    data["settings"]["embeddings"] = False
    json.dump(data, open(manifest, "w"))
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "dedup", "semantic", "--shards", folder,
                           "--scores", "clip", "--output", str(tmp_path / "v")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "embeddings=true" in done.stderr and "Traceback" not in done.stderr
