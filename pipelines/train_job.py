"""``vlp train``: the driver side of a training run on Ray Train.

Works out the plan once (shard split, tokenizer, MLflow run), builds the Ray Data input pipeline and
a ``TorchTrainer`` (Train V2) with the configured workers, failure policy and checkpoint storage,
runs it, and prints a summary. A rerun with the same ``run_name`` and ``output_dir`` resumes from the
latest checkpoint (Ray Train restores it) and appends to the same MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

from vlp.config import ConfigError, to_dict
from vlp.data.storage import Storage, is_s3, join
from vlp.data.tokenizer import TOKENIZER_DIR, load_tokenizer
from vlp.eval.summary import SUMMARY_METRICS
from vlp.train.config import TrainConfig
from vlp.train.loop import EVAL_FILE, RunPlan, train_worker
from vlp.train.tracking import finish_run, open_run, resolve_tracking_uri


class TrainingError(RuntimeError):
    """Training did not finish; the message says why and what to do."""


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    checkpoint: str
    metrics: dict
    steps: int
    samples: int
    seconds: float



def _beside_shards(name: str, cfg: TrainConfig, split, storage: Storage, marker: str = "") -> str:
    """Where a file saved beside the training shards is (the tokenizer, the significant words): in
    ``data.train`` itself, or, for a view (``vlp select``) that has none of its own, in its source."""
    own = join(cfg.data.train, name)
    if split.view is None or storage.exists(join(own, marker) if marker else own):
        return own
    return join(split.view["source"], name)


def _significant_words(cfg: TrainConfig, split, storage: Storage) -> list[str] | None:
    """The significant-word list when the objectives or the text masking read it, else None."""
    from vlp.objectives.pretraining import plan_pass

    if not plan_pass(cfg.objectives, cfg.masking).needs_significant:
        return None
    from vlp.data.significant_words import SIGNIFICANT_WORDS_FILE, load_significant_words

    path = cfg.data.significant_words or _beside_shards(SIGNIFICANT_WORDS_FILE, cfg, split, storage)
    if not storage.exists(path):
        raise ConfigError(f"the objectives need significant words and {path} does not exist: run "
                          f"`vlp significant-words --shards {cfg.data.train}` (or set "
                          "data.significant_words)")
    words = load_significant_words(path, storage)
    if not words:
        raise ConfigError(f"{path} lists no significant words")
    return words

def _absolute(path: str) -> str:
    return path if not path or is_s3(path) else os.path.abspath(path)


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Ray workers run in their own working folders: every local path must be absolute first."""
    data = replace(cfg.data, train=_absolute(cfg.data.train), eval=_absolute(cfg.data.eval),
                   mix=_absolute(cfg.data.mix),
                   classification=_absolute(cfg.data.classification),
                   tokenizer=_absolute(cfg.data.tokenizer))
    return replace(cfg, data=data, output_dir=_absolute(cfg.output_dir))


