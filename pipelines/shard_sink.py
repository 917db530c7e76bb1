"""Writing curated rows: atomic shard commits, the resume state, and the final manifest and stats.

The unit of commit is a *part*: one shard of kept rows (if any), the drops ledger of the rows that
arrived with it, and the part record that makes both count. Order of writes:

1. ``shard-NNNNNN.parquet`` (atomic: temporary name, then rename; a single PUT on S3);
2. ``_drops/part-NNNNNN.parquet``;
3. ``_parts/part-NNNNNN.json``: the commit point.

One write task may produce several parts; their records name the whole group (``group``: first and last
part number), and a part counts only when every record of its group exists. So the rows of one write
commit together: the clips of one video (always in one block) are never half committed.

A run killed anywhere leaves either committed groups or files without a (complete) group; ``--resume``
deletes the latter and skips every key found in committed shards and ledgers, so each surviving key is
written exactly once. Part numbers come from the run's tracker actor, so shard names are contiguous and
deterministic in form (no random ids); a resumed run continues the numbering.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

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
    IMAGE_TEXT_SCHEMA,
    MANIFEST_FILE,
    PARTS_DIR,
    PIXEL_COLUMNS,
    REJECTS_FILE,
    SCHEMA_VERSION,
    STATS_FILE,
    drops_name,
    part_record_name,
    shard_name,
)
from vlp.data.storage import Storage, basename, join

logger = logging.getLogger(__name__)

# The drops ledger also keeps the hashes of rows dropped as duplicates, so that a resumed run rebuilds
# the same dedup index the interrupted run had.
LEDGER_SCHEMA = pa.schema(list(DROPS_SCHEMA) + [pa.field("sha256", pa.string()),
                                                pa.field("phash", pa.int64())])
# Video runs also record the source row a dropped clip came from (resume skips whole source rows).
VIDEO_LEDGER_SCHEMA = LEDGER_SCHEMA.append(pa.field("video_id", pa.string()))


def _parquet_bytes(table: pa.Table, compression: str, row_group_rows: int = 1024) -> pa.Buffer:
    """The table as a Parquet file in memory (an Arrow buffer: no copy of a shard's worth of bytes on
    the way out, which a ``BytesIO`` and its ``getvalue()`` would make)."""
    codec = None if compression == "none" else compression
    # Encoded pixels are already compressed: a second codec only costs time.
    per_column = {name: ("NONE" if name in PIXEL_COLUMNS else (codec or "NONE"))
                  for name in table.column_names}
    buf = pa.BufferOutputStream()
    pq.write_table(
        table, buf, compression=per_column, row_group_size=row_group_rows,
        use_dictionary=[c for c in table.column_names
                        if c not in (*PIXEL_COLUMNS, "key", "sha256", "frame_times_s")],
    )
    return buf.getvalue()


def pixel_bytes(table: pa.Table) -> np.ndarray:
    """Bytes of encoded pixels per row (the poster image plus any video frames)."""
    sizes = np.asarray(pc.binary_length(table.column("image")).to_numpy(zero_copy_only=False),
                       dtype=np.int64)
    if "frames" in table.column_names:
        frames = table.column("frames").combine_chunks()
        flat = np.asarray(pc.binary_length(frames.flatten()).to_numpy(zero_copy_only=False),
                          dtype=np.int64)
        offsets = np.asarray(frames.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        cumulative = np.concatenate([[0], np.cumsum(flat)])
        sizes = sizes + cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    return sizes


def split_into_shards(table: pa.Table, max_rows: int, max_bytes: int) -> list[pa.Table]:
    """Consecutive slices with at most ``max_rows`` rows and about ``max_bytes`` of pixels each."""
    if table.num_rows == 0:
        return []
    sizes = pixel_bytes(table)
    shards, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_rows or acc + size > max_bytes):
            shards.append(table.slice(start, i - start))
            start, acc = i, 0
        acc += int(size)
    shards.append(table.slice(start))
    return shards


class ShardDatasink(Datasink):
    """Ray Data sink writing parts as described in the module docstring."""

    def __init__(self, output: str, storage: Storage, config: OutputConfig, tracker,
                 schema: pa.Schema = IMAGE_TEXT_SCHEMA):
        """``tracker``: a ``pipelines.progress.RunTracker`` handle (part numbers and progress);
        ``schema``: the shard schema (image-text or video-text)."""
        self.output, self.storage, self.config = output, storage, config
        self.tracker = tracker
        self.schema = schema
        self.video = "video_id" in schema.names

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
        table = pa.concat_tables(tables, promote_options="default")
        dropped_mask = table.column("drop_reason").is_valid()
        kept = table.filter(pc.invert(dropped_mask))
        dropped = table.filter(dropped_mask)
        shards = split_into_shards(kept, self.config.shard_rows, self.config.shard_bytes)
        n_parts = max(1, len(shards))
        first = ray.get(self.tracker.take_parts.remote(n_parts))
        group = [first, first + n_parts - 1]
        records = []
        for i in range(n_parts):
            shard = shards[i] if i < len(shards) else None
            records.append(self._commit(first + i, group, shard, dropped if i == 0 else None))
        return records

    def _commit(self, part: int, group: list[int], shard: pa.Table | None,
                dropped: pa.Table | None) -> dict:
        record = {"part": part, "group": group, "shard": None, "rows": 0, "bytes": 0,
                  "drops_file": None, "dropped": 0, "drops_by_reason": {}, "committed_at": time.time()}
        if shard is not None and shard.num_rows:
            data = _parquet_bytes(shard.select(self.schema.names).cast(self.schema),
                                  self.config.compression)
            self.storage.write_bytes_atomic(join(self.output, shard_name(part)), data)
            record.update(shard=shard_name(part), rows=shard.num_rows, bytes=len(data))
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
        for name in (record.get("shard"), record.get("drops_file")):
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
                           columns: list[str]) -> dict[str, list]:
    """Columns of every committed shard and ledger (e.g. keys and hashes, for resume)."""
    out: dict[str, list] = {c: [] for c in columns}
    for record in state.records:
        for name in (record.get("shard"), record.get("drops_file")):
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
                    schema: pa.Schema = IMAGE_TEXT_SCHEMA) -> dict:
    """Write ``_manifest.json``, ``_stats.json`` and ``_rejects.jsonl`` from the committed parts."""
    stats = summarize(state.records)
    stats.update(extra)
    shards = [{"name": r["shard"], "rows": r["rows"], "bytes": r["bytes"]}
              for r in state.records if r.get("shard")]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "kind": "video-text" if "video_id" in schema.names else "image-text",
        "input": input_uri,
        "config": config,
        "config_hash": config_hash,
        "columns": schema.names,
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
