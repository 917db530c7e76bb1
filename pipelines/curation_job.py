"""The curation job shared by images and videos: output checks, resume, the Ray Data wiring.

    read (CaptionPairDatasource) -> processor actors -> ShardDatasink
                                          |  check-and-insert
                                          v
                                   DedupShard actors (dataset-wide index)

``run_curation`` is the whole job; what differs between media is the processor class (a Ray Data
callable: a batch of source rows in, processed rows, kept or dropped, out) and the shard schema. Readers
and writers reserve no CPU (they are light, and on a small machine CPU-reserving consumers would starve
them); the processor actors reserve ``execution.worker_cpus`` each.

Losing a node (curation nodes are spot instances in ``ray_configs/clusters``): Ray Data retries the
lost read and write tasks and restarts the lost processor actors; a lost ``DedupShard`` is restarted
and rebuilds its share of the index from the committed parts; the ``RunTracker`` (part numbers) lives
on the driver's node, so it is lost only with the driver. What cannot go on (no node left for an
actor, a lost object that cannot be rebuilt) ends the run with a one-line ``CurationError``; the
committed parts stay, and ``--resume`` finishes the run.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections import Counter
from contextlib import nullcontext

import numpy as np
import ray
# Ray Data's execution-callback interface (registered through the public
# DataContext.custom_execution_callback_classes); Ray is pinned to 2.60.x in pyproject.toml.
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data.exceptions import ExecutionTimeoutError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.ray_runtime import ensure_ray

from vlp.config import config_hash, to_dict
from vlp.curation.config import output_affecting
from vlp.curation.dedup import (DedupConfig, DedupEntries, DedupIndex, combine_flags, key_owner,
                                make_entries, split_by_shard)
from vlp.data.schema import (MANIFEST_FILE, PIXEL_COLUMNS, SCHEMA_VERSION, STATUS_IN_PROGRESS,
                             ShardKind)
from vlp.data.storage import Storage, StorageConfig, join
from pipelines.progress import ProgressReporter, RunTracker, StallWatchdog, format_summary
from pipelines.shard_sink import (
    ShardDatasink,
    finalize_output,
    load_output_state,
    read_committed_columns,
)
from pipelines.sources import CaptionPairDatasource, plan_inputs

logger = logging.getLogger(__name__)


class CurationError(RuntimeError):
    """A curation run cannot start or finish; the message says why and what to do."""


class CurationStalled(ExecutionTimeoutError):
    """Raised inside Ray Data's execution loop when the run's ``StallWatchdog`` saw no row move on.

    An ``ExecutionTimeoutError``, so that Ray Data shuts the execution down (releasing its workers) and
    passes the error on without printing its own internal stack trace."""


# The watchdogs of the runs executing in this process. Ray Data builds execution callbacks from
# classes (``DataContext.custom_execution_callback_classes``) and ships the context to its tasks, so
# the class is a plain importable one and finds its run's watchdog here.
_WATCHDOGS: list[StallWatchdog] = []


class AbortWhenStalled(ExecutionCallback):
    """Fails the Ray Data execution of a curation run at its next scheduling step once the run's
    watchdog reports a stall."""

    def on_execution_step(self, executor) -> None:
        for watchdog in tuple(_WATCHDOGS):  # a run may end meanwhile
            if watchdog.stalled.is_set():
                raise CurationStalled(watchdog.message)


@ray.remote(num_cpus=0)
class DedupShard:
    """One shard of the dataset-wide dedup index; calls are serialised, so check-and-insert is atomic.

    Created with ``max_restarts`` and ``max_task_retries`` (``_start_dedup_shards``): when its process
    or node is lost, Ray starts it again and re-sends the calls that had no answer. A restarted shard
    first rebuilds its share of the index from the parts committed to ``output`` so far (the same rows
    a ``--resume`` would index). Rows that the lost shard had answered but that were not committed yet
    are not in the rebuilt index: a copy of one of them that arrives later can be kept too. The run
    reports how many shards it lost (``dedup_shards_lost`` in ``_stats.json``).
    """

    def __init__(self, config: DedupConfig, shard: int = 0, shards: int = 1, output: str = "",
                 storage: StorageConfig | None = None):
        self.index = DedupIndex(config)
        self.rebuilt_rows = None
        with warnings.catch_warnings():
            # Ray 2.60's was_current_actor_reconstructed reads its own deprecated ``actor_id``.
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if output and restarted:
            self.rebuilt_rows = self._rebuild(config, shard, shards, output,
                                              Storage(storage or StorageConfig()))

    def _rebuild(self, config, shard: int, shards: int, output: str, storage: Storage) -> int:
        # clean=False: the run is still writing; only the driver deletes uncommitted files.
        state = load_output_state(output, storage, clean=False)
        cols = read_committed_columns(output, storage, state, ["key", "sha256", "phash"], ledgers=False)
        entries = committed_entries(cols, config)
        if entries is not None:
            self.index.insert(split_by_shard(entries, shards)[shard])
        logger.warning("dedup shard %d of %d restarted: index rebuilt from %d committed rows",
                       shard, shards, len(cols["key"]))
        return len(cols["key"])

    def check_and_insert(self, entries):
        return self.index.check_and_insert(entries)

    def insert(self, entries):
        self.index.insert(entries)

    def size(self):
        return self.index.size()

    def rebuilt(self) -> int | None:
        """How many committed rows this shard re-indexed after a restart (None: never restarted)."""
        return self.rebuilt_rows


def committed_entries(cols: dict[str, list], config: DedupConfig) -> DedupEntries | None:
    """Index entries of the committed rows that have hashes (``read_committed_columns`` with ``key``,
    ``sha256`` and ``phash``); None when there are none."""
    hashed = [i for i, s in enumerate(cols["sha256"]) if s is not None and cols["phash"][i] is not None]
    if not hashed:
        return None
    return make_entries([cols["key"][i] for i in hashed], [cols["sha256"][i] for i in hashed],
                        np.array([cols["phash"][i] for i in hashed], dtype=np.int64), config)


def _start_dedup_shards(config, output: str, placed: dict | None) -> list:
    """The run's ``DedupShard`` actors (none with dedup off), on the curation nodes (``placed``).

    Restartable without limit, with their calls retried: a lost node must not end the run (Ray's
    default for actors is no restart, and a call to a dead actor raises in the processor)."""
    dedup = config.dedup
    if not (dedup.exact or dedup.near):
        return []
    return [DedupShard.options(resources=placed, max_restarts=-1, max_task_retries=-1)
            .remote(dedup, i, dedup.shards, output, config.storage) for i in range(dedup.shards)]


def mark_duplicates(rows: list[dict], dedup_shards: list, config) -> None:
    """Check the kept rows' hashes against the dataset-wide index (inserting them); rows found there
    become ``duplicate_exact`` or ``duplicate_near`` drops, and lose their pixels."""
    alive = [i for i, r in enumerate(rows) if r["drop_reason"] is None]
    if not alive or not dedup_shards:
        return
    entries = make_entries(
        [rows[i]["key"] for i in alive],
        [rows[i]["sha256"] for i in alive],
        np.array([rows[i]["phash"] for i in alive], dtype=np.int64),
        config,
    )
    parts = split_by_shard(entries, len(dedup_shards))
    flags = ray.get([s.check_and_insert.remote(p) for s, p in zip(dedup_shards, parts)])
    exact, near = combine_flags(len(alive), parts, flags)
    for j, i in enumerate(alive):
        reason = "duplicate_exact" if exact[j] else "duplicate_near" if near[j] else None
        if reason:
            rows[i]["drop_reason"] = reason
            for column in PIXEL_COLUMNS:  # a dropped row keeps no pixels
                if column in rows[i]:
                    rows[i][column] = None


def report_batch(tracker, rows: list[dict]) -> None:
    """Tell the run's tracker how many rows a batch processed, kept and dropped (per reason)."""
    if tracker is None:
        return
    drops = Counter(r["drop_reason"] for r in rows if r["drop_reason"])
    tracker.processed_batch.remote(len(rows), len(rows) - sum(drops.values()), dict(drops))


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


