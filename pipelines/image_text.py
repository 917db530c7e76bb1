"""Image-text curation on Ray Data: raw pairs in, Arrow/Parquet shards with manifest and stats out.

    read (CaptionPairDatasource) -> ImageTextProcessor actors -> ShardDatasink
                                          |  check-and-insert
                                          v
                                   DedupShard actors (dataset-wide index)

Only wiring lives here: the per-row work is ``vlp.curation.pair.curate_pair``, the index is
``vlp.curation.dedup``, commits and resume are ``pipelines.shard_sink``. Readers and writers reserve no
CPU (they are light, and on a small machine CPU-reserving consumers would starve them); the processor
actors reserve ``execution.worker_cpus`` each.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import ray

from pipelines.ray_runtime import ensure_ray

from vlp.config import config_hash, to_dict
from vlp.curation.config import CurationConfig, output_affecting
from vlp.curation.dedup import (
    DedupIndex,
    combine_flags,
    key_owner,
    make_entries,
    split_by_shard,
)
from vlp.curation.fetch import Fetcher
from vlp.curation.filters import build_filters
from vlp.curation.pair import PROCESSED_COLUMNS, PairSettings, curate_pair
from vlp.curation.text import warm_up
from vlp.data.schema import IMAGE_TEXT_SCHEMA, MANIFEST_FILE, SCHEMA_VERSION
from vlp.data.storage import Storage, join
from pipelines.progress import ProgressReporter, RunTracker, format_summary
from pipelines.shard_sink import (
    ShardDatasink,
    finalize_output,
    load_output_state,
    read_committed_columns,
)
from pipelines.sources import CaptionPairDatasource, InputError, plan_inputs

logger = logging.getLogger(__name__)

PROCESSED_SCHEMA = pa.schema(
    [IMAGE_TEXT_SCHEMA.field(c).with_nullable(True) for c in PROCESSED_COLUMNS
     if c in IMAGE_TEXT_SCHEMA.names]
    + [pa.field("drop_reason", pa.string()), pa.field("drop_detail", pa.string())]
)


class CurationError(RuntimeError):
    """A curation run cannot start or finish; the message says why and what to do."""


@ray.remote(num_cpus=0)
class DedupShard:
    """One shard of the dataset-wide dedup index; calls are serialised, so check-and-insert is atomic."""

    def __init__(self, config):
        self.index = DedupIndex(config)

    def check_and_insert(self, entries):
        return self.index.check_and_insert(entries)

    def insert(self, entries):
        self.index.insert(entries)

    def size(self):
        return self.index.size()


_REMOTE_SCHEMES = ("http://", "https://", "s3://")


class ImageTextProcessor:
    """Ray Data callable class: a batch of source rows in, processed rows (kept or dropped) out."""

    def __init__(self, config: CurationConfig, dedup_shards: list, tracker=None):
        self.config = config
        self.storage = Storage(config.storage)
        self.fetcher = Fetcher(config.fetch, self.storage)
        self.settings = PairSettings(config.text, config.image, build_filters(config.filters))
        self.dedup_shards = dedup_shards
        self.tracker = tracker
        self.pool = ThreadPoolExecutor(config.fetch.threads, thread_name_prefix="curate")
        slots = config.execution.decode_threads or max(1, round(config.execution.worker_cpus))
        self.cpu_gate = threading.BoundedSemaphore(slots)
        warm_up(config.text)

    def _one(self, raw: dict) -> dict:
        return curate_pair(raw, self.fetcher.fetch, self.settings, self.cpu_gate)

    def __call__(self, batch: pa.Table) -> pa.Table:
        raws = batch.to_pylist()
        # Remote sources wait on the network: fetch them on the thread pool. Local files and embedded
        # bytes are CPU-bound: run them right here (more threads would only fight over the GIL),
        # overlapping with the remote fetches still in flight.
        remote = {i: self.pool.submit(self._one, r) for i, r in enumerate(raws)
                  if r["image"] is None and r["source"].startswith(_REMOTE_SCHEMES)}
        rows = [None if i in remote else self._one(r) for i, r in enumerate(raws)]
        for i, future in remote.items():
            rows[i] = future.result()
        if self.dedup_shards:
            self._dedup(rows)
        if self.tracker is not None:
            drops = Counter(r["drop_reason"] for r in rows if r["drop_reason"])
            self.tracker.processed_batch.remote(len(rows), len(rows) - sum(drops.values()), dict(drops))
        return pa.Table.from_pylist(rows, schema=PROCESSED_SCHEMA)

    def _dedup(self, rows: list[dict]) -> None:
        alive = [i for i, r in enumerate(rows) if r["drop_reason"] is None]
        if not alive:
            return
        entries = make_entries(
            [rows[i]["key"] for i in alive],
            [rows[i]["sha256"] for i in alive],
            np.array([rows[i]["phash"] for i in alive], dtype=np.int64),
            self.config.dedup,
        )
        parts = split_by_shard(entries, len(self.dedup_shards))
        flags = ray.get([s.check_and_insert.remote(p) for s, p in zip(self.dedup_shards, parts)])
        exact, near = combine_flags(len(alive), parts, flags)
        for j, i in enumerate(alive):
            reason = "duplicate_exact" if exact[j] else "duplicate_near" if near[j] else None
            if reason:
                rows[i].update(drop_reason=reason, image=None)


def _check_output(output: str, storage: Storage, resume: bool, fingerprint: str):
    state = load_output_state(output, storage, clean=resume)
    has_content = bool(state.records) or state.manifest is not None
    if not resume:
        if has_content:
            raise CurationError(
                f"output {output} already holds a curation run; pass --resume to finish it, or "
                "choose an empty output folder"
            )
        if storage.list_files(output):
            raise CurationError(f"output {output} is not empty and holds no curation run")
    elif state.manifest is not None and state.manifest.get("config_hash") not in (None, fingerprint):
        raise CurationError(
            f"cannot resume {output}: it was written with config {state.manifest.get('config_hash')}, "
            f"this run's config is {fingerprint}; output-affecting settings must stay the same"
        )
    return state


def _rebuild_dedup(output, storage, state, shards, config) -> tuple[np.ndarray, int]:
    """Re-index every committed row's hashes; return the sorted key hashes already done."""
    cols = read_committed_columns(output, storage, state, ["key", "sha256", "phash"])
    keys = cols["key"]
    hashed = [i for i, s in enumerate(cols["sha256"]) if s is not None and cols["phash"][i] is not None]
    if hashed and shards:
        entries = make_entries([keys[i] for i in hashed], [cols["sha256"][i] for i in hashed],
                               np.array([cols["phash"][i] for i in hashed], dtype=np.int64),
                               config.dedup)
        parts = split_by_shard(entries, len(shards))
        ray.get([s.insert.remote(p) for s, p in zip(shards, parts)])
    return np.unique(key_owner(keys)) if keys else np.zeros(0, dtype=np.uint64), len(keys)


