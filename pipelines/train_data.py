"""The training input pipeline: curated shards -> decoded, augmented, tokenized batches, on Ray Data.

``split_shards`` reads the shard folder's manifest and sets the held-out shards apart;
``build_train_dataset`` is the Ray Data job Ray Train streams from (``datasets={"train": ...}``): a
pass is a list of shard reads (every training file once per epoch, in a new random order each epoch),
and one CPU task per read takes the ``image`` (or video ``frames``) and ``caption`` columns of its file
through ``prepare_train_batch``, so GPU workers only train. Rows are shuffled within a window on each
worker.

A second shard folder (``data.mix``, e.g. video clips into an image run) joins every epoch with its
share of the samples (``data.mix_fraction``): its files are read in turn, the last one cut, and its
reads are shuffled in among the epoch's. Both leave as the same columns, with pixels shaped for the
model's ``num_frames``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    mix_file_rows: list[int] = field(default_factory=list)
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
        split.mix_file_rows = [n for _, n in mix_shards]
        split.mix_rows = sum(n for _, n in mix_shards)
        split.mix_kind = mix_manifest.get("kind", "image-text")
        split.mix_manifest, split.mix_manifest_uri = mix_manifest, join(data.mix, MANIFEST_FILE)
        split.mix_per_epoch = round(split.train_rows * data.mix_fraction / (1 - data.mix_fraction))
    return split


def plan_pass(split: ShardSplit, epochs: int, rng: np.random.Generator) -> list[dict]:
    """The shard reads of one pass, in order: ``{"path", "kind", "rows"}`` (``rows``: how many of the
    file's rows to take, -1 for all)."""
    reads, cursor = [], 0
    for _ in range(epochs):
        epoch = [{"path": f, "kind": split.kind, "rows": -1} for f in split.train_files]
        wanted = split.mix_per_epoch
        while wanted > 0:  # the mix's files in turn, across epochs
            i = cursor % len(split.mix_files)
            take = min(wanted, split.mix_file_rows[i])
            epoch.append({"path": split.mix_files[i], "kind": split.mix_kind,
                          "rows": take if take < split.mix_file_rows[i] else -1})
            wanted -= take
            cursor += 1
        reads += [epoch[j] for j in rng.permutation(len(epoch))]
    return reads


def build_train_dataset(split: ShardSplit, data: DataConfig, *, image_size: int, max_text_length: int,
                        tokenizer_dir: str, storage: Storage, num_frames: int = 1, seed: int | None = None,
                        significant_words: list[str] | None = None):
    """The training stream of one pass: ``data.epochs_per_pass`` epochs back to back, so that Ray
    Data's executor starts once per pass, not once per epoch (each read augments anew).
    ``significant_words`` (SNP-S3) adds each batch's ``significant`` word ids."""
    import ray.data

    reads = plan_pass(split, data.epochs_per_pass, np.random.default_rng(seed))
    prepare = dict(image_size=image_size, max_text_length=max_text_length, tokenizer_path=tokenizer_dir,
                   min_crop_scale=data.min_crop_scale, num_frames=num_frames,
                   significant_words=tuple(significant_words) if significant_words else None)
    return ray.data.from_items(reads, override_num_blocks=len(reads)).map_batches(
        read_shards, batch_size=1, batch_format="pyarrow", num_cpus=data.cpus_per_data_task,
        fn_kwargs=dict(storage=storage, rows_per_batch=data.decode_batch_size, prepare=prepare))


def read_shards(reads: pa.Table, *, storage: Storage, rows_per_batch: int, prepare: dict):
    """Ray Data task: the planned reads -> prepared batches (a generator: one batch in memory)."""
    for read in reads.to_pylist():
        # A video tower reads the frames; an image tower reads a clip's poster (its middle frame).
        pixels = ("frames" if read["kind"] == "video-text" and prepare["num_frames"] > 1
                  else "image")
        fs, path = storage.resolve(read["path"])
        left = read["rows"] if read["rows"] >= 0 else None
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=rows_per_batch,
                                                        columns=[pixels, "caption", "lang"]):
                if left is not None:
                    if left <= 0:
                        break
                    batch, left = batch.slice(0, left), left - batch.num_rows
                columns = {name: batch.column(name).to_numpy(zero_copy_only=False)
                           for name in (pixels, "caption", "lang")}
                yield prepare_train_batch(columns, **prepare)
