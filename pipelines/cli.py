"""The ``vlp`` command: one entry point, one subcommand per job.

    vlp curate images|videos --input SRC --output DST [--config FILE] [--set key=value ...] [--resume]
    vlp sample-data --output DIR [--rows N] [--videos]
    vlp tokenizer --shards DIR [--vocab-size N] [--kind wordpiece|bpe]
    vlp significant-words --shards DIR [--top-k N]
    vlp train [--config FILE] [--set key=value ...]
    vlp eval --checkpoint DIR [--data SHARDS] [--classification DIR] [--output FILE]
    vlp dedup semantic --shards DIR|VIEW --scores NAME --output VIEW [--threshold T] [--clusters K]
    vlp export --checkpoint DIR --format hf --output DIR
    vlp score --shards DIR --model M --name NAME [--set key=value ...] [--resume]
    vlp select --shards DIR --output VIEW [--where EXPR ...] [--top-fraction F --by COL [--per-lang]]
               [--materialize]
    vlp quickstart [--workdir DIR]
    vlp submit [--address URL] [--working-dir DIR] [--env KEY=VALUE ...] [...] -- COMMAND ...
    vlp jobs status|logs|stop JOB_ID | vlp jobs list

Errors a person can fix (bad config, missing input, non-empty output) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vlp.config import ConfigError, load_config
from pipelines.submit import SubmitError
from pipelines.submit import add_parsers as add_job_parsers
from pipelines.submit import run as run_job_command

QUICKSTART_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "ray_configs", "train_quickstart.yaml")


def _add_curate(sub):
    curate = sub.add_parser("curate", help="curate raw pairs into Arrow/Parquet shards")
    kinds = curate.add_subparsers(dest="kind", required=True)
    for media, example in (("images", "image.size=224"), ("videos", "video.num_frames=16")):
        p = kinds.add_parser(media, help=f"{media[:-1]}-text pairs")
        p.add_argument("--input", required=True, help="manifest, folder or tar(s): local or s3://")
        p.add_argument("--output", required=True, help="output folder: local or s3://")
        p.add_argument("--config", help=f"YAML config (see ray_configs/curate_{media}.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a config key, e.g. --set {example} (repeatable)")
        p.add_argument("--resume", action="store_true",
                       help="finish an interrupted run in --output (rows already written are skipped)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_curate(sub)
    sample = sub.add_parser("sample-data", help="generate sample image-text pairs with known content")
    sample.add_argument("--output", required=True)
    sample.add_argument("--rows", type=int, default=200)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-broken", action="store_true", help="leave out the bad-input cases")
    sample.add_argument("--videos", action="store_true",
                        help="video-text pairs whose captions depend on time (default: images)")
    tok = sub.add_parser("tokenizer", help="train a bilingual tokenizer on curated captions "
                         "(saved beside the shards, in _tokenizer/)")
    tok.add_argument("--shards", required=True, help="curated shard folder (local or s3://)")
    tok.add_argument("--vocab-size", type=int, default=8000)
    tok.add_argument("--kind", choices=["wordpiece", "bpe"], default="wordpiece")
    sig = sub.add_parser("significant-words", help="pick SNP-S3's significant words (nouns, verbs, "
                         "adjectives) of curated captions (saved beside the shards)")
    sig.add_argument("--shards", required=True, help="curated shard folder (local or s3://)")
    sig.add_argument("--top-k", type=int, default=3000)
    train = sub.add_parser("train", help="pretrain a dual encoder on Ray Train")
    train.add_argument("--config", help="recipe YAML (see ray_configs/train_*.yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set data.train=shards/ (repeatable)")
    ev = sub.add_parser("eval", help="zero-shot retrieval and classification of a checkpoint")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint folder written by vlp train")
    ev.add_argument("--data", help="held-out shard folder for retrieval")
    ev.add_argument("--classification", help="labelled folder (data.parquet + classes.json)")
    ev.add_argument("--output", help="write the metrics as JSON here too")
    dedup = sub.add_parser("dedup", help="dataset-wide dedup beyond curation's exact and pHash passes")
    methods = dedup.add_subparsers(dest="method", required=True)
    sem = methods.add_parser("semantic", help="SemDeDup: k-means over image embeddings, then drop rows "
                             "within a cosine threshold of a kept row (the best-scored is kept)")
    sem.add_argument("--shards", required=True, help="a curated shard folder or a view")
    sem.add_argument("--scores", required=True, help="the scores (vlp score ... --set embeddings=true) "
                     "whose image embeddings and clip_score to use")
    sem.add_argument("--output", required=True, help="the view of the kept rows (empty or new)")
    sem.add_argument("--threshold", type=float, default=0.95, help="cosine at which rows are duplicates")
    sem.add_argument("--clusters", type=int, default=0, help="k-means clusters (0: about sqrt(rows))")
    exp = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder that transformers "
                         "loads without this project")
    exp.add_argument("--checkpoint", required=True, help="a checkpoint folder written by vlp train")
    exp.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers model folder")
    exp.add_argument("--output", required=True, help="the folder to write (new or empty; never overwritten)")
    score = sub.add_parser("score", help="score curated pairs with a dual encoder (sidecars beside the "
                           "shards, in _scores/NAME/)")
    score.add_argument("--shards", required=True, help="curated shard folder (local or s3://)")
    score.add_argument("--model", required=True,
                       help="a vlp train checkpoint folder, or a local Hugging Face folder (CLIPModel, "
                       "ChineseCLIPModel, SiglipModel, VisionTextDualEncoderModel)")
    score.add_argument("--name", required=True, help="the scores' name: columns scores.NAME.* in vlp select")
    score.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a scoring setting, e.g. --set embeddings=true --set batch_size=128")
    score.add_argument("--resume", action="store_true", help="finish an interrupted scoring run")
    select = sub.add_parser("select", help="keep rows by metadata and scores: a view (no pixels copied) "
                            "or, with --materialize, new shards")
    select.add_argument("--shards", required=True, help="curated shard folder (local or s3://)")
    select.add_argument("--output", required=True, help="the view's folder (empty or new)")
    select.add_argument("--where", action="append", default=[], metavar="EXPR",
                        help="a condition, e.g. \"scores.clip.clip_score >= 0.28\", \"lang == 'zh'\", "
                        "\"width >= 224\" (repeatable: all must hold)")
    select.add_argument("--top-fraction", type=float, help="then keep this best fraction, by --by")
    select.add_argument("--by", default="", help="the column ranking rows for --top-fraction")
    select.add_argument("--per-lang", action="store_true",
                        help="--top-fraction within each caption language")
    select.add_argument("--materialize", action="store_true",
                        help="write real shards with the selected rows instead of a view")
    quick = sub.add_parser("quickstart", help="the main job on the embedded default, end to end")
    quick.add_argument("--workdir", default="quickstart")
    quick.add_argument("--rows", type=int, default=1600)
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a training config key")
    add_job_parsers(sub)
    return parser


def _curate(args) -> int:
    if args.kind == "videos":
        from pipelines.video_text import run_video_curation as run
        from vlp.curation.config import VideoCurationConfig as Config
    else:
        from pipelines.image_text import run_image_curation as run
        from vlp.curation.config import CurationConfig as Config

    config = load_config(Config, args.config, args.overrides)
    stats = run(args.input, args.output, config, resume=args.resume)
    return 0 if stats["rows_read"] else 1


def _sample_data(args) -> int:
    if args.videos:
        from vlp.data.synthetic_video import generate_video_text_samples as generate
    else:
        from vlp.data.synthetic import generate_image_text_samples as generate

    samples = generate(args.output, args.rows, seed=args.seed, broken=not args.no_broken)
    kept = len(samples.kept_keys)
    print(f"wrote {len(samples.expected)} pairs ({kept} clean, {len(samples.expected) - kept} "
          f"broken on purpose) to {samples.manifest}")
    return 0


def _tokenizer(args) -> int:
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer_for_shards

    meta = train_tokenizer_for_shards(args.shards, TokenizerConfig(kind=args.kind,
                                                                   vocab_size=args.vocab_size))
    print(f"tokenizer {meta['version']} ({meta['vocab_size']:,} entries, trained on "
          f"{meta['trained_on']['captions']:,} captions) saved in {args.shards}/_tokenizer")
    return 0


def _significant_words(args) -> int:
    from vlp.curation.significant_words import SignificantWordsConfig, write_significant_words
    from vlp.data.significant_words import SIGNIFICANT_WORDS_FILE

    result = write_significant_words(args.shards, SignificantWordsConfig(top_k=args.top_k))
    langs = result["by_language"]
    print(f"{len(result['words']):,} significant words ({langs['en']:,} English, {langs['zh']:,} "
          f"Chinese) from {result['meta']['captions']:,} captions saved in "
          f"{args.shards}/{SIGNIFICANT_WORDS_FILE}")
    print("top 20: " + ", ".join(f"{w} ({result['counts'][w]:,})" for w in result["words"][:20]))
    return 0


def _train(args) -> int:
    from vlp.train.config import TrainConfig
    from pipelines.train_job import format_train_summary, run_training

    config = load_config(TrainConfig, args.config, args.overrides)
    result = run_training(config)
    print(format_train_summary(result))
    return 0


def _eval(args) -> int:
    import json

    from vlp.api import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, data=args.data, classification=args.classification)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value:.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


def _dedup(args) -> int:
    from pipelines.semantic_dedup_job import run_semantic_dedup
    from vlp.curation.semantic_dedup import SemanticDedupConfig

    config = SemanticDedupConfig(threshold=args.threshold, clusters=args.clusters)
    stats = run_semantic_dedup(args.shards, args.scores, args.output, config)
    return 0 if stats["rows_in"] else 1


def _export(args) -> int:
    from vlp.api import export_hf

    print(export_hf(args.checkpoint, args.output)["summary"])
    return 0


def _score(args) -> int:
    from pipelines.scoring_job import run_scoring
    from vlp.scoring.config import ScoreConfig

    config = load_config(ScoreConfig, None, args.overrides)
    stats = run_scoring(args.shards, args.model, args.name, config, resume=args.resume)
    return 0 if stats["scored"] else 1


def _select(args) -> int:
    from vlp.data.shards import ShardFolder
    from vlp.data.storage import Storage
    from vlp.scoring.select import Selection, materialize, select_rows, write_view

    storage = Storage()
    selection = Selection(where=tuple(args.where), top_fraction=args.top_fraction, by=args.by,
                          per_lang=args.per_lang)
    folder = ShardFolder.open(args.shards, storage).require_rows("to select from")
    chosen = select_rows(folder, selection, storage)
    write = materialize if args.materialize else write_view
    stats = write(folder, chosen, selection, args.output, storage)
    what = "shards" if args.materialize else "view"
    print(f"[select] kept {stats['rows_kept']:,} of {stats['rows_in']:,} rows "
          f"({100 * stats['fraction_kept']:.1f}%) -> {what} {args.output}")
    for lang, s in stats["by_language"].items():
        print(f"  {lang:<8} {s['rows_kept']:>9,} of {s['rows_in']:>9,}")
    return 0


def _quickstart(args) -> int:
    import shutil

    from pipelines.image_text import run_image_curation
    from pipelines.ray_runtime import ensure_ray
    from vlp.curation.config import CurationConfig
    from vlp.data.synthetic import generate_classification_set, generate_image_text_samples
    from vlp.data.tokenizer import TokenizerConfig, train_tokenizer_for_shards
    from vlp.eval.summary import CHANCE_R1, MEAN_RECALL
    from vlp.train.config import TrainConfig
    from pipelines.train_job import format_train_summary, run_training

    started = time.monotonic()
    workdir = os.path.abspath(args.workdir)
    raw, curated, classes = (os.path.join(workdir, d) for d in ("raw", "curated", "classification"))
    runs = os.path.join(workdir, "runs")
    for own in (raw, curated, classes, runs):  # only what a previous quickstart made
        shutil.rmtree(own, ignore_errors=True)
    train_config = load_config(TrainConfig, QUICKSTART_RECIPE, [
        f"data.train={curated}", f"data.classification={classes}", f"output_dir={runs}",
        f"tracking.tracking_uri=sqlite:///{os.path.join(workdir, 'mlflow.db')}", *args.overrides])
    import ray

    started_ray = ensure_ray("")  # one local Ray for curation and training
    try:
        print(f"[quickstart] 1/5 generating {args.rows} sample pairs (plus broken cases) in {raw}")
        samples = generate_image_text_samples(raw, args.rows, seed=0)
        print("[quickstart] 2/5 curating them with Ray Data")
        curation = load_config(CurationConfig, None, ["output.shard_rows=200", "image.size=128"])
        stats = run_image_curation(samples.manifest, curated, curation)
        # Random layouts can, rarely, come out as near-duplicates of each other: a few more drops than
        # the broken cases are fine; many more mean curation is broken.
        if not 0.98 * len(samples.kept_keys) <= stats["rows_written"] <= len(samples.kept_keys):
            print(f"[quickstart] curation kept {stats['rows_written']} pairs, expected "
                  f"{len(samples.kept_keys)}", file=sys.stderr)
            return 1
        print("[quickstart] 3/5 training the bilingual tokenizer on the curated captions")
        meta = train_tokenizer_for_shards(curated, TokenizerConfig(vocab_size=2000))
        print(f"[quickstart]     tokenizer {meta['version']}: {meta['vocab_size']} entries")
        print("[quickstart] 4/5 generating a zero-shot classification set (which shape?)")
        generate_classification_set(classes, per_class=30, seed=1)
        contrastive = train_config.objectives.get("contrastive")
        loss = f"{contrastive.loss.mode} contrastive" if contrastive is not None else "no contrastive"
        print(f"[quickstart] 5/5 training a tiny dual encoder ({train_config.scaling.num_workers} Ray "
              f"Train workers, {loss} loss), then evaluating")
        result = run_training(train_config)
    finally:
        if started_ray:
            ray.shutdown()
    print(format_train_summary(result))
    m = result.metrics
    learned = m.get(MEAN_RECALL, 0.0) >= 5 * m.get(CHANCE_R1, 100.0)
    print(f"[quickstart] done in {time.monotonic() - started:.0f}s; held-out retrieval mean recall "
          f"{m.get(MEAN_RECALL, 0):.1f}% vs chance R@1 {m.get(CHANCE_R1, 0):.1f}%"
          f" ({'learned' if learned else 'DID NOT LEARN'})")
    return 0 if learned else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("submit", "jobs"):  # ahead of the imports below, which load torch
        try:
            return run_job_command(args)
        except SubmitError as e:
            print(f"vlp: error: {e}", file=sys.stderr)
            return 2
    from pipelines.curation_job import CurationError
    from pipelines.scoring_job import ScoringError
    from pipelines.sources import InputError
    from pipelines.train_job import TrainingError

    handlers = {"curate": _curate, "sample-data": _sample_data, "quickstart": _quickstart,
                "tokenizer": _tokenizer, "significant-words": _significant_words, "train": _train,
                "eval": _eval, "export": _export, "score": _score, "select": _select,
                "dedup": _dedup}
    try:
        return handlers[args.command](args)
    except (ConfigError, CurationError, InputError, ScoringError, TrainingError) as e:
        print(f"vlp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlp: interrupted; rerun the same command to go on (curation: with --resume; "
              "training resumes from its latest checkpoint by itself)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
