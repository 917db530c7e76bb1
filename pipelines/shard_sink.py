"""Writing curated rows: atomic shard commits, the resume state, and the final manifest and stats.

The unit of commit is a *part*: one shard of kept rows (if any), the drops ledger of the rows that
arrived with it, and the part record that makes both count. Order of writes:

1. ``shard-NNNNNN.parquet`` (atomic: temporary name, then rename; a single PUT on S3); with
   ``output.format: webdataset``, ``shard-NNNNNN.tar`` and then ``shard-NNNNNN.index.parquet`` (the
   tar's rows without pixels: what resume and the dedup rebuild read), each atomic, from one pass over
   the rows;
2. ``_drops/part-NNNNNN.parquet``;
3. ``_parts/part-NNNNNN.json``: the commit point.

One write task may produce several parts; their records name the whole group (``group``: first and last
part number), and a part counts only when every record of its group exists. So the rows of one write
commit together: the clips of one video (always in one block) are never half committed.

A run killed anywhere leaves either committed groups or files without a (complete) group; ``--resume``
deletes the latter and skips every key found in committed shards (or their indexes) and ledgers, so
each surviving key is written exactly once. A tar and its index count only through the part record
that names both: a crash after one of them, or after both but before the record, leaves files that no
record names, which resume deletes before curating those rows again. Part numbers come from the run's
tracker actor, so shard names are contiguous and deterministic in form (no random ids); a resumed run
continues the numbering.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import Datasink

from vlp.curation.config import OutputConfig
from vlp.data.schema import (
    DROPS_DIR,
    DROPS_SCHEMA,
    FORMAT_PARQUET,
    FORMAT_WEBDATASET,
    MANIFEST_FILE,
    PARTS_DIR,
    PIXEL_COLUMNS,
    REJECTS_FILE,
    SCHEMA_VERSION,
    STATS_FILE,
    STATUS_COMPLETE,
    ShardKind,
    drops_name,
    part_record_name,
    shard_index_name,
    shard_name,
    webdataset_member,
)
from vlp.data.storage import Storage, basename, join

logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 1024

# The drops ledger also keeps the hashes of rows dropped as duplicates, so that a resumed run rebuilds
# the same dedup index the interrupted run had.
LEDGER_SCHEMA = pa.schema(list(DROPS_SCHEMA) + [pa.field("sha256", pa.string()),
                                                pa.field("phash", pa.int64())])
# Video runs also record the source row a dropped clip came from (resume skips whole source rows).
VIDEO_LEDGER_SCHEMA = LEDGER_SCHEMA.append(pa.field("video_id", pa.string()))


def _parquet_options(column_names, compression: str) -> dict:
    codec = None if compression == "none" else compression
    # Encoded pixels are already compressed: a second codec only costs time.
    return {
        "compression": {name: ("NONE" if name in PIXEL_COLUMNS else (codec or "NONE"))
                        for name in column_names},
        "use_dictionary": [c for c in column_names
                           if c not in (*PIXEL_COLUMNS, "key", "sha256", "frame_times_s")],
    }


def _parquet_bytes(table: pa.Table, compression: str, row_group_rows: int = ROW_GROUP_ROWS) -> pa.Buffer:
    """The table as a Parquet file in memory (an Arrow buffer: no copy on the way out)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=row_group_rows,
                   **_parquet_options(table.column_names, compression))
    return buf.getvalue()


def pixel_bytes(table: pa.Table) -> np.ndarray:
    """Bytes of encoded pixels per row (the poster image plus any video frames); 0 for null."""
    sizes = np.asarray(pc.fill_null(pc.binary_length(table.column("image")), 0)
                       .to_numpy(zero_copy_only=False), dtype=np.int64)
    if "frames" in table.column_names:
        offset = 0
        for chunk in table.column("frames").chunks:  # list_flatten skips null lists
            lengths = pc.fill_null(pc.binary_length(pc.list_flatten(chunk)), 0).to_numpy(
                zero_copy_only=False)
            parents = pc.list_parent_indices(chunk).to_numpy(zero_copy_only=False)
            sizes[offset:offset + len(chunk)] += np.bincount(
                parents, weights=lengths, minlength=len(chunk)).astype(np.int64)
            offset += len(chunk)
    return sizes


