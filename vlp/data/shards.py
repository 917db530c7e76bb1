"""Reading a curated shard folder: the one reader every consumer uses.

A curation run writes its shards and, last, a ``_manifest.json`` whose ``status`` turns ``complete``
(``vlp/data/schema.py`` describes the folder). ``ShardFolder.open`` reads that manifest and refuses a
folder that is not a curated one, whose run is unfinished, whose schema's major version this code
cannot read, or whose ``kind`` is missing or unknown; training (``vlp/train/shard_plan.py``), the
tokenizer, the significant words and ``vlp eval`` all go through it, so none of them can read half a
run. It only reads the manifest and, on demand, columns of the shards: no Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

from vlp.config import ConfigError
from vlp.data.schema import (MANIFEST_FILE, SCHEMA_VERSION, STATUS_COMPLETE, ShardKind,
                             schema_version_compatible)
from vlp.data.storage import Storage, join


class ShardFolderError(ConfigError):
    """The folder cannot be read as curated shards; the message says why and what to do."""


@dataclass(frozen=True)
class ShardFile:
    path: str  # full path or URI of the Parquet file
    rows: int


@dataclass(frozen=True)
class ShardFolder:
    """A complete curation run's output: its manifest and its non-empty shards, in manifest order."""

    uri: str
    manifest: dict
    manifest_bytes: bytes
    kind: ShardKind
    shards: tuple[ShardFile, ...]

    @classmethod
    def open(cls, folder: str, storage: Storage | None = None) -> "ShardFolder":
        """Read and check ``folder``'s manifest.

        Raises:
            ShardFolderError: no manifest (not a curated folder), a run not complete, an
                incompatible schema version, or a missing or unknown ``kind``.
        """
        storage = storage or Storage()
        uri = join(folder, MANIFEST_FILE)
        if not storage.exists(uri):
            raise ShardFolderError(f"{folder} has no {MANIFEST_FILE}: is it a curated shard folder? "
                                   "curate first (vlp curate images or videos writes one)")
        raw = storage.read_bytes(uri)
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ShardFolderError(f"{uri} is not valid JSON ({e.msg}): the folder is damaged") from None
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

    @property
    def manifest_uri(self) -> str:
        return join(self.uri, MANIFEST_FILE)

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
        """The values of one column, shard after shard (one shard's column in memory at a time)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        storage = storage or Storage()
        for shard in self.shards:
            with storage.open_input(shard.path) as f:
                table = pq.read_table(pa.BufferReader(f.read()), columns=[name])
            yield from table.column(name).to_pylist()
