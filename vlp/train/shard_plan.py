"""What a training run reads: the shard folders split into training and held-out files, and the reads
of each pass.

``split_shards`` opens ``data.train`` (and ``data.eval``, ``data.mix``) through ``ShardFolder`` (so an
unfinished or incompatible curation run is refused before anything starts) and sets the held-out
shards apart; ``plan_shard_reads`` orders one pass's reads: every training file once per epoch, in a
new random order each epoch, with the mix folder's files read in turn for their share of the samples
(the last one cut). Pure planning over manifests: the Ray Data job that executes the reads is
``pipelines/train_data.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlp.config import ConfigError
from vlp.data.schema import ShardKind
from vlp.data.shards import ShardFolder
from vlp.data.storage import Storage
from vlp.train.config import DataConfig


@dataclass
class ShardSplit:
    train_files: list[str]
    train_rows: int
    eval_files: list[str]
    eval_rows: int
    manifest: dict
    manifest_uri: str
    kind: ShardKind = ShardKind.IMAGE_TEXT  # of the train shards
    mix_files: list[str] = field(default_factory=list)
    mix_file_rows: list[int] = field(default_factory=list)
    mix_rows: int = 0  # rows in the mix folder
    mix_kind: ShardKind | str = ""
    mix_per_epoch: int = 0  # mix rows streamed per epoch
    mix_manifest: dict | None = None
    mix_manifest_uri: str = ""

    @property
    def epoch_rows(self) -> int:
        return self.train_rows + self.mix_per_epoch


def split_shards(data: DataConfig, storage: Storage) -> ShardSplit:
    if not data.train:
        raise ConfigError("data.train is empty: give the curated shard folder (--set data.train=DIR)")
    train = ShardFolder.open(data.train, storage).require_rows()
    shards, eval_shards = list(train.shards), []
    if data.eval:
        eval_shards = list(ShardFolder.open(data.eval, storage).require_rows().shards)
    elif data.holdout_shards:
        if data.holdout_shards >= len(shards):
            raise ConfigError(f"data.holdout_shards={data.holdout_shards} leaves nothing to train on: "
                              f"{data.train} has {len(shards)} shards")
        shards, eval_shards = shards[:-data.holdout_shards], shards[-data.holdout_shards:]
    split = ShardSplit(train_files=[s.path for s in shards], train_rows=sum(s.rows for s in shards),
                       eval_files=[s.path for s in eval_shards],
                       eval_rows=sum(s.rows for s in eval_shards),
                       manifest=train.manifest, manifest_uri=train.manifest_uri, kind=train.kind)
    if data.mix:
        mix = ShardFolder.open(data.mix, storage).require_rows()
        split.mix_files = mix.files
        split.mix_file_rows = [s.rows for s in mix.shards]
        split.mix_rows = mix.rows
        split.mix_kind = mix.kind
        split.mix_manifest, split.mix_manifest_uri = mix.manifest, mix.manifest_uri
        split.mix_per_epoch = round(split.train_rows * data.mix_fraction / (1 - data.mix_fraction))
    return split


def plan_shard_reads(split: ShardSplit, epochs: int, rng: np.random.Generator) -> list[dict]:
    """The shard reads of one pass, in order: ``{"path", "kind", "rows"}`` (``rows``: how many of the
    file's rows to take, -1 for all)."""
    reads, cursor = [], 0
    for _ in range(epochs):
        epoch = [{"path": f, "kind": str(split.kind), "rows": -1} for f in split.train_files]
        wanted = split.mix_per_epoch
        while wanted > 0:  # the mix's files in turn, across epochs
            i = cursor % len(split.mix_files)
            take = min(wanted, split.mix_file_rows[i])
            epoch.append({"path": split.mix_files[i], "kind": str(split.mix_kind),
                          "rows": take if take < split.mix_file_rows[i] else -1})
            wanted -= take
            cursor += 1
        reads += [epoch[j] for j in rng.permutation(len(epoch))]
    return reads
