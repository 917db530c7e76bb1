"""The README's main command, `vlp quickstart`, exactly as a new user runs it: it must curate, train,
evaluate, log to MLflow and show that the model learned."""

from __future__ import annotations

import json
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quickstart_curates_trains_evaluates_and_learns(quickstart_run):
    workdir, r, _ = quickstart_run
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "(learned)" in r.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{workdir}/mlflow.db" in r.stdout
    stats = json.load(open(workdir / "curated" / "_stats.json"))
    assert stats["rows_dropped"] >= 17 and stats["rows_written"] >= 1580  # the broken cases go
    assert json.load(open(workdir / "curated" / "_tokenizer" / "meta.json"))["version"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("vlp").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["eval/retrieval/mean_recall"] >= 5 * metrics["eval/retrieval/chance_R1"]
    assert metrics["eval/zeroshot_en/top1"] > metrics["eval/zeroshot_en/chance"]
    assert run.data.params["objectives.contrastive.loss.mode"] == "grouped"
