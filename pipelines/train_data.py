"""The training input pipeline: curated shards -> decoded, augmented, tokenized batches, on Ray Data.

``build_train_dataset`` is the Ray Data job Ray Train streams from (``datasets={"train": ...}``): a
pass is the list of shard reads planned by ``vlp.train.shard_plan`` (every training file once per
epoch, in a new random order each epoch, the ``data.mix`` folder's files in turn for their share),
and one CPU task per read takes the ``image`` (or video ``frames``) and ``caption`` columns of its file
through ``prepare_train_batch``, so GPU workers only train. Rows are shuffled within a window on each
worker. Image-text and video-text reads leave as the same columns, with pixels shaped for the model's
``num_frames``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from vlp.data.schema import ShardKind
from vlp.data.shards import ShardFile, read_shard
from vlp.data.storage import Storage
from vlp.data.transforms import prepare_train_batch
from vlp.train.config import DataConfig
from vlp.train.shard_plan import ShardSplit, plan_shard_reads


def build_train_dataset(split: ShardSplit, data: DataConfig, *, image_size: int, max_text_length: int,
                        tokenizer_dir: str, storage: Storage, num_frames: int = 1, seed: int | None = None,
                        significant_words: list[str] | None = None):
    """The training stream of one pass: ``data.epochs_per_pass`` epochs back to back, so that Ray
    Data's executor starts once per pass, not once per epoch (each read augments anew).
    ``significant_words`` (SNP-S3) adds each batch's ``significant`` word ids."""
    import ray.data

    reads = plan_shard_reads(split, data.epochs_per_pass, np.random.default_rng(seed))
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
        video = ShardKind(read["kind"]) is ShardKind.VIDEO_TEXT
        pixels = "frames" if video and prepare["num_frames"] > 1 else "image"
        shard = ShardFile(path=read["path"], rows=-1, selection=read.get("selection"))
        limit = read["rows"] if read["rows"] >= 0 else None
        for batch in read_shard(shard, storage, [pixels, "caption", "lang"],
                                batch_size=rows_per_batch, limit=limit):
            columns = {name: batch.column(name).to_numpy(zero_copy_only=False)
                       for name in (pixels, "caption", "lang")}
            yield prepare_train_batch(columns, **prepare)
