"""Every seed method's recipe (ray_configs/methods/) trains on Ray Train and lands in one MLflow
experiment, so the runs compare side by side: CLIP, M2-Encoder grouped ITC, CoCa on image-text shards;
MAC, VideoMAE+VTC, SimVTP, SNP-S3 on video-text clips.

Each run is cut to a few steps on tiny sample data (the objectives' learning is tested in
tests/test_objective_*.py); what is checked here is that the recipe as written builds, trains every
objective it names, logs each objective's loss, its masking and model config, and the evaluations its
heads imply (caption metrics for CoCa, masked-word video QA for SimVTP and SNP-S3). SNP-S3 runs through
the `vlp` command itself, after `vlp significant-words`, as a user would.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from vlp.config import load_config
from vlp.train.config import TrainConfig

pytestmark = pytest.mark.ray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS_DIR = os.path.join(REPO, "ray_configs", "methods")
# recipe -> (data it trains on, objectives it must log, evaluation keys its heads imply)
METHODS = {
    "clip": ("images", {"contrastive"}, set()),
    "m2_encoder": ("images", {"contrastive"}, set()),
    "coca": ("images", {"contrastive", "captioning"}, {"caption/bleu4", "caption/cider"}),
    "mac": ("clips", {"contrastive"}, set()),
    "videomae_vtc": ("clips", {"contrastive", "mae"}, set()),
    "simvtp": ("clips", {"contrastive", "mae", "mlm", "matching"}, {"qa/accuracy", "qa/chance"}),
    "snp_s3": ("clips", {"contrastive", "matching", "mlm", "word_matching"},
               {"qa/accuracy", "qa/chance"}),
}
SHORT_RUN = ["schedule.max_steps=3", "schedule.log_every=1", "schedule.checkpoint_every=100",
             "optim.warmup_steps=1", "data.batch_size=8", "data.epochs_per_pass=1",
             "data.shuffle_buffer=0", "eval.max_rows=24", "eval.caption_max_items=8",
             "tracking.system_metrics=false"]


@pytest.fixture(scope="module")
def data(ray_cluster, tmp_path_factory):
    """Curated image-text pairs and video-text clips, each with its tokenizer (and the clips with
    their significant words), plus one MLflow database for every run of the module."""
    from pipelines.image_text import run_image_curation
    from pipelines.video_text import run_video_curation
    from vlp.curation.config import CurationConfig, VideoCurationConfig
    from vlp.data.synthetic import generate_image_text_samples
    from vlp.data.synthetic_video import generate_video_text_samples
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer_for_shards

    root = tmp_path_factory.mktemp("methods")
    images = generate_image_text_samples(str(root / "raw-images"), 96, seed=2, broken=False,
                                         varied_formats=False)
    run_image_curation(images.manifest, str(root / "images"), load_config(CurationConfig, None, [
        "image.size=32", "filters.min_side=null", "output.shard_rows=32",
        "execution.progress_interval_s=30"]))
    videos = generate_video_text_samples(str(root / "raw-clips"), 72, seed=3, broken=False,
                                         colours=2, shapes=2)
    run_video_curation(videos.manifest, str(root / "clips"), load_config(VideoCurationConfig, None, [
        "video.frame.size=32", "output.shard_rows=24", "execution.progress_interval_s=30"]))
    for name in ("images", "clips"):
        train_tokenizer_for_shards(str(root / name), TokenizerConfig(vocab_size=400))
    return {"images": str(root / "images"), "clips": str(root / "clips"),
            "mlflow": f"sqlite:///{root / 'mlflow.db'}", "root": root}


def _overrides(method: str, data: dict, tmp_path) -> list[str]:
    folder = data[METHODS[method][0]]
    return [f"data.train={folder}", "data.holdout_shards=1", "model.image_size=32",
            f"output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri={data['mlflow']}", *SHORT_RUN]


def _check_run(data: dict, method: str, metrics: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(data["mlflow"])
    experiment = client.get_experiment_by_name("vlp-methods")
    assert experiment is not None
    recipe = load_config(TrainConfig, os.path.join(METHODS_DIR, f"{method}.yaml"))
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.mlflow.runName = '{recipe.run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    _, objectives, evals = METHODS[method]
    assert set(recipe.objectives) == objectives
    for name in objectives:  # every objective trained and logged its own loss, a finite number
        history = client.get_metric_history(run.info.run_id, f"loss/{name}")
        assert len(history) == 3 and all(abs(m.value) < 1e6 for m in history), name
    params = run.data.params
    assert params["masking.vision.ratio"] == str(recipe.masking.vision.ratio)
    assert params["model.fusion.share_text_encoder"] == str(recipe.model.fusion.share_text_encoder)
    for key in evals | {"retrieval/mean_recall"}:
        assert key in metrics, (method, sorted(metrics))
        assert f"eval/{key}" in run.data.metrics
    if "qa/accuracy" in evals:
        assert metrics["qa/questions"] > 0 and 0 < metrics["qa/chance"] < 100


@pytest.mark.parametrize("method", [m for m in METHODS if m != "snp_s3"])
def test_a_seed_method_recipe_trains_and_logs_to_mlflow(method, data, tmp_path):
    from pipelines.train_job import run_training

    config = load_config(TrainConfig, os.path.join(METHODS_DIR, f"{method}.yaml"),
                         _overrides(method, data, tmp_path))
    result = run_training(config)
    _check_run(data, method, result.metrics)


def test_snp_s3_runs_from_the_command_line_after_the_significant_words_step(data, tmp_path, cli_env):
    env = {k: v for k, v in cli_env.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "significant-words", "--shards", data["clips"]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.path.exists(os.path.join(data["clips"], "_significant_words.json"))
    sets = [f"--set={item}" for item in _overrides("snp_s3", data, tmp_path)]
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--config",
                           os.path.join(METHODS_DIR, "snp_s3.yaml"), *sets, "--set=scaling.cpus_per_worker=0.25"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "qa/accuracy" in done.stdout  # the summary shows what the heads learned
    found = glob.glob(os.path.join(tmp_path, "runs", "snp-s3", "**", "eval.json"), recursive=True)
    assert found, "no final checkpoint with eval.json"
    _check_run(data, "snp_s3", json.load(open(found[0])))


def test_the_methods_compare_side_by_side_in_one_experiment(data):
    """Runs of the module (whichever ran before this test) share one experiment with one set of
    metric names for the shared losses, which is what the MLflow UI's compare view needs."""
    from mlflow import MlflowClient

    client = MlflowClient(data["mlflow"])
    experiment = client.get_experiment_by_name("vlp-methods")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= 2
    assert all("loss/contrastive" in r.data.metrics for r in runs)
    assert len({r.info.run_name for r in runs}) == len(runs)
