"""The training input pipeline: curated shards -> decoded, augmented, tokenized batches, on Ray Data.

``split_shards`` reads the shard folder's manifest and sets the held-out shards apart;
``build_train_dataset`` is the Ray Data job Ray Train streams from (``datasets={"train": ...}``): read
the ``image`` (or video ``frames``) and ``caption`` columns, then ``prepare_train_batch`` on CPU tasks,
so GPU workers only train. Files are shuffled every epoch and rows within a window on each worker.

A second shard folder (``data.mix``, e.g. video clips into an image run) joins every epoch with its
share of the samples (``data.mix_fraction``); both streams leave as the same columns, with pixels
shaped for the model's ``num_frames``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from vlp.config import ConfigError
from vlp.data.schema import MANIFEST_FILE
from vlp.data.storage import Storage, join
from vlp.data.transforms import prepare_train_batch
from vlp.train.config import DataConfig


@dataclass
class ShardSplit:
    train_files: list[str]
    train_rows: int
    eval_files: list[str]
    eval_rows: int
    manifest: dict
    manifest_uri: str
    kind: str = "image-text"  # of the train shards: image-text or video-text
    mix_files: list[str] = field(default_factory=list)
    mix_rows: int = 0  # rows in the mix folder
    mix_kind: str = ""
    mix_per_epoch: int = 0  # mix rows streamed per epoch
    mix_manifest: dict | None = None
    mix_manifest_uri: str = ""

    @property
    def epoch_rows(self) -> int:
        return self.train_rows + self.mix_per_epoch


def read_manifest(folder: str, storage: Storage) -> tuple[dict, list[tuple[str, int]]]:
    uri = join(folder, MANIFEST_FILE)
    if not storage.exists(uri):
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}: is it a curated shard folder? "
                          "(vlp curate images writes one)")
    manifest = json.loads(storage.read_bytes(uri))
    if manifest.get("status") != "complete":
        raise ConfigError(f"the curation run in {folder} is not complete: finish it with --resume")
    shards = [(join(folder, s["name"]), int(s["rows"])) for s in manifest.get("shards", []) if s["rows"]]
    if not shards:
        raise ConfigError(f"{folder} holds no rows to train on")
    return manifest, shards


def split_shards(data: DataConfig, storage: Storage) -> ShardSplit:
    if not data.train:
        raise ConfigError("data.train is empty: give the curated shard folder (--set data.train=DIR)")
    manifest, shards = read_manifest(data.train, storage)
    eval_shards: list[tuple[str, int]] = []
    if data.eval:
        _, eval_shards = read_manifest(data.eval, storage)
    elif data.holdout_shards:
        if data.holdout_shards >= len(shards):
            raise ConfigError(f"data.holdout_shards={data.holdout_shards} leaves nothing to train on: "
                              f"{data.train} has {len(shards)} shards")
        shards, eval_shards = shards[:-data.holdout_shards], shards[-data.holdout_shards:]
    split = ShardSplit(train_files=[p for p, _ in shards], train_rows=sum(n for _, n in shards),
                       eval_files=[p for p, _ in eval_shards], eval_rows=sum(n for _, n in eval_shards),
                       manifest=manifest, manifest_uri=join(data.train, MANIFEST_FILE),
                       kind=manifest.get("kind", "image-text"))
    if data.mix:
        mix_manifest, mix_shards = read_manifest(data.mix, storage)
        split.mix_files = [p for p, _ in mix_shards]
        split.mix_rows = sum(n for _, n in mix_shards)
        split.mix_kind = mix_manifest.get("kind", "image-text")
        split.mix_manifest, split.mix_manifest_uri = mix_manifest, join(data.mix, MANIFEST_FILE)
        split.mix_per_epoch = round(split.train_rows * data.mix_fraction / (1 - data.mix_fraction))
    return split


def build_train_dataset(split: ShardSplit, data: DataConfig, *, image_size: int, max_text_length: int,
                        tokenizer_dir: str, storage: Storage, num_frames: int = 1):
    """The training stream: ``data.epochs_per_pass`` epochs back to back (each with its own file
    order and augmentation), so that Ray Data's executor starts once per pass, not once per epoch."""
    prepare = dict(image_size=image_size, max_text_length=max_text_length, tokenizer_path=tokenizer_dir,
                   min_crop_scale=data.min_crop_scale, num_frames=num_frames)
    passes = []
    for _ in range(data.epochs_per_pass):
        passes.append(_one_epoch(split.train_files, split.kind, data, storage, prepare))
        if split.mix_per_epoch:
            # the mix's files, cut (or repeated) to its share of the epoch
            copies = math.ceil(split.mix_per_epoch / split.mix_rows)
            mixes = [_one_epoch(split.mix_files, split.mix_kind, data, storage, prepare)
                     for _ in range(copies)]
            mix = mixes[0].union(*mixes[1:]) if copies > 1 else mixes[0]
            passes.append(mix.limit(split.mix_per_epoch))
    return passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]


def _one_epoch(files: list[str], kind: str, data: DataConfig, storage: Storage, prepare: dict):
    import ray.data

    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    cpus = data.cpus_per_data_task
    # A video tower reads the frames; an image tower reads a clip's poster (its middle frame).
    pixels = "frames" if kind == "video-text" and prepare["num_frames"] > 1 else "image"
    # select_columns is pushed down into the Parquet reader: the other columns are never read
    ds = ray.data.read_parquet(paths, filesystem=fs, shuffle="files", num_cpus=cpus).select_columns(
        [pixels, "caption"])
    return ds.map_batches(prepare_train_batch, batch_size=data.decode_batch_size, batch_format="numpy",
                          num_cpus=cpus, fn_kwargs=prepare)
