"""Training on Ray Train, end to end on a real local Ray: the MLflow record, resuming by run name,
recovery from a killed worker, a changed world size, the non-finite-loss guard, S3 shards, vlp eval.

The runs are tiny (a 1-layer ViT and BERT, a few dozen steps) so the file stays within minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from vlp.config import load_config
from vlp.curation.config import CurationConfig
from vlp.train.config import TrainConfig

pytestmark = pytest.mark.ray

BATCH = 8
EMBED = 32


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory):
    """~240 curated pairs in 6 shards with a tokenizer beside them, plus a classification folder."""
    from pipelines.image_text import run_image_curation
    from vlp.data.synthetic import generate_classification_set, generate_image_text_samples
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer_for_shards

    root = tmp_path_factory.mktemp("train-data")
    samples = generate_image_text_samples(str(root / "raw"), 240, seed=3, broken=False)
    curated = str(root / "curated")
    run_image_curation(samples.manifest, curated, load_config(
        CurationConfig, None, ["output.shard_rows=40", "image.size=64",
                               "execution.progress_interval_s=30"]))
    train_tokenizer_for_shards(curated, TokenizerConfig(vocab_size=500))
    generate_classification_set(str(root / "classes"), per_class=4, size=64)
    return {"curated": curated, "classes": str(root / "classes"),
            "rows": json.load(open(os.path.join(curated, "_manifest.json")))["num_rows"]}


def _config(tmp_path, shards, *overrides) -> TrainConfig:
    return load_config(TrainConfig, None, [*train_overrides(tmp_path, shards), *overrides])


def train_overrides(tmp_path, shards) -> list[str]:
    """The tests' tiny run (a 1-layer ViT and BERT, 2 workers) as ``--set`` overrides."""
    return [
        f"data.train={shards['curated']}", "data.holdout_shards=1",
        f"data.classification={shards['classes']}", f"data.batch_size={BATCH}",
        "data.shuffle_buffer=0", f"output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.system_metrics_interval_s=1",
        "model.image_size=32", f"model.embed_dim={EMBED}",
        "model.image.options={num_hidden_layers: 1}", "model.text.options={num_hidden_layers: 1}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
        "schedule.log_every=2", "schedule.checkpoint_every=4", "optim.warmup_steps=2"]


def _train_rows(shards) -> int:
    manifest = json.load(open(os.path.join(shards["curated"], "_manifest.json")))
    return sum(s["rows"] for s in manifest["shards"][:-1])


