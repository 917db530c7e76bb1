"""Learned curation end to end, the README's worked example: the quickstart's model scores a new,
held-out generated set in which half the captions were swapped with another sample's (same language);
``clip_score`` must tell matched from swapped pairs in English and in Chinese, ``vlp select`` at a
threshold keeps the matched pairs and drops the swapped ones, and ``vlp train`` trains on the view,
logging it (and its parent) to MLflow. A killed scoring run resumed gives the same sidecars."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vlp(*args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a matched pair scores above a swapped one), ties counting half: the Mann-Whitney form."""
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.fixture(scope="module")
def held_out(quickstart_run, tmp_path_factory):
    """300 new generated pairs (another seed), captions of half of them swapped within their
    language, curated like the quickstart's; returns (curated folder, swapped keys, langs by key)."""
    from vlp.data.synthetic import generate_image_text_samples

    workdir, done, _ = quickstart_run
    assert done.returncode == 0, done.stderr[-2000:]
    root = tmp_path_factory.mktemp("held_out")
    samples = generate_image_text_samples(str(root / "raw"), 300, seed=123, broken=False,
                                          varied_formats=False)
    rows = [json.loads(line) for line in open(samples.manifest)]
    rng = random.Random(5)
    swapped = set()
    for lang_is_zh in (False, True):
        group = [r for r in rows if any("\u4e00" <= ch <= "\u9fff" for ch in r["caption"]) == lang_is_zh]
        chosen = rng.sample(group, len(group) // 2)
        captions = [r["caption"] for r in chosen]
        for r, caption in zip(chosen, captions[1:] + captions[:1]):  # each gets the next one's
            if caption != r["caption"]:
                r["caption"] = caption
                swapped.add(r["key"])
    with open(samples.manifest, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    curated = str(root / "curated")
    # Ray's own temp dir, short: its socket paths must fit the 107-byte limit of Unix sockets
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="vlplc-", dir="/tmp"))
    cur = _vlp("curate", "images", "--input", samples.manifest, "--output", curated,
               "--set", "output.shard_rows=100", "--set", "image.size=128", env=env)
    assert cur.returncode == 0, cur.stderr[-3000:]
    yield curated, swapped, env
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_clip_score_separates_swapped_captions_and_select_keeps_the_matched(quickstart_run, held_out,
                                                                             tmp_path):
    workdir, _, checkpoint = quickstart_run
    curated, swapped, env = held_out
    scored = _vlp("score", "--shards", curated, "--model", checkpoint, "--name", "qs", env=env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "pairs scored" in scored.stderr
    folder = os.path.join(curated, "_scores", "qs")
    manifest = json.load(open(os.path.join(folder, "_manifest.json")))
    assert manifest["status"] == "complete" and manifest["model"]["kind"] == "checkpoint"
    stats = json.load(open(os.path.join(folder, "_stats.json")))
    assert stats["failed"] == 0 and set(stats["clip_score"]) == {"en", "zh", "all"}
    assert os.path.getsize(os.path.join(folder, "clip_score_hist.png")) > 1000

    keys, scores, langs = [], [], []
    for name in sorted(f for f in os.listdir(curated) if f.startswith("shard-")):
        shard = pq.read_table(os.path.join(curated, name), columns=["key", "lang"])
        sidecar = pq.read_table(os.path.join(folder, name))
        assert sidecar.column("key").to_pylist() == shard.column("key").to_pylist()  # row for row
        keys += shard.column("key").to_pylist()
        langs += shard.column("lang").to_pylist()
        scores += sidecar.column("clip_score").to_pylist()
    keys, scores, langs = np.array(keys), np.array(scores, dtype=np.float64), np.array(langs)
    is_swapped = np.isin(keys, sorted(swapped))
    for lang in ("en", "zh"):
        here = langs == lang
        auc = _auc(scores[here & ~is_swapped], scores[here & is_swapped])
        print(f"clip_score AUC matched vs swapped, {lang}: {auc:.3f}")
        assert auc >= 0.9, (lang, auc)

    # A threshold that keeps 90% of the matched pairs, printed for the README's worked example.
    threshold = float(np.floor(np.quantile(scores[~is_swapped], 0.1) * 1000) / 1000)
    print(f"threshold: scores.qs.clip_score >= {threshold}")
    view = str(tmp_path / "view")
    selected = _vlp("select", "--shards", curated, "--output", view,
                    "--where", f"scores.qs.clip_score >= {threshold}", env=env)
    assert selected.returncode == 0, selected.stderr[-2000:]
    from vlp.data.shards import ShardFolder

    kept = {k for k in ShardFolder.open(view).read_column("key")}
    matched_kept = len(kept - swapped) / int((~is_swapped).sum())
    swapped_kept = len(kept & swapped) / len(swapped)
    print(f"kept {100 * matched_kept:.0f}% of matched, {100 * swapped_kept:.0f}% of swapped")
    assert matched_kept >= 0.9 and swapped_kept <= 0.2

    # vlp train on the view: reads only its rows, logs it and its parent to MLflow
    mlflow_db = tmp_path / "mlflow.db"
    train = _vlp("train", "--config", os.path.join(REPO, "ray_configs", "train_quickstart.yaml"),
                 "--set", f"data.train={view}", "--set", f"data.tokenizer={workdir}/curated/_tokenizer",
                 "--set", "data.holdout_shards=0", "--set", "data.classification=",
                 "--set", "schedule.max_steps=2", "--set", "schedule.epochs=1",
                 "--set", f"output_dir={tmp_path / 'runs'}", "--set", "run_name=on-view",
                 "--set", f"tracking.tracking_uri=sqlite:///{mlflow_db}", env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    assert f"{len(kept):,} image-text training pairs" in train.stdout
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{mlflow_db}")
    (run,) = client.search_runs([client.get_experiment_by_name("vlp").experiment_id])
    (dataset_input,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags["view"] == "true" and tags["rows"] == str(len(kept)) and tags["parent"] == curated


def test_a_killed_scoring_run_resumes_to_the_same_sidecars(quickstart_run, held_out, tmp_path):
    """Score twice: once straight through, once killed mid-run and resumed (the sidecars finished
    before the kill stay, the rest are scored again): the same bytes of scores either way."""
    from tests.conftest import stop_process

    _, _, checkpoint = quickstart_run
    curated, _, env = held_out
    straight = _vlp("score", "--shards", curated, "--model", checkpoint, "--name", "straight",
                    "--set", "batch_size=16", "--set", "embeddings=true", env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cmd = [sys.executable, "-m", "pipelines.cli", "score", "--shards", curated, "--model", checkpoint,
           "--name", "killed", "--set", "batch_size=16", "--set", "embeddings=true"]
    parts = os.path.join(curated, "_scores", "killed", "_parts")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        import time

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(parts) and any(files for _, _, files in os.walk(parts)):
                break
            time.sleep(0.2)
    finally:
        stop_process(proc)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 2 and "--resume" in again.stderr  # never appends by accident
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in sorted(f for f in os.listdir(curated) if f.startswith("shard-")):
        a = pq.read_table(os.path.join(curated, "_scores", "straight", name))
        b = pq.read_table(os.path.join(curated, "_scores", "killed", name))
        assert a.equals(b), name
    assert not any(files for _, _, files in os.walk(parts))  # parts are gone once sidecars exist