def run_image_curation(src: str, output: str, config: CurationConfig, *, resume: bool = False,
                       stream=sys.stderr) -> dict:
    """Curate image-text pairs from ``src`` into shards under ``output``; returns the run's stats.

    Raises:
        CurationError, InputError: with a message for a person, for bad inputs, outputs or configs.
    """
    started = time.monotonic()
    storage = Storage(config.storage)
    fingerprint = config_hash(output_affecting(config))
    state = _check_output(output, storage, resume, fingerprint)
    units = plan_inputs(src, config.input, storage)  # before anything is written
    storage.makedirs(output)
    if state.manifest is None:
        storage.write_bytes_atomic(join(output, MANIFEST_FILE), json.dumps({
            "schema_version": SCHEMA_VERSION, "status": "in_progress", "input": src,
            "config": to_dict(config), "config_hash": fingerprint, "shards": [],
        }, indent=2, ensure_ascii=False).encode())

    started_ray = ensure_ray(config.execution.ray_address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = config.execution.progress_bars
        ctx.print_on_execution_start = config.execution.progress_bars
        dedup = config.dedup
        placed = config.execution.node_resources or None  # where curation runs on a cluster
        shards = ([DedupShard.options(resources=placed).remote(dedup) for _ in range(dedup.shards)]
                  if (dedup.exact or dedup.near) else [])
        done, n_done = _rebuild_dedup(output, storage, state, shards, config)
        if n_done:
            print(f"[curate] resuming: {n_done:,} rows already committed in "
                  f"{len(state.records)} parts", file=stream, flush=True)
        done_ref = ray.put(done) if len(done) else None
        tracker = RunTracker.options(resources=placed).remote(state.next_part)

        cpus = max(1.0, ray.cluster_resources().get("CPU", 1.0))
        workers = config.execution.workers or max(1, int(cpus // config.execution.worker_cpus))
        pool = (ray.data.ActorPoolStrategy(min_size=1, max_size=config.execution.max_workers)
                if config.execution.max_workers else ray.data.ActorPoolStrategy(size=workers))
        if config.execution.max_workers:
            workers = config.execution.max_workers
        ds = ray.data.read_datasource(
            CaptionPairDatasource(units, config.input, storage, done_ref), num_cpus=0,
            resources=placed,
        )
        ds = ds.map_batches(
            ImageTextProcessor,
            fn_constructor_kwargs={"config": config, "dedup_shards": shards, "tracker": tracker},
            batch_size=config.execution.batch_size,
            batch_format="pyarrow",
            compute=pool,
            num_cpus=config.execution.worker_cpus,
            resources=placed,
        )
        sink = ShardDatasink(output, storage, config.output, tracker)
        print(f"[curate] {len(units)} input unit(s) from {src} -> {output} with {workers} worker(s)",
              file=stream, flush=True)
        with ProgressReporter(tracker, config.execution.progress_interval_s, stream):
            # Each write task holds up to one shard in memory: bound how many run at once.
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0, "resources": placed or {}},
                              concurrency=max(1, workers))
        final_state = load_output_state(output, storage, clean=False)
        rows_before = sum(r["rows"] + r["dropped"] for r in state.records)
        rows_after = sum(r["rows"] + r["dropped"] for r in final_state.records)
        stats = finalize_output(
            output, storage, final_state, config=to_dict(config), config_hash=fingerprint,
            input_uri=src, reject_samples=config.output.reject_samples_per_reason,
            extra={"rows_read_this_run": rows_after - rows_before,
                   "elapsed_s": round(time.monotonic() - started, 3)},
        )
        print(format_summary(stats, time.monotonic() - started, output), file=stream, flush=True)
        return stats
    finally:
        if started_ray:
            ray.shutdown()


__all__ = ["run_image_curation", "CurationError", "InputError", "ImageTextProcessor"]