def _rebuild_dedup(output, storage, state, shards, config, done_column: str) -> tuple[np.ndarray, int]:
    """Re-index the committed kept rows' hashes; return the sorted hashes of the source keys already
    done (``done_column``: ``key`` for images, ``video_id`` for the clips of a video; kept or
    dropped) and how many rows are committed."""
    done_keys = read_committed_columns(output, storage, state, [done_column])[done_column]
    # Only the kept rows' hashes: a duplicate in the ledger may have been dropped for a row whose
    # shard was never committed; indexing it would drop that row's second try as well.
    cols = read_committed_columns(output, storage, state, ["key", "sha256", "phash"], ledgers=False)
    entries = committed_entries(cols, config.dedup) if shards else None
    if entries is not None:
        parts = split_by_shard(entries, len(shards))
        ray.get([s.insert.remote(p) for s, p in zip(shards, parts)])
    done = np.unique(key_owner(done_keys)) if done_keys else np.zeros(0, dtype=np.uint64)
    return done, len(done_keys)


# Errors that mean part of the cluster went away (a node, a worker process, an object only it held),
# as opposed to a bug: the run cannot go on, but the committed parts are good and --resume finishes.
_CLUSTER_LOSS = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError,
                 ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError,
                 ray.exceptions.LocalRayletDiedError, ray.exceptions.RaySystemError,
                 ray.exceptions.ActorUnschedulableError, ray.exceptions.TaskUnschedulableError)


