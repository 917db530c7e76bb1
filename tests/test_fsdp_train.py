"""``vlp train`` with ``scaling.strategy: fsdp`` end to end on a real local Ray: the one training loop
with sharded weights, asynchronous sharded checkpoints that Ray Train merges and persists, their times
in MLflow, evaluation of the sharded model, and the final checkpoint evaluated by ``vlp eval``'s loader
in this plain process.

One tiny run (1-layer towers, 4 steps): the gloo tests (test_fsdp.py, test_distributed_checkpoint.py)
check the numbers, resuming and resharding included (with the same ``restore_checkpoint`` the loop
calls); this file checks the wiring into Ray Train.
"""

from __future__ import annotations

import os

import pytest

from vlp.config import load_config
from vlp.curation.config import CurationConfig
from vlp.train.config import TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BATCH = 8


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory):
    """120 curated pairs in 3 shards (the last held out) with a tokenizer, and a classification set."""
    from pipelines.image_text import run_image_curation
    from vlp.data.synthetic import (
        generate_classification_set,
        generate_image_text_samples,
    )
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer_for_shards

    root = tmp_path_factory.mktemp("fsdp-train-data")
    samples = generate_image_text_samples(str(root / "raw"), 120, seed=5, broken=False)
    curated = str(root / "curated")
    run_image_curation(samples.manifest, curated, load_config(
        CurationConfig, None, ["output.shard_rows=40", "image.size=64",
                               "execution.progress_interval_s=30"]))
    train_tokenizer_for_shards(curated, TokenizerConfig(vocab_size=400))
    generate_classification_set(str(root / "classes"), per_class=2, size=64)
    return {"curated": curated, "classes": str(root / "classes")}


def _config(tmp_path, shards, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"data.train={shards['curated']}", "data.holdout_shards=1",
        f"data.classification={shards['classes']}", f"data.batch_size={BATCH}",
        "data.shuffle_buffer=0", f"output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false",
        "model.image_size=32", "model.embed_dim=32",
        "model.image.options={num_hidden_layers: 1}", "model.text.options={num_hidden_layers: 1}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.strategy=fsdp",
        "schedule.log_every=1", "schedule.checkpoint_every=2", "optim.warmup_steps=1",
        "run_name=sharded", *overrides])


def test_a_sharded_run_checkpoints_asynchronously_and_evaluates(tmp_path, shards):
    from mlflow import MlflowClient

    from pipelines.train_job import run_training
    from vlp.api import evaluate_checkpoint
    from vlp.train.checkpoint import checkpoint_format

    first = run_training(_config(tmp_path, shards, "schedule.max_steps=4"))
    assert first.steps == 4
    folder = first.checkpoint  # the final one: every rank's shards merged by Ray Train
    assert checkpoint_format(folder) == "dcp"
    assert sorted(f for f in os.listdir(os.path.join(folder, "sharded")) if f.endswith(".distcp")) \
        == ["__0_0.distcp", "__1_0.distcp"]
    assert not os.path.exists(os.path.join(folder, "model.pt"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(first.mlflow_run_id)
    assert run.data.params["scaling.strategy"] == "fsdp"
    # an asynchronous checkpoint at step 2, the final one at step 4: what each blocked, what it took
    blocked = client.get_metric_history(first.mlflow_run_id, "checkpoint/blocked_s")
    total = client.get_metric_history(first.mlflow_run_id, "checkpoint/total_s")
    assert {m.step for m in blocked} == {m.step for m in total} == {2, 4}
    assert all(m.value >= 0 for m in blocked + total)
    assert {"checkpoints/final/checkpoint.json", "checkpoints/final/state.json"} <= {
        a.path for a in client.list_artifacts(first.mlflow_run_id, "checkpoints/final")}
    # the final evaluation (rank 0's gathered copy of the sharded model) is what the checkpoint,
    # consolidated in this process, evaluates to
    again = evaluate_checkpoint(folder, classification=shards["classes"])
    for key in ("zeroshot_en/top1", "zeroshot_zh/top1"):
        assert again[key] == pytest.approx(first.metrics[key], abs=1e-6), key

    losses = client.get_metric_history(first.mlflow_run_id, "loss/total")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