def plan_shards(sizes: np.ndarray, max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` row ranges with at most ``max_rows`` rows and about
    ``max_bytes`` of pixels each (a row larger than ``max_bytes`` gets a shard of its own)."""
    if len(sizes) == 0:
        return []
    ranges, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_rows or acc + size > max_bytes):
            ranges.append((start, i))
            start, acc = i, 0
        acc += int(size)
    ranges.append((start, len(sizes)))
    return ranges


class KeptRows:
    """The kept (not dropped) rows of a write task's blocks, sliced without copying them all at once.

    A write task holds up to a shard's worth of rows in its input blocks (shared object-store memory);
    filtering them into one table would add a private copy of every pixel. Here each block is filtered
    only while its rows are written, so a task's own memory stays at about one block.
    """

    def __init__(self, blocks: list[pa.Table]):
        self.blocks = blocks
        self.masks = [pc.invert(b.column("drop_reason").is_valid()) for b in blocks]
        counts = [pc.sum(m).as_py() or 0 for m in self.masks]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._cached: tuple[int, pa.Table] | None = None

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    def pixel_bytes(self) -> np.ndarray:
        if not self.blocks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([pixel_bytes(b)[m.to_numpy(zero_copy_only=False)]
                               for b, m in zip(self.blocks, self.masks)])

    def _kept_block(self, i: int) -> pa.Table:
        if self._cached is None or self._cached[0] != i:
            self._cached = (i, self.blocks[i].filter(self.masks[i]))
        return self._cached[1]

    def slices(self, start: int, end: int) -> Iterator[pa.Table]:
        """The kept rows ``[start, end)``, block by block."""
        for i in range(len(self.blocks)):
            lo, hi = max(start, self.offsets[i]), min(end, self.offsets[i + 1])
            if lo < hi:
                yield self._kept_block(i).slice(lo - self.offsets[i], hi - lo)

    def dropped(self) -> pa.Table:
        return pa.concat_tables([b.filter(pc.invert(m)) for b, m in zip(self.blocks, self.masks)],
                                promote_options="default")


def write_parquet_stream(pieces: Iterator[pa.Table], sink, schema: pa.Schema, compression: str,
                         row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write tables arriving in pieces as one Parquet file with row groups of ``row_group_rows``,
    holding at most a row group's worth of rows besides the current piece."""
    writer = pq.ParquetWriter(sink, schema, **_parquet_options(schema.names, compression))
    pending, n_pending = [], 0
    try:
        for piece in pieces:
            pending.append(piece.select(schema.names).cast(schema))
            n_pending += piece.num_rows
            if n_pending >= row_group_rows:
                table = pa.concat_tables(pending)
                full = n_pending - n_pending % row_group_rows
                writer.write_table(table.slice(0, full), row_group_size=row_group_rows)
                pending, n_pending = [table.slice(full)], n_pending - full
        if n_pending:
            writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
    finally:
        writer.close()


def webdataset_members(table: pa.Table) -> Iterator[tuple[str, bytes]]:
    """The tar members of ``table``'s rows (shard columns) in the WebDataset layout, row after row:
    ``<key>.<jpg|webp>`` (``image``), ``<key>.txt`` (``caption``), ``<key>.json`` (every other non-pixel
    column, the original key included), and for clips ``<key>.frameNNN.<jpg|webp>`` per frame
    (``vlp.data.schema.webdataset_member`` names them). At most a batch of rows is copied at once."""
    meta_columns = [c for c in table.column_names if c not in PIXEL_COLUMNS and c != "caption"]
    has_frames = "frames" in table.column_names
    for batch in table.to_batches(max_chunksize=256):
        metas = batch.select(meta_columns).to_pylist()
        captions = batch.column("caption").to_pylist()
        images = batch.column("image").to_pylist()
        frames = batch.column("frames").to_pylist() if has_frames else None
        for i, meta in enumerate(metas):
            key, fmt = meta["key"], meta["image_format"]
            yield webdataset_member(key, "image", fmt), images[i]
            yield webdataset_member(key, "txt"), captions[i].encode()
            yield webdataset_member(key, "json"), json.dumps(meta, ensure_ascii=False).encode()
            for j, frame in enumerate(frames[i] if frames is not None else ()):
                yield webdataset_member(key, f"frame{j:03d}", fmt), frame


def write_webdataset_stream(pieces: Iterator[pa.Table], tar_sink, index_sink, schema: pa.Schema,
                            compression: str, mtime: float | None = None) -> None:
    """Write tables arriving in pieces as one tar of WebDataset samples (``webdataset_members`` of
    their ``schema`` columns) and, in the same pass, the non-pixel columns (``index_schema``) as a
    Parquet file, rows in tar order. Members are read-only files stamped ``mtime`` (default: now)."""
    # Whole seconds: tarfile gives a float mtime an extra PAX header on every member.
    mtime = int(time.time() if mtime is None else mtime)
    # Stream mode ("w|"): writes only, no seeks or tells on the sink (an S3 buffer or a temp file).
    with tarfile.open(fileobj=tar_sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        def into_tar(pieces):
            for piece in pieces:
                # the shard's columns only (the processor's drop columns stay out of the json)
                piece = piece.select(schema.names).cast(schema)
                for name, data in webdataset_members(piece):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), mtime, 0o444
                    tar.addfile(info, io.BytesIO(data))
                yield piece

        write_parquet_stream(into_tar(pieces), index_sink, index_schema(schema), compression)


def index_schema(schema: pa.Schema) -> pa.Schema:
    """A shard schema without its pixel columns: the columns of a WebDataset shard's index."""
    return pa.schema([f for f in schema if f.name not in PIXEL_COLUMNS], metadata=schema.metadata)


class ShardDatasink(Datasink):
    """Ray Data sink writing parts as described in the module docstring."""

    def __init__(self, output: str, storage: Storage, config: OutputConfig, tracker,
                 kind: ShardKind = ShardKind.IMAGE_TEXT):
        """``tracker``: a ``pipelines.progress.RunTracker`` handle (part numbers and progress);
        ``kind``: what the shards hold (it gives their schema)."""
        self.output, self.storage, self.config = output, storage, config
        self.tracker = tracker
        self.schema = kind.schema
        self.video = kind is ShardKind.VIDEO_TEXT
        self.webdataset = config.format == FORMAT_WEBDATASET

    @property
    def min_rows_per_write(self) -> int:
        return self.config.shard_rows

    def get_name(self) -> str:
        return "ShardWrite"

    def write(self, blocks, ctx) -> list[dict]:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        kept = KeptRows(tables)
        ranges = plan_shards(kept.pixel_bytes(), self.config.shard_rows, self.config.shard_bytes)
        n_parts = max(1, len(ranges))
        first = ray.get(self.tracker.take_parts.remote(n_parts))
        group = [first, first + n_parts - 1]
        dropped = kept.dropped()
        records = []
        for i in range(n_parts):
            shard = (kept, *ranges[i]) if i < len(ranges) else None
            records.append(self._commit(first + i, group, shard, dropped if i == 0 else None))
        # Arrow's allocator keeps freed pages for reuse; this worker may sit idle for a long time.
        pa.default_memory_pool().release_unused()
        return records

    def _commit(self, part: int, group: list[int], shard: tuple[KeptRows, int, int] | None,
                dropped: pa.Table | None) -> dict:
        record = {"part": part, "group": group, "shard": None, "rows": 0, "bytes": 0,
                  "drops_file": None, "dropped": 0, "drops_by_reason": {}, "committed_at": time.time()}
        if shard is not None and shard[2] > shard[1]:
            kept, start, end = shard
            if self.webdataset:
                name, index = shard_name(part, FORMAT_WEBDATASET), shard_index_name(part)
                # The tar is renamed into place first, then the index; neither counts before the part
                # record below names both (see the module docstring).
                with self.storage.atomic_output(join(self.output, index)) as ix, \
                        self.storage.atomic_output(join(self.output, name)) as f:
                    write_webdataset_stream(kept.slices(start, end), f, ix, self.schema,
                                            self.config.compression, mtime=record["committed_at"])
                    nbytes = f.tell()
                record.update(shard=name, index=index, rows=end - start, bytes=nbytes)
            else:
                with self.storage.atomic_output(join(self.output, shard_name(part))) as f:
                    write_parquet_stream(kept.slices(start, end), f, self.schema,
                                         self.config.compression)
                    nbytes = f.tell()
                record.update(shard=shard_name(part), rows=end - start, bytes=nbytes)
        if dropped is not None and dropped.num_rows:
            columns = {
                "key": dropped.column("key"),
                "source": dropped.column("source"),
                "reason": dropped.column("drop_reason"),
                "detail": dropped.column("drop_detail"),
                "caption": dropped.column("caption"),
                "sha256": dropped.column("sha256"),
                "phash": dropped.column("phash"),
            }
            if self.video:
                columns["video_id"] = dropped.column("video_id")
            ledger = pa.table(columns).cast(VIDEO_LEDGER_SCHEMA if self.video else LEDGER_SCHEMA)
            self.storage.write_bytes_atomic(join(self.output, drops_name(part)),
                                            _parquet_bytes(ledger, "zstd"))
            record.update(drops_file=drops_name(part), dropped=dropped.num_rows,
                          drops_by_reason=dict(Counter(dropped.column("drop_reason").to_pylist())))
        self.storage.write_bytes_atomic(join(self.output, part_record_name(part)),
                                        json.dumps(record).encode())
        self.tracker.committed.remote(record["rows"], record["bytes"])
        return record


# --------------------------------------------------------------------------------------------------
# Resume state


@dataclass
class OutputState:
    """What a previous run committed to an output folder."""

    records: list[dict] = field(default_factory=list)
    manifest: dict | None = None

    @property
    def next_part(self) -> int:
        return max((r["part"] for r in self.records), default=-1) + 1


def load_output_state(output: str, storage: Storage, clean: bool) -> OutputState:
    """Committed part records; with ``clean``, delete uncommitted shards, ledgers, part records of
    incomplete groups, and temporaries."""
    state = OutputState()
    files = storage.list_files(output)
    found: dict[int, tuple[str, dict]] = {}
    for f in files:
        if f"/{PARTS_DIR}/" in f.replace("\\", "/") and f.endswith(".json") and not basename(f).startswith("."):
            try:
                record = json.loads(storage.read_bytes(f))
            except (ValueError, OSError):
                logger.warning("ignoring unreadable part record %s", f)
                continue
            found[record["part"]] = (f, record)
    committed_names: set[str] = set()
    for part, (f, record) in sorted(found.items()):
        first, last = record.get("group", [part, part])
        if not all(p in found for p in range(first, last + 1)):
            # killed between the commits of one write: none of its group counts
            if clean:
                logger.info("removing part %d of incomplete group %d..%d", part, first, last)
                storage.delete(f)
            continue
        state.records.append(record)
        for name in (record.get("shard"), record.get("index"), record.get("drops_file")):
            if name:
                committed_names.add(name)
    manifest_uri = join(output, MANIFEST_FILE)
    if storage.exists(manifest_uri):
        state.manifest = json.loads(storage.read_bytes(manifest_uri))
    if clean:
        for f in files:
            rel = f[len(output.rstrip("/")) + 1 :] if f.startswith(output.rstrip("/")) else basename(f)
            rel = rel.replace("\\", "/")
            orphan_shard = rel.startswith("shard-") and rel not in committed_names
            orphan_drops = rel.startswith(f"{DROPS_DIR}/") and rel not in committed_names
            if orphan_shard or orphan_drops or basename(f).startswith(".tmp-"):
                logger.info("removing uncommitted %s", rel)
                storage.delete(f)
    return state


def read_committed_columns(output: str, storage: Storage, state: OutputState,
                           columns: list[str], *, ledgers: bool = True) -> dict[str, list]:
    """Columns of every committed shard and (with ``ledgers``) drop ledger (e.g. keys and hashes, for
    resume); a WebDataset shard's columns are read from its index."""
    out: dict[str, list] = {c: [] for c in columns}
    for record in state.records:
        for name in (record.get("index") or record.get("shard"),
                     record.get("drops_file") if ledgers else None):
            if not name:
                continue
            with storage.open_input(join(output, name)) as f:
                table = pq.read_table(pa.BufferReader(f.read()), columns=columns)
            for c in columns:
                out[c].extend(table.column(c).to_pylist())
    return out


# --------------------------------------------------------------------------------------------------
# Finalisation


def summarize(records: list[dict]) -> dict:
    by_reason: Counter = Counter()
    for r in records:
        by_reason.update(r.get("drops_by_reason", {}))
    written = sum(r["rows"] for r in records)
    dropped = sum(r["dropped"] for r in records)
    return {
        "rows_read": written + dropped,
        "rows_written": written,
        "rows_dropped": dropped,
        "dropped_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "shards": sum(1 for r in records if r.get("shard")),
        "bytes_written": sum(r["bytes"] for r in records),
    }


def finalize_output(output: str, storage: Storage, state: OutputState, *, config: dict,
                    config_hash: str, input_uri: str, reject_samples: int, extra: dict,
                    kind: ShardKind = ShardKind.IMAGE_TEXT, output_format: str = FORMAT_PARQUET) -> dict:
    """Write ``_manifest.json``, ``_stats.json`` and ``_rejects.jsonl`` from the committed parts.

    ``output_format``: ``output.format``, recorded as the manifest's ``format``; a WebDataset shard's
    entry also names its ``index``."""
    stats = summarize(state.records)
    stats.update(extra)
    shards = [{"name": r["shard"], "rows": r["rows"], "bytes": r["bytes"],
               **({"index": r["index"]} if r.get("index") else {})}
              for r in state.records if r.get("shard")]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": STATUS_COMPLETE,
        "kind": kind.value,
        "format": output_format,
        "input": input_uri,
        "config": config,
        "config_hash": config_hash,
        "columns": kind.schema.names,
        "num_rows": stats["rows_written"],
        "num_bytes": stats["bytes_written"],
        "shards": shards,
    }
    # Rejects: a few of each reason, taken from the ledgers in part order.
    samples: dict[str, list] = {}
    for r in state.records:
        if not r.get("drops_file"):
            continue
        wanted = [k for k in r["drops_by_reason"] if len(samples.get(k, [])) < reject_samples]
        if not wanted:
            continue
        with storage.open_input(join(output, r["drops_file"])) as f:
            ledger = pq.read_table(pa.BufferReader(f.read()),
                                   columns=["key", "source", "reason", "detail", "caption"])
        for row in ledger.to_pylist():
            bucket = samples.setdefault(row["reason"], [])
            if len(bucket) < reject_samples:
                bucket.append(row)
    rejects = "".join(json.dumps(row, ensure_ascii=False) + "\n"
                      for reason in sorted(samples) for row in samples[reason])
    storage.write_bytes_atomic(join(output, REJECTS_FILE), rejects.encode())
    storage.write_bytes_atomic(join(output, STATS_FILE),
                               json.dumps(stats, indent=2, ensure_ascii=False).encode())
    storage.write_bytes_atomic(join(output, MANIFEST_FILE),
                               json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return stats
