"""MLflow for training runs: the driver opens (or resumes) the run, rank 0 logs into it.

One MLflow run per job, found again by its run name on a rerun, so a resumed job keeps appending to
the same run. The driver logs what it knows before any worker starts (the flattened config, the
dataset's manifest as an input with its digest and source); rank 0 logs step metrics, system metrics,
evaluation results, plots and checkpoints. With no ``tracking_uri`` and no ``MLFLOW_TRACKING_URI``
the store is a SQLite file in the working folder: the embedded default.

Secrets never reach MLflow: the config holds none (credentials come from the environment), and
params are scrubbed of anything that looks like a key, token or password anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from vlp.config import flatten

RUN_NAME_TAG = "vlp.run_name"
_SECRET = re.compile(r"(secret|password|token|access_key|credential)", re.IGNORECASE)


def resolve_tracking_uri(configured: str, workdir: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return "sqlite:///" + os.path.abspath(os.path.join(workdir or os.getcwd(), "mlflow.db"))


def _artifact_location(uri: str) -> str | None:
    """Beside a local SQLite store, artifacts go to ``mlartifacts/`` next to it (absolute, so every
    Ray worker, whatever its working directory, writes to the same place)."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]), "mlartifacts")
    return None


def safe_params(config: Any) -> dict[str, str]:
    params = {}
    for key, value in flatten(config).items():
        if _SECRET.search(key):
            continue
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
        params[key] = text[:6000]  # MLflow's limit on a param value
    return params


def open_run(config, *, tracking_uri: str, manifest: dict, manifest_uri: str,
             mix: tuple[dict, str] | None = None, view: dict | None = None,
             mix_view: dict | None = None) -> str:
    """Create the run for ``config.run_name`` (or find the one a previous attempt made); return its id.

    ``manifest``/``manifest_uri``: the training shards' lineage; ``mix``: the same of the mixed-in
    shard folder, if any (logged as a second training input). ``view``/``mix_view``: when a folder is
    a view (``vlp select``), its ``_view.json``: the input is then the view (its rows, predicates and
    its own digest), tagged with its parent dataset, whose manifest is logged beside it."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    mlflow.set_tracking_uri(tracking_uri)
    name = config.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=_artifact_location(tracking_uri))
    experiment = mlflow.set_experiment(name)
    previous = mlflow.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1,
                                  output_format="list")
    if previous:
        with mlflow.start_run(run_id=previous[0].info.run_id):
            mlflow.set_tag("vlp.resumed", "true")
        return previous[0].info.run_id
    with mlflow.start_run(run_name=config.run_name, tags={RUN_NAME_TAG: config.run_name}) as run:
        mlflow.log_params(safe_params(config))
        inputs = [(manifest, manifest_uri, view, "dataset")] + (
            [(*mix, mix_view, "dataset_mix")] if mix else [])
        for shards_manifest, uri, selected, folder in inputs:
            lineage = selected if selected is not None else shards_manifest
            digest = hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]
            dataset = MetaDataset(source=_dataset_source(uri), name=os.path.basename(
                os.path.dirname(uri.rstrip("/"))) or "shards", digest=digest)
            tags = {"rows": str(shards_manifest.get("num_rows")),
                    "kind": str(shards_manifest.get("kind", "image-text")),
                    "schema_version": str(shards_manifest.get("schema_version")),
                    "curation_config_hash": str(shards_manifest.get("config_hash"))}
            if selected is not None:
                tags.update(rows=str(selected["rows"]), view="true", parent=str(selected["source"]),
                            parent_rows=str(shards_manifest.get("num_rows")),
                            parent_digest=str(selected["source_manifest_sha256"]))
                mlflow.log_dict(selected, f"{folder}/_view.json")
            mlflow.log_input(dataset, context="training", tags=tags)
            mlflow.log_dict(shards_manifest, f"{folder}/_manifest.json")
        return run.info.run_id


def _dataset_source(uri: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    return resolve_dataset_source(uri if "://" in uri else "file://" + os.path.abspath(uri))


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


class RankZeroLogger:
    """What rank 0 logs during training. Other ranks get a logger that does nothing."""

    def __init__(self, tracking_uri: str, run_id: str, *, active: bool, system_metrics: bool,
                 system_metrics_interval_s: float = 10.0):
        self.active = active
        self.run_id = run_id
        if not active:
            return
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(system_metrics_interval_s)
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.active:
            self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        if self.active:
            self._mlflow.log_artifacts(local_dir, artifact_path)

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifact(local_path, artifact_path)

    def dict(self, data: dict, path: str) -> None:
        if self.active:
            self._mlflow.log_dict(data, path)

    def close(self, status: str = "FINISHED") -> None:
        if self.active:
            self._mlflow.end_run(status=status)
            self.active = False
