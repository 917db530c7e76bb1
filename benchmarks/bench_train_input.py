"""Benchmark: the training input pipeline's data stall.

    python benchmarks/bench_train_input.py [--rows N] [--epochs E] [--quick]

The same training loop (``pipelines.train_job.run_training``: 2 Ray Train workers, the quickstart's tiny
dual encoder, grouped loss) runs twice in one invocation, on one local Ray:

- ``pipeline``: fed by the real Ray Data pipeline from the curated shards (read Parquet, decode JPEG,
  random crop, tokenize, stream to each worker), as in production;
- ``memory``: fed from batches already decoded and tokenized, materialised in Ray's object store
  before training starts (``build_train_dataset(...).materialize()``): nothing left to compute.

The stall fraction is ``1 - pipeline / memory`` in training samples per second (the mean over logged
windows after the first, which holds start-up), and the loop's own ``data_wait_fraction`` (time spent
waiting for the next batch over wall time) is reported beside it; the feeds alternate ``--rounds``
times and medians are reported. Target: both under 10% (the ratio alone is at the mercy of other
tenants' load between runs; the wait fraction is measured inside the same run). On a 2-core
machine the pipeline's decoding competes with the two training workers for the same cores, so this is
a harsh setting: on GPU nodes the decode runs on CPUs the training does not use.

Results: a table on stdout and ``benchmarks/results/train_input.json`` (``--quick``:
``train_input_quick.json``, ignored by git). Data and runs go under ``.bench/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
WORK = os.path.join(REPO, ".bench", "train_input")


def _prepare(rows: int) -> str:
    from pipelines.image_text import run_image_curation
    from vlp.config import load_config
    from vlp.curation.config import CurationConfig
    from vlp.data.synthetic import generate_image_text_samples
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer_for_shards

    curated = os.path.join(WORK, f"curated-{rows}")
    if os.path.exists(os.path.join(curated, "_tokenizer", "meta.json")):
        return curated
    shutil.rmtree(curated, ignore_errors=True)
    samples = generate_image_text_samples(os.path.join(WORK, f"raw-{rows}"), rows, seed=0, broken=False)
    run_image_curation(samples.manifest, curated, load_config(
        CurationConfig, None, ["output.shard_rows=200", "image.size=128",
                               "execution.progress_interval_s=60"]))
    train_tokenizer_for_shards(curated, TokenizerConfig(vocab_size=2000))
    return curated


def _samples_per_second(tracking_uri: str, run_id: str) -> tuple[float, float]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    sps = sorted(client.get_metric_history(run_id, "samples_per_second"), key=lambda m: m.step)[1:]
    wait = sorted(client.get_metric_history(run_id, "data_wait_fraction"), key=lambda m: m.step)[1:]
    if not sps:
        raise SystemExit("too few logged windows: train longer (--epochs)")
    return statistics.mean(m.value for m in sps), statistics.mean(m.value for m in wait)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternate the two feeds this many times (medians reported)")
    parser.add_argument("--quick", action="store_true", help="400 rows, 4 epochs, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.epochs, args.rounds = 400, 4, 1

    import ray

    from pipelines.ray_runtime import ensure_ray
    from pipelines.train_data import build_train_dataset
    from vlp.train.shard_plan import split_shards
    from vlp.config import load_config
    from vlp.data.storage import Storage
    from vlp.data.tokenizer import resolve_tokenizer_path
    from vlp.train.config import TrainConfig
    from pipelines.train_job import run_training

    os.makedirs(WORK, exist_ok=True)
    ensure_ray("")
    curated = _prepare(args.rows)
    runs = os.path.join(WORK, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    tracking = f"sqlite:///{os.path.join(WORK, 'mlflow.db')}"
    samples: dict[str, list[dict]] = {"pipeline": [], "memory": []}
    for mode in [m for _ in range(args.rounds) for m in ("pipeline", "memory")]:
        cfg = load_config(TrainConfig, os.path.join(REPO, "ray_configs", "train_quickstart.yaml"), [
            f"run_name=bench-{mode}-{_dt.datetime.now():%H%M%S}", f"data.train={curated}",
            "data.holdout_shards=1", f"output_dir={runs}", f"tracking.tracking_uri={tracking}",
            f"schedule.epochs={args.epochs}", "schedule.log_every=5", "schedule.checkpoint_every=100000",
            "tracking.log_checkpoints=false"])
        dataset = None
        if mode == "memory":
            split = split_shards(cfg.data, Storage())
            dataset = build_train_dataset(
                split, cfg.data, image_size=cfg.model.image_size,
                max_text_length=cfg.model.max_text_length,
                tokenizer_dir=resolve_tokenizer_path("", curated), storage=Storage()).materialize()
        result = run_training(cfg, dataset=dataset)
        sps, wait = _samples_per_second(tracking, result.mlflow_run_id)
        samples[mode].append({"samples_per_second": sps, "data_wait_fraction": wait,
                              "steps": result.steps, "seconds": result.seconds})
        print(f"[bench] {mode}: {sps:.1f} samples/s, data wait {100 * wait:.1f}%", flush=True)
    ray.shutdown()
    results = {mode: {"samples_per_second": statistics.median(r["samples_per_second"] for r in runs),
                      "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in runs),
                      "runs": runs} for mode, runs in samples.items()}
    stall = 1.0 - results["pipeline"]["samples_per_second"] / results["memory"]["samples_per_second"]
    report = {
        "date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": args.rows, "epochs": args.epochs, "workers": 2, "model": "quickstart tiny (ViT 3L/BERT 2L)",
        "results": results, "stall_fraction": stall,
        "pipeline_data_wait_fraction": results["pipeline"]["data_wait_fraction"],
        "target": "stall < 10%",
        "met": stall < 0.10 and results["pipeline"]["data_wait_fraction"] < 0.10,
    }
    name = "train_input_quick.json" if args.quick else "train_input.json"
    with open(os.path.join(REPO, "benchmarks", "results", name), "w") as f:
        json.dump(report, f, indent=2)
    print("| feed | samples/s | data wait |\n|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['samples_per_second']:.1f} | {100 * r['data_wait_fraction']:.1f}% |")
    print(f"stall fraction 1 - pipeline/memory = {100 * stall:.1f}%, pipeline data wait "
          f"{100 * results['pipeline']['data_wait_fraction']:.1f}% (target: both < 10%: "
          f"{'met' if report['met'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
