"""The seed methods side by side: every recipe in ray_configs/methods/ trained in full on sample data.

    python benchmarks/compare_methods.py [--data DIR] [--methods clip,mac,...] [--seed N]

Not a speed benchmark: a record of what each recipe learns on the sample data of this repository, on
this machine, in one MLflow experiment (``vlp-methods`` in ``<data>/mlflow.db``; open it with
``mlflow ui --backend-store-uri sqlite:///<data>/mlflow.db`` and compare the runs). Image recipes
train on 600 generated image-text pairs (the last shard held out); video recipes on 480 generated
clips of 2 colours x 2 shapes x 8 motions and are evaluated on 120 clips generated and curated apart
(retrieval in order and with shuffled frames, and masked-word QA for the recipes with a conditioned
MLM head). Results: a table on stdout and ``benchmarks/results/methods.json`` (a run of some methods
replaces their entries and keeps the others').
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
METHODS_DIR = os.path.join(REPO, "ray_configs", "methods")
VIDEO = ("mac", "videomae_vtc", "simvtp", "snp_s3")
IMAGE = ("clip", "m2_encoder", "coca")
COLUMNS = ("retrieval/mean_recall", "temporal/mean_recall_gap", "qa/accuracy", "qa/chance",
           "caption/bleu4", "caption/cider")


def prepare(root: str) -> None:
    """Generate and curate the sample data once (kept between invocations)."""
    from pipelines.image_text import run_image_curation
    from pipelines.video_text import run_video_curation
    from vlp.config import load_config
    from vlp.curation.config import CurationConfig, VideoCurationConfig
    from vlp.curation.significant_words import write_significant_words
    from vlp.data.synthetic import generate_image_text_samples
    from vlp.data.synthetic_video import generate_video_text_samples
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer_for_shards

    if os.path.exists(os.path.join(root, "images", "_tokenizer", "meta.json")):
        return
    curation = load_config(VideoCurationConfig, None, [
        "video.frame.size=32", "output.shard_rows=100", "execution.progress_interval_s=60"])
    for name, n, seed in (("clips", 480, 0), ("held_out", 120, 1)):
        videos = generate_video_text_samples(os.path.join(root, f"raw-{name}"), n, seed=seed,
                                             broken=False, colours=2, shapes=2)
        run_video_curation(videos.manifest, os.path.join(root, name), curation)
    train_tokenizer_for_shards(os.path.join(root, "clips"), TokenizerConfig(vocab_size=500))
    write_significant_words(os.path.join(root, "clips"))
    images = generate_image_text_samples(os.path.join(root, "raw-images"), 600, seed=3, broken=False,
                                         varied_formats=False)
    run_image_curation(images.manifest, os.path.join(root, "images"), load_config(CurationConfig, None, [
        "image.size=64", "output.shard_rows=100", "execution.progress_interval_s=60"]))
    train_tokenizer_for_shards(os.path.join(root, "images"), TokenizerConfig(vocab_size=500))


def run_method(name: str, root: str, seed: int) -> dict:
    from vlp.config import load_config
    from vlp.train.config import TrainConfig
    from pipelines.train_job import run_training

    data = ([f"data.train={root}/clips", f"data.eval={root}/held_out", "data.holdout_shards=0"]
            if name in VIDEO else [f"data.train={root}/images", "data.holdout_shards=1"])
    config = load_config(TrainConfig, os.path.join(METHODS_DIR, f"{name}.yaml"), [
        *data, f"seed={seed}", f"output_dir={root}/runs", f"run_name={name}-seed{seed}",
        f"tracking.tracking_uri=sqlite:///{root}/mlflow.db"])
    started = time.monotonic()
    result = run_training(config)
    return {"objectives": sorted(config.objectives), "steps": result.steps,
            "seconds": round(time.monotonic() - started, 1),
            **{k: round(v, 2) for k, v in result.metrics.items() if k in COLUMNS or k.startswith("qa/")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(REPO, ".bench", "methods"))
    parser.add_argument("--methods", default=",".join(IMAGE + VIDEO))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import ray

    from pipelines.ray_runtime import ensure_ray

    os.makedirs(args.data, exist_ok=True)
    started_ray = ensure_ray("")
    results = {}
    try:
        prepare(args.data)
        for name in args.methods.split(","):
            results[name] = run_method(name, args.data, args.seed)
            print(f"[methods] {name}: {results[name]}", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    print(f"\n| method | objectives | steps | s | {' | '.join(COLUMNS)} |")
    print("|---|---|---:|---:|" + "---:|" * len(COLUMNS))
    for name, r in results.items():
        cells = " | ".join(str(r.get(k, "")) for k in COLUMNS)
        print(f"| {name} | {', '.join(r['objectives'])} | {r['steps']} | {r['seconds']:.0f} | {cells} |")
    path = os.path.join(REPO, "benchmarks", "results", "methods.json")
    record = {"results": {}}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    stamp = {"date": _dt.date.today().isoformat(), "seed": args.seed, "machine": f"{platform.machine()}, "
             f"{os.cpu_count()} cores, Python {platform.python_version()}"}
    record["results"].update({name: {**r, **stamp} for name, r in results.items()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