def _mlflow(tmp_path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_a_run_logs_everything_to_one_mlflow_run_and_a_rerun_resumes_it(tmp_path, shards):
    from pipelines.train_job import run_training
    from vlp.train.tracking import RUN_NAME_TAG

    steps_per_epoch = _train_rows(shards) // (BATCH * 2)
    # two epochs per pass over the data stream: the first run is one pass, the rerun starts another
    first = run_training(_config(tmp_path, shards, "run_name=resume", "schedule.epochs=2",
                                 "data.epochs_per_pass=2"))
    assert first.steps == 2 * steps_per_epoch
    client = _mlflow(tmp_path)
    run = client.get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags[RUN_NAME_TAG] == "resume"
    params = run.data.params
    assert params["data.batch_size"] == str(BATCH) and params["model.embed_dim"] == str(EMBED)
    assert params["scaling.num_workers"] == "2"
    # per-step metrics, the grouped loss' traffic (k = 2 ranks: 4 (k-1) B D float32 bytes), evaluation
    for key in ("loss/total", "loss/contrastive", "lr", "temperature", "samples_per_second",
                "data_wait_fraction", "eval/retrieval/mean_recall", "eval/zeroshot_en/top1",
                "eval/zeroshot_zh/top1"):
        assert key in run.data.metrics, key
    assert run.data.metrics["comm_bytes_per_step"] == 4 * (2 - 1) * BATCH * EMBED * 4
    assert any(k.startswith("system/cpu") for k in run.data.metrics)  # system metrics
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.source_type == "local"
    assert shards["curated"] in dataset_input.dataset.source
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "plots", "checkpoints", "dataset"} <= artifacts
    final = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/final")}
    assert "checkpoints/final/model.pt" in final and "checkpoints/final/tokenizer" in final
    losses = client.get_metric_history(run.info.run_id, "loss/total")
    last_step = max(m.step for m in losses)

    second = run_training(_config(tmp_path, shards, "run_name=resume", "schedule.epochs=3",
                                  "data.epochs_per_pass=2"))
    assert second.mlflow_run_id == first.mlflow_run_id  # the same MLflow run goes on
    assert second.steps == 3 * steps_per_epoch
    resumed = client.get_metric_history(run.info.run_id, "loss/total")
    new_steps = sorted(m.step for m in resumed if m.step > last_step)
    assert new_steps and new_steps[0] > last_step and new_steps[0] <= last_step + 2
    assert not [m for m in resumed if m.step <= last_step and m.timestamp > losses[-1].timestamp
                and m.step < 2 * steps_per_epoch - 1]  # no step trained twice
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_eval_command_reproduces_the_final_evaluation(tmp_path, shards, cli_env):
    from pipelines.train_job import run_training

    result = run_training(_config(tmp_path, shards, "run_name=evalme", "schedule.epochs=1"))
    held_out = tmp_path / "held_out.json"
    # the held-out shard as its own folder: a manifest that lists only it
    manifest = json.load(open(os.path.join(shards["curated"], "_manifest.json")))
    manifest["shards"] = manifest["shards"][-1:]
    folder = tmp_path / "held_out"
    folder.mkdir()
    os.symlink(os.path.join(shards["curated"], manifest["shards"][0]["name"]),
               folder / manifest["shards"][0]["name"])
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "eval", "--checkpoint", result.checkpoint,
                        "--data", str(folder), "--classification", shards["classes"],
                        "--output", str(held_out)], capture_output=True, text=True, timeout=300,
                       env=cli_env)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = json.load(open(held_out))
    for key in ("retrieval/i2t_R1", "retrieval/mean_recall", "zeroshot_en/top1", "zeroshot_zh/top1"):
        assert ours[key] == pytest.approx(result.metrics[key], abs=1e-6), key
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "eval", "--checkpoint", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=cli_env)
    assert bad.returncode == 2 and "not a training checkpoint" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(tmp_path, shards):
    from pipelines.train_job import run_training

    pid_dir = tmp_path / "pids"
    cfg = _config(tmp_path, shards, "run_name=killed", "schedule.epochs=4",
                  "scaling.max_failures=1", "schedule.checkpoint_every=3")
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(result=run_training(cfg, pid_dir=str(pid_dir))))
    thread.start()
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.monotonic() + 300
    while not (run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir())):
        assert time.monotonic() < deadline and thread.is_alive(), "no checkpoint appeared"
        time.sleep(0.2)
    victim = int((pid_dir / "rank-1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=600)
    assert "result" in out, "training did not recover from the killed worker"
    steps_per_epoch = _train_rows(shards) // (BATCH * 2)
    assert out["result"].steps == 4 * steps_per_epoch
    assert int((pid_dir / "rank-1.pid").read_text()) != victim  # a new worker took rank 1


def test_a_changed_world_size_resumes_with_the_learning_rate_and_negatives_it_implies(tmp_path, shards):
    from pipelines.train_job import run_training

    first = run_training(_config(tmp_path, shards, "run_name=elastic", "schedule.max_steps=4",
                                 "optim.warmup_steps=0", "optim.min_lr_ratio=1.0"))
    assert first.steps == 4
    # The same run resumed by one worker (what an elastic run does after losing one), with a batch
    # twice as large per worker: the data position counts samples, not steps.
    second = run_training(_config(tmp_path, shards, "run_name=elastic", "schedule.max_steps=8",
                                  "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
                                  "scaling.num_workers=1", "data.batch_size=16"))
    assert second.steps == 8
    assert second.mlflow_run_id == first.mlflow_run_id
    client = _mlflow(tmp_path)
    world = {m.step: m.value for m in client.get_metric_history(first.mlflow_run_id, "world_size")}
    lr = {m.step: m.value for m in client.get_metric_history(first.mlflow_run_id, "lr")}
    sent = {m.step: m.value for m in client.get_metric_history(first.mlflow_run_id,
                                                               "comm_bytes_per_step")}
    before, after = [s for s in world if s <= 4], [s for s in world if s > 4]
    assert before and after and all(world[s] == 2 for s in before) and all(world[s] == 1 for s in after)
    # linear scaling from base_world_size 2: one worker gets half the peak learning rate
    assert lr[after[0]] == pytest.approx(lr[before[0]] / 2)
    assert sent[after[0]] == 0 and sent[before[0]] > 0  # alone, a rank gathers nothing


def test_an_elastic_run_trains_with_the_workers_it_gets(tmp_path, shards):
    from pipelines.train_job import run_training

    result = run_training(_config(tmp_path, shards, "run_name=elastic-range", "scaling.min_workers=1",
                                  "scaling.num_workers=2", "schedule.max_steps=4"))
    assert result.steps == 4
    world = _mlflow(tmp_path).get_metric_history(result.mlflow_run_id, "world_size")
    assert world and all(m.value in (1, 2) for m in world)


def test_a_non_finite_loss_stops_the_run_with_a_clear_error(tmp_path, shards):
    from pipelines.train_job import TrainingError, run_training

    with pytest.raises(TrainingError, match="non-finite loss at step"):
        run_training(_config(tmp_path, shards, "run_name=nan", "optim.lr=1.0e+30",
                             "optim.warmup_steps=0", "optim.grad_clip=0", "schedule.epochs=3"))


def test_training_streams_shards_from_s3(tmp_path, shards, s3_server, monkeypatch):
    from vlp.data.storage import Storage
    from pipelines.train_job import run_training

    storage = s3_server.storage()
    local = Storage()
    bucket = "s3://vlp-test/train-shards"
    for path in local.list_files(shards["curated"]):
        rel = os.path.relpath(path, shards["curated"])
        if not rel.startswith(("_parts", "_drops")):
            storage.write_bytes_atomic(f"{bucket}/{rel}", local.read_bytes(path))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    result = run_training(_config(tmp_path, shards, "run_name=s3", f"data.train={bucket}",
                                  f"data.storage.s3_endpoint_url={s3_server.endpoint}",
                                  "schedule.max_steps=4"))
    assert result.steps == 4 and result.metrics["retrieval/num_pairs"] > 0
    run = _mlflow(tmp_path).get_run(result.mlflow_run_id)
    assert run.inputs.dataset_inputs[0].dataset.source_type == "s3"
    assert not [v for v in run.data.params.values() if "test-secret" in v or "test-key" in v]


def test_workers_that_leave_no_cpu_for_the_input_pipeline_fail_clearly(tmp_path, shards, cli_env):
    """On the embedded 2-CPU Ray, 2 workers x 1 CPU would starve Ray Data: a one-line error, no
    hang, and no MLflow run left behind."""
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--set",
                        f"data.train={shards['curated']}", "--set", "scaling.cpus_per_worker=1"],
                       capture_output=True, text=True, timeout=300, env=cli_env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "leave 0 of this Ray's 2 CPUs for the input pipeline" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "mlflow.db").exists()
