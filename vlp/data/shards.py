"""Reading a curated shard folder, or a view of one: the one reader every consumer uses.

A curation run writes its shards and, last, a ``_manifest.json`` whose ``status`` turns ``complete``
(``vlp/data/schema.py`` describes the folder). ``ShardFolder.open`` reads that manifest and refuses a
folder that is not a curated one, whose shards are WebDataset tars (``output.format: webdataset``,
for other loaders), whose run is unfinished, whose schema's major version this code
cannot read, or whose ``kind`` is missing or unknown; training (``vlp/train/shard_plan.py``), the
tokenizer, the significant words, scoring and ``vlp eval`` all go through it, so none of them can
read half a run. It only reads the manifest and, on demand, columns of the shards: no Ray.

A *view* (``vlp select``) is a small folder with ``_view.json`` instead of shards: it names its source
folder and, per source shard, the selected rows (``_selection/<shard>.parquet``, one ``row`` column of
row numbers in increasing order). ``ShardFolder.open`` on a view checks the source as above, refuses
a view whose source was curated again since (the source manifest's hash), and gives the source's
shards with their selections; ``read_shard`` reads only the selected rows. Consumers never tell a
view from a folder unless they want to (``ShardFolder.view``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

from vlp.config import ConfigError
from vlp.data.schema import (FORMAT_PARQUET, MANIFEST_FILE, SCHEMA_VERSION, STATUS_COMPLETE,
                             ShardKind, schema_version_compatible)
from vlp.data.storage import Storage, join


class ShardFolderError(ConfigError):
    """The folder cannot be read as curated shards; the message says why and what to do."""


VIEW_FILE = "_view.json"
SELECTION_DIR = "_selection"


@dataclass(frozen=True)
class ShardFile:
    path: str  # full path or URI of the Parquet file
    rows: int  # rows to read: all of the file's, or the selected ones
    selection: str | None = None  # a view's row numbers of this file (Parquet, column ``row``)


@dataclass(frozen=True)
class ShardFolder:
    """A complete curation run's output: its manifest and its non-empty shards, in manifest order."""

    uri: str
    manifest: dict  # of the curated folder (a view's source)
    manifest_bytes: bytes
    kind: ShardKind
    shards: tuple[ShardFile, ...]
    view: dict | None = None  # the view's ``_view.json`` when ``uri`` is a view

    @classmethod
    def open(cls, folder: str, storage: Storage | None = None) -> "ShardFolder":
        """Read and check ``folder``'s manifest.

        Raises:
            ShardFolderError: no manifest (not a curated folder), a run not complete, an
                incompatible schema version, or a missing or unknown ``kind``.
        """
        storage = storage or Storage()
        if storage.exists(join(folder, VIEW_FILE)):
            return cls._open_view(folder, storage)
        uri = join(folder, MANIFEST_FILE)
        if not storage.exists(uri):
            raise ShardFolderError(f"{folder} has no {MANIFEST_FILE}: is it a curated shard folder? "
                                   "curate first (vlp curate images or videos writes one)")
        raw = storage.read_bytes(uri)
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ShardFolderError(f"{uri} is not valid JSON ({e.msg}): the folder is damaged") from None
        # Checked first: an unfinished WebDataset run would otherwise be sent to --resume, and then back.
        fmt = manifest.get("format", FORMAT_PARQUET)  # folders from before output.format are Parquet
        if fmt != FORMAT_PARQUET:
            raise ShardFolderError(f"{folder} holds {fmt} shards (output.format={fmt}); vlp train, "
                                   "eval, score, select and the tokenizer read Parquet shards only: "
                                   "curate with --set output.format=parquet")
        if manifest.get("status") != STATUS_COMPLETE:
            raise ShardFolderError(f"the curation run in {folder} is not complete: finish it with "
                                   "--resume")
        version = str(manifest.get("schema_version", ""))
        if not schema_version_compatible(version):
            raise ShardFolderError(f"{folder} holds shards of schema version {version or '(none)'}; "
                                   f"this code reads {SCHEMA_VERSION.split('.')[0]}.x: curate it again")
        kind = manifest.get("kind")
        if kind is None and version == "1.0":  # before video shards, every folder was image-text
            kind = ShardKind.IMAGE_TEXT
        try:
            kind = ShardKind(kind)
        except ValueError:
            raise ShardFolderError(f"{uri} names kind {kind!r}; known kinds: "
                                   f"{[k.value for k in ShardKind]}") from None
        shards = tuple(ShardFile(join(folder, s["name"]), int(s["rows"]))
                       for s in manifest.get("shards", []) if s["rows"])
        return cls(uri=folder, manifest=manifest, manifest_bytes=raw, kind=kind, shards=shards)

    @classmethod
    def _open_view(cls, folder: str, storage: Storage) -> "ShardFolder":
        view = json.loads(storage.read_bytes(join(folder, VIEW_FILE)))
        source = cls.open(view["source"], storage)
        if source.view is not None:
            raise ShardFolderError(f"{folder} is a view of the view {view['source']}: select from the "
                                   "shard folder instead")
        if view.get("source_manifest_sha256") != source.manifest_sha256:
            raise ShardFolderError(f"the view {folder} was selected from {view['source']} as it was "
                                   "before it changed: select again")
        by_name = {s.path.rsplit("/", 1)[-1]: s for s in source.shards}
        shards = []
        for entry in view["shards"]:
            if entry["name"] not in by_name:
                raise ShardFolderError(f"the view {folder} names {entry['name']}, which "
                                       f"{view['source']} does not hold")
            if entry["rows"]:
                shards.append(ShardFile(by_name[entry["name"]].path, int(entry["rows"]),
                                        join(folder, entry["selection"])))
        return cls(uri=folder, manifest=source.manifest, manifest_bytes=source.manifest_bytes,
                   kind=source.kind, shards=tuple(shards), view=view)

    @property
    def manifest_uri(self) -> str:
        """The lineage file: the view's ``_view.json``, or the folder's manifest."""
        return join(self.uri, VIEW_FILE if self.view is not None else MANIFEST_FILE)

    @property
    def source_uri(self) -> str:
        """The curated folder the shards are in (a view's source, else the folder itself)."""
        return self.view["source"] if self.view is not None else self.uri

    @property
    def manifest_sha256(self) -> str:
        """Short content hash of the manifest: what a tokenizer or word list was made from."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()[:16]

    @property
    def files(self) -> list[str]:
        return [s.path for s in self.shards]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def require_rows(self, purpose: str = "to train on") -> "ShardFolder":
        if not self.shards:
            raise ShardFolderError(f"{self.uri} holds no rows {purpose}")
        return self

    def read_column(self, name: str, storage: Storage | None = None) -> Iterator:
        """The values of one column, shard after shard (one batch in memory at a time)."""
        storage = storage or Storage()
        for shard in self.shards:
            for batch in read_shard(shard, storage, [name]):
                yield from batch.column(name).to_pylist()


def as_shard_file(item: "ShardFile | dict | str") -> ShardFile:
    """A ``ShardFile`` from itself, its ``asdict`` form (plans travel as JSON) or a bare path (a whole
    file, its rows unknown)."""
    if isinstance(item, ShardFile):
        return item
    if isinstance(item, dict):  # a ShardFile's fields, or a planned read that has them
        return ShardFile(path=item["path"], rows=int(item.get("rows", -1)),
                         selection=item.get("selection"))
    return ShardFile(path=item, rows=-1)


def load_selection(uri: str, storage: Storage):
    """A view's row numbers of one shard (int64, increasing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.open_input(uri) as f:
        return pq.read_table(pa.BufferReader(f.read()), columns=["row"]).column("row").to_numpy()


def read_shard(shard: "ShardFile | dict | str", storage: Storage, columns: list[str], *,
               batch_size: int = 1024, limit: int | None = None):
    """Record batches of ``columns`` of one shard: every row, or only a view's selected rows, in file
    order; at most ``limit`` rows. The file streams (one batch in memory)."""
    import numpy as np
    import pyarrow.parquet as pq

    shard = as_shard_file(shard)
    selected = load_selection(shard.selection, storage) if shard.selection else None
    left = limit
    fs, path = storage.resolve(shard.path)
    with fs.open_input_file(path) as f:
        start = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns):
            end = start + batch.num_rows
            if selected is not None:
                lo, hi = np.searchsorted(selected, [start, end])
                batch = batch.take(selected[lo:hi] - start) if hi > lo else batch.slice(0, 0)
            start = end
            if left is not None:
                batch, left = batch.slice(0, left), left - min(left, batch.num_rows)
            if batch.num_rows:
                yield batch
            if left is not None and left <= 0:
                break
