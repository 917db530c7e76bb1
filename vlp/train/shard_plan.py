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

from dataclasses import asdict, dataclass, field

import numpy as np

from vlp.config import ConfigError
from vlp.data.schema import ShardKind
from vlp.data.shards import ShardFile, ShardFolder, as_shard_file
from vlp.data.storage import Storage
from vlp.train.config import DataConfig


@dataclass
class ShardSplit:
    """Shard files (``ShardFile``: a path, its rows, a view's selection) or bare paths (whole files)."""

    train_files: list[ShardFile | str]
    train_rows: int
    eval_files: list[ShardFile | str]
    eval_rows: int
    manifest: dict
    manifest_uri: str
    kind: ShardKind = ShardKind.IMAGE_TEXT  # of the train shards
    view: dict | None = None  # when data.train is a view: its _view.json (manifest: its source's)
    mix_files: list[ShardFile | str] = field(default_factory=list)
    mix_file_rows: list[int] = field(default_factory=list)
    mix_rows: int = 0  # rows in the mix folder
    mix_kind: ShardKind | str = ""
    mix_per_epoch: int = 0  # mix rows streamed per epoch
    mix_manifest: dict | None = None
    mix_manifest_uri: str = ""
    mix_view: dict | None = None

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
    split = ShardSplit(train_files=shards, train_rows=sum(s.rows for s in shards),
                       eval_files=eval_shards, eval_rows=sum(s.rows for s in eval_shards),
                       manifest=train.manifest, manifest_uri=train.manifest_uri, kind=train.kind,
                       view=train.view)
    if data.mix:
        mix = ShardFolder.open(data.mix, storage).require_rows()
        split.mix_files = list(mix.shards)
        split.mix_file_rows = [s.rows for s in mix.shards]
        split.mix_rows = mix.rows
        split.mix_kind = mix.kind
        split.mix_manifest, split.mix_manifest_uri = mix.manifest, mix.manifest_uri
        split.mix_view = mix.view
        split.mix_per_epoch = round(split.train_rows * data.mix_fraction / (1 - data.mix_fraction))
    return split


def plan_shard_reads(split: ShardSplit, epochs: int, rng: np.random.Generator) -> list[dict]:
    """The shard reads of one pass, in order: ``{"path", "selection", "kind", "rows"}``
    (``selection``: a view's row numbers of the file, or None for every row; ``rows``: how many of
    those to take, -1 for all)."""

    def read(item, kind, rows: int) -> dict:
        shard = as_shard_file(item)
        return {"path": shard.path, "selection": shard.selection, "kind": str(kind), "rows": rows}

    reads, cursor = [], 0
    for _ in range(epochs):
        epoch = [read(f, split.kind, -1) for f in split.train_files]
        wanted = split.mix_per_epoch
        while wanted > 0:  # the mix's files in turn, across epochs
            i = cursor % len(split.mix_files)
            take = min(wanted, split.mix_file_rows[i])
            epoch.append(read(split.mix_files[i], split.mix_kind,
                              take if take < split.mix_file_rows[i] else -1))
            wanted -= take
            cursor += 1
        reads += [epoch[j] for j in rng.permutation(len(epoch))]
    return reads


def eval_shards_json(split: ShardSplit) -> list[dict]:
    """The held-out files as plain data (they travel to the workers in the run plan)."""
    return [asdict(as_shard_file(f)) for f in split.eval_files]