def run_training(cfg: TrainConfig, *, pid_dir: str = "", dataset=None,
                 stream=None) -> TrainResult:
    """Train as ``cfg`` says and return the result; raises ``TrainingError`` when the run fails.

    ``dataset`` replaces the input pipeline built from ``cfg.data.train`` (a Ray Dataset of
    ``pixels``/``input_ids``/``attention_mask`` rows): benchmarks feed the same loop from memory with
    it. ``pid_dir`` makes each worker write its PID there (tests kill workers by PID).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import ensure_ray
    from pipelines.train_data import build_train_dataset
    from vlp.train.shard_plan import eval_shards_json, split_shards

    started = time.monotonic()
    stream = stream or sys.stdout  # looked up per call, not at import (captured streams close)
    cfg = _absolute_paths(cfg)
    storage = Storage(cfg.data.storage)
    split = split_shards(cfg.data, storage)
    tokenizer_dir = cfg.data.tokenizer or _beside_shards(TOKENIZER_DIR, cfg, split, storage,
                                                         marker="tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_dir, storage)  # fail here, not in every worker
    significant = _significant_words(cfg, split, storage)
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    started_ray = ensure_ray(cfg.scaling.ray_address)
    try:
        _check_room_for_data(cfg, embedded=started_ray)
        run_id = _open_mlflow_run(cfg, tracking_uri, split)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    mixed = (f" + {split.mix_per_epoch:,} {split.mix_kind} pairs per epoch from {cfg.data.mix}"
             if split.mix_per_epoch else "")
    print(f"[train] {cfg.run_name}: {split.train_rows:,} {split.kind} training pairs in "
          f"{len(split.train_files)} shards{mixed}, {split.eval_rows:,} held out; tokenizer {len(tokenizer):,} entries; "
          f"{cfg.scaling.num_workers} workers ({cfg.scaling.strategy}); MLflow run {run_id} at "
          f"{tracking_uri}",
          file=stream, flush=True)
    plan = RunPlan(train_rows=split.epoch_rows, tokenizer_dir=tokenizer_dir,
                   eval_files=eval_shards_json(split), classification=cfg.data.classification,
                   tracking_uri=tracking_uri, mlflow_run_id=run_id, pid_dir=pid_dir)
    status = "FAILED"
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        if dataset is None:
            dataset = build_train_dataset(split, cfg.data, image_size=cfg.model.image_size,
                                          max_text_length=cfg.model.max_text_length,
                                          tokenizer_dir=tokenizer_dir, storage=storage,
                                          num_frames=cfg.model.num_frames,
                                          significant_words=significant)
        sc = cfg.scaling
        workers = (sc.min_workers, sc.num_workers) if sc.min_workers else sc.num_workers
        fs, root = storage.resolve(cfg.output_dir)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config": to_dict(cfg), "plan": asdict(plan)},
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=sc.use_gpu,
                accelerator_type=sc.accelerator_type or None,
                resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})}),
            run_config=ray.train.RunConfig(
                name=cfg.run_name, storage_path=root,
                storage_filesystem=fs if is_s3(cfg.output_dir) else None,
                failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.schedule.keep_checkpoints)),
            datasets={"train": dataset},
        )
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps the worker's error; show its message, not the stack
            raise TrainingError(f"training run {cfg.run_name!r} failed: {_root_cause(e)}\n"
                                f"  checkpoints: {os.path.join(cfg.output_dir, cfg.run_name)}; rerun "
                                "the same command to resume from the latest") from e
        if result.checkpoint is None:
            raise TrainingError(f"training run {cfg.run_name!r} ended without a checkpoint")
        with result.checkpoint.as_directory() as folder:
            with open(os.path.join(folder, EVAL_FILE)) as f:
                metrics = json.load(f)
            with open(os.path.join(folder, "state.json")) as f:
                state = json.load(f)
        status = "FINISHED"
        return TrainResult(run_name=cfg.run_name, mlflow_run_id=run_id, tracking_uri=tracking_uri,
                           checkpoint=result.checkpoint.path, metrics=metrics, steps=state["step"],
                           samples=state["samples"], seconds=time.monotonic() - started)
    finally:
        finish_run(tracking_uri, run_id, status)
        if started_ray:
            ray.shutdown()


def _open_mlflow_run(cfg: TrainConfig, tracking_uri: str, split) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return open_run(cfg, tracking_uri=tracking_uri, manifest=split.manifest,
                        manifest_uri=split.manifest_uri,
                        mix=(split.mix_manifest, split.mix_manifest_uri) if split.mix_manifest else None,
                        view=split.view, mix_view=split.mix_view)
    except MlflowException as e:  # unreachable server, refused credentials, bad store URI
        first = (e.message or str(e)).strip().splitlines()[0][:300]
        raise TrainingError(f"MLflow at {tracking_uri} refused the run: {first} (for a server with "
                            "authentication set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD)") from None


def _check_room_for_data(cfg: TrainConfig, *, embedded: bool) -> None:
    """Ray Data gets the CPUs the training workers leave; with none left, training waits forever
    for its first batch. On the embedded Ray that is a config error; a cluster is left alone (an
    autoscaling one starts with no workers and adds nodes on demand)."""
    import ray

    if not embedded:
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    left = total - cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if left >= cfg.data.cpus_per_data_task:
        return
    message = (f"{cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPUs leave "
               f"{max(left, 0):g} of this Ray's {total:g} CPUs for the input pipeline, which needs "
               f"{cfg.data.cpus_per_data_task:g} per task: lower scaling.cpus_per_worker or "
               "data.cpus_per_data_task (the quickstart recipe uses 0.5 per worker on 2 cores)")
    raise ConfigError(message)


def _root_cause(error: BaseException) -> str:
    seen = error
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] or [type(seen).__name__]
    return tail[0][:500]


def format_train_summary(result: TrainResult) -> str:
    m = result.metrics
    rows = [("run", result.run_name), ("steps", f"{result.steps:,}"),
            ("samples seen", f"{result.samples:,}"), ("time", f"{result.seconds:.0f} s")]
    for key in SUMMARY_METRICS:
        if key in m:
            rows.append((key, f"{m[key]:.1f}"))
    rows += [("checkpoint", result.checkpoint), ("MLflow run", result.mlflow_run_id)]
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows]
    ui = (f"mlflow ui --backend-store-uri {result.tracking_uri}"
          if result.tracking_uri.startswith("sqlite") else f"open {result.tracking_uri}")
    return "\n".join(["[train] summary", *lines, f"[train] look at it: {ui}"])
