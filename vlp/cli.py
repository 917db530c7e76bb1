"""The ``vlp`` command: one entry point, one subcommand per job.

    vlp curate images --input SRC --output DST [--config FILE] [--set key=value ...] [--resume]
    vlp sample-data --output DIR [--rows N]
    vlp quickstart [--workdir DIR]

Errors a person can fix (bad config, missing input, non-empty output) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vlp.config import ConfigError, load_config

NOT_YET = {
    ("curate", "videos"): "video-text curation (issue #4)",
    ("train",): "training on Ray Train (issue #3)",
    ("eval",): "zero-shot evaluation (issue #3)",
    ("submit",): "Ray job submission (issue #6)",
}


def _add_curate(sub):
    curate = sub.add_parser("curate", help="curate raw pairs into Arrow/Parquet shards")
    kinds = curate.add_subparsers(dest="kind", required=True)
    images = kinds.add_parser("images", help="image-text pairs")
    images.add_argument("--input", required=True, help="manifest, folder or tar(s): local or s3://")
    images.add_argument("--output", required=True, help="output folder: local or s3://")
    images.add_argument("--config", help="YAML config (see ray_configs/curate_images.yaml)")
    images.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set image.size=224 (repeatable)")
    images.add_argument("--resume", action="store_true",
                        help="finish an interrupted run in --output (keys already written are skipped)")
    videos = kinds.add_parser("videos", help="video-text pairs (not implemented yet)")
    videos.add_argument("rest", nargs=argparse.REMAINDER)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_curate(sub)
    sample = sub.add_parser("sample-data", help="generate sample image-text pairs with known content")
    sample.add_argument("--output", required=True)
    sample.add_argument("--rows", type=int, default=200)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--no-broken", action="store_true", help="leave out the bad-input cases")
    quick = sub.add_parser("quickstart", help="the main job on the embedded default, end to end")
    quick.add_argument("--workdir", default="quickstart")
    quick.add_argument("--rows", type=int, default=400)
    for name in ("train", "eval", "submit"):
        p = sub.add_parser(name, help="not implemented yet")
        p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _curate_images(args) -> int:
    from pipelines.image_text import run_image_curation
    from vlp.curation.config import CurationConfig

    config = load_config(CurationConfig, args.config, args.overrides)
    stats = run_image_curation(args.input, args.output, config, resume=args.resume)
    return 0 if stats["rows_read"] else 1


def _sample_data(args) -> int:
    from vlp.data.synthetic import generate_image_text_samples

    samples = generate_image_text_samples(args.output, args.rows, seed=args.seed,
                                          broken=not args.no_broken)
    kept = len(samples.kept_keys)
    print(f"wrote {len(samples.expected)} pairs ({kept} clean, {len(samples.expected) - kept} "
          f"broken on purpose) to {samples.manifest}")
    return 0


def _quickstart(args) -> int:
    import shutil

    from pipelines.image_text import run_image_curation
    from vlp.curation.config import CurationConfig
    from vlp.data.synthetic import generate_image_text_samples

    started = time.monotonic()
    raw = os.path.join(args.workdir, "raw")
    curated = os.path.join(args.workdir, "curated")
    for own in (raw, curated):  # only what a previous quickstart made, never the folder itself
        shutil.rmtree(own, ignore_errors=True)
    print(f"[quickstart] 1/2 generating {args.rows} sample pairs (plus broken cases) in {raw}")
    samples = generate_image_text_samples(raw, args.rows, seed=0)
    print("[quickstart] 2/2 curating them with Ray Data (local Ray, started in-process)")
    stats = run_image_curation(samples.manifest, curated, load_config(CurationConfig))
    expected_kept = len(samples.kept_keys)
    print(f"[quickstart] done in {time.monotonic() - started:.0f}s: {stats['rows_written']} of "
          f"{stats['rows_read']} pairs written (expected {expected_kept}); shards, _manifest.json "
          f"and _stats.json in {curated}")
    print("[quickstart] training (vlp train) arrives with issue #3; this quickstart curates only.")
    return 0 if stats["rows_written"] == expected_kept else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = (args.command, getattr(args, "kind", None)) if args.command == "curate" else (args.command,)
    if key in NOT_YET:
        print(f"vlp: {' '.join(k for k in key if k)} is not implemented yet: {NOT_YET[key]}.",
              file=sys.stderr)
        return 3
    from pipelines.image_text import CurationError, InputError

    try:
        if args.command == "curate":
            return _curate_images(args)
        if args.command == "sample-data":
            return _sample_data(args)
        if args.command == "quickstart":
            return _quickstart(args)
    except (ConfigError, CurationError, InputError) as e:
        print(f"vlp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlp: interrupted; rerun with --resume to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