def cluster_loss(error: BaseException) -> str | None:
    """A one-line description of ``error`` when it (or what caused it) is a loss of part of the Ray
    cluster; None for any other error."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, _CLUSTER_LOSS):
            # RayTaskError(X) subclasses X: name the cause, not the wrapper and its remote traceback.
            cause = e.cause if isinstance(e, ray.exceptions.RayTaskError) and e.cause else e
            name = type(cause).__name__.replace("RayTaskError(", "").rstrip(")")
            detail = str(cause).strip().splitlines()
            detail = next((line.strip() for line in detail if line.strip()), "")
            return f"{name}: {detail[:300]}" if detail else name
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return None


def _lost_shards(shards: list, timeout_s: float = 30) -> int:
    """How many of the run's dedup shards were lost during the run: restarted (and rebuilt), or not
    answering now (lost after their last use, with no node to restart them on)."""
    if not shards:
        return 0
    refs = [s.rebuilt.remote() for s in shards]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    lost = 0
    for ref in refs:
        try:
            lost += ref not in ready or ray.get(ref) is not None
        except ray.exceptions.RayError:
            lost += 1
    return lost


def run_curation(src: str, output: str, config, *, media: str, processor, kind: ShardKind,
                 resume: bool = False, stream=None) -> dict:
    """Curate pairs from ``src`` into shards under ``output``; returns the run's stats.

    ``config``: a curation config (``CurationConfig`` or ``VideoCurationConfig``: input, storage, dedup,
    output and execution sections); ``processor``: the Ray Data callable class, built with ``config``,
    ``dedup_shards`` and ``tracker``; ``kind``: what the shards hold (their schema, and the column that
    names finished source rows: resume skips them at the reader).

    Raises:
        CurationError, InputError: with a message for a person, for bad inputs, outputs or configs.
    """
    started = time.monotonic()
    # Looked up per call, not bound at import: whoever redirects stderr later (a CLI wrapper, a test
    # capturing it) gets the progress lines and the stall report.
    stream = stream or sys.stderr
    storage = Storage(config.storage)
    fingerprint = config_hash(output_affecting(config))
    state = _check_output(output, storage, resume, fingerprint)
    units = plan_inputs(src, config.input, storage, media)  # before anything is written
    storage.makedirs(output)
    if state.manifest is None:
        storage.write_bytes_atomic(join(output, MANIFEST_FILE), json.dumps({
            "schema_version": SCHEMA_VERSION, "status": STATUS_IN_PROGRESS, "kind": kind.value,
            "format": config.output.format, "input": src,
            "config": to_dict(config), "config_hash": fingerprint, "shards": [],
        }, indent=2, ensure_ascii=False).encode())

    # A curation-only run has no use for the dashboard; a run inside `vlp quickstart` joins the Ray the
    # quickstart started (with its dashboard, which training needs).
    started_ray = ensure_ray(config.execution.ray_address, dashboard=False)
    watchdog = None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = config.execution.progress_bars
        ctx.print_on_execution_start = config.execution.progress_bars
        placed = config.execution.node_resources or None  # where curation runs on a cluster
        shards = _start_dedup_shards(config, output, placed)
        done, n_done = _rebuild_dedup(output, storage, state, shards, config, kind.source_key_column)
        if n_done:
            print(f"[curate] resuming: {n_done:,} rows already committed in "
                  f"{len(state.records)} parts", file=stream, flush=True)
        done_ref = ray.put(done) if len(done) else None
        # The tracker hands out part numbers: a restarted one would hand out committed numbers again,
        # so it must not be lost while the run goes on. It is tiny; it shares the driver's node (the
        # head, for a submitted job), and so its fate: lost only when the run is lost anyway.
        driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                     soft=False)
        tracker = RunTracker.options(scheduling_strategy=driver_node).remote(state.next_part)
        if config.execution.stall_timeout_s:
            watchdog = StallWatchdog(tracker, config.execution.stall_timeout_s, stream)
            _WATCHDOGS.append(watchdog)
            if AbortWhenStalled not in ctx.custom_execution_callback_classes:
                ctx.custom_execution_callback_classes.append(AbortWhenStalled)

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
            processor,
            fn_constructor_kwargs={"config": config, "dedup_shards": shards, "tracker": tracker},
            batch_size=config.execution.batch_size,
            batch_format="pyarrow",
            compute=pool,
            num_cpus=config.execution.worker_cpus,
            resources=placed,
        )
        sink = ShardDatasink(output, storage, config.output, tracker, kind=kind)
        print(f"[curate] {len(units)} input unit(s) from {src} -> {output} with {workers} worker(s)",
              file=stream, flush=True)
        try:
            with ProgressReporter(tracker, config.execution.progress_interval_s, stream), \
                    (watchdog or nullcontext()):
                # Each write task holds up to one shard in memory: bound how many run at once.
                ds.write_datasink(sink, ray_remote_args={"num_cpus": 0, "resources": placed or {}},
                                  concurrency=max(1, workers))
        except CurationStalled as e:
            raise CurationError(str(e)) from None
        except Exception as e:
            lost = cluster_loss(e)
            if lost is None:
                raise
            raise CurationError(
                f"the run lost part of the Ray cluster and could not go on ({lost}); the parts "
                "committed so far are kept: rerun with --resume to finish") from None
        # No write of this run is in flight any more: files of writes that a lost node left half
        # done (retried elsewhere) are removed, as --resume would.
        final_state = load_output_state(output, storage, clean=True)
        rows_before = sum(r["rows"] + r["dropped"] for r in state.records)
        rows_after = sum(r["rows"] + r["dropped"] for r in final_state.records)
        lost_shards = _lost_shards(shards)
        if lost_shards:
            print(f"[curate] warning: {lost_shards} dedup index shard(s) were lost during the run and "
                  "rebuilt from the committed parts; a copy of a row that was in flight at that "
                  "moment may have been kept too", file=stream, flush=True)
        stats = finalize_output(
            output, storage, final_state, config=to_dict(config), config_hash=fingerprint,
            input_uri=src, reject_samples=config.output.reject_samples_per_reason,
            extra={"rows_read_this_run": rows_after - rows_before,
                   "elapsed_s": round(time.monotonic() - started, 3),
                   "dedup_shards_lost": lost_shards},
            kind=kind, output_format=config.output.format,
        )
        print(format_summary(stats, time.monotonic() - started, output), file=stream, flush=True)
        return stats
    finally:
        if watchdog is not None:
            _WATCHDOGS.remove(watchdog)
            if not _WATCHDOGS and AbortWhenStalled in ctx.custom_execution_callback_classes:
                ctx.custom_execution_callback_classes.remove(AbortWhenStalled)
        if started_ray:
            ray.shutdown()
