"""Image-text curation on Ray Data: raw pairs in, Arrow/Parquet shards with manifest and stats out.

The job (reading, dedup actors, shard commits, resume) is ``pipelines.curation_job``; the per-row work
is ``vlp.curation.pair.curate_pair``. This module is the processor that joins them.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from pipelines.curation_job import CurationError, mark_duplicates, report_batch, run_curation
from pipelines.progress import RowActivity, activity_interval
from pipelines.sources import InputError
from vlp.curation.config import CurationConfig
from vlp.curation.fetch import REMOTE_SCHEMES, Fetcher
from vlp.curation.filters import build_filters
from vlp.curation.image import limit_native_threads
from vlp.curation.pair import PROCESSED_COLUMNS, PairSettings, curate_pair
from vlp.curation.text import warm_up
from vlp.data.schema import IMAGE_TEXT_SCHEMA, ShardKind
from vlp.data.storage import Storage

logger = logging.getLogger(__name__)

PROCESSED_SCHEMA = pa.schema(
    [IMAGE_TEXT_SCHEMA.field(c).with_nullable(True) for c in PROCESSED_COLUMNS
     if c in IMAGE_TEXT_SCHEMA.names]
    + [pa.field("drop_reason", pa.string()), pa.field("drop_detail", pa.string())]
)


class ImageTextProcessor:
    """Ray Data callable class: a batch of source rows in, processed rows (kept or dropped) out."""

    def __init__(self, config: CurationConfig, dedup_shards: list, tracker=None):
        self.config = config
        self.storage = Storage(config.storage)
        self.fetcher = Fetcher(config.fetch, self.storage)
        self.settings = PairSettings(config.text, config.image, build_filters(config.filters))
        self.dedup_shards = dedup_shards
        self.tracker = tracker
        # Which stage each row is in, for the stall check (reports only when it is on).
        self.activity = RowActivity(tracker if config.execution.stall_timeout_s else None,
                                    activity_interval(config.execution))
        self.pool = ThreadPoolExecutor(config.fetch.threads, thread_name_prefix="curate")
        cpus = max(1, round(config.execution.worker_cpus))
        self.cpu_gate = threading.BoundedSemaphore(config.execution.decode_threads or cpus)
        limit_native_threads(cpus)
        warm_up(config.text)

    def curate_row(self, raw: dict, token: int | None = None) -> dict:
        """One source row through ``curate_pair`` with this worker's fetcher, settings and CPU gate
        (no dedup: that needs the whole batch). ``token``: the row's ``RowActivity`` token, whose
        stage follows the row (``fetch``, then ``decode``: probe, decode, resize, encode)."""
        if token is None:
            return curate_pair(raw, self.fetcher.fetch, self.settings, self.cpu_gate)

        def fetch(source: str) -> bytes:
            self.activity.move(token, "fetch")
            try:
                return self.fetcher.fetch(source)
            finally:
                self.activity.move(token, "decode")

        self.activity.move(token, "decode")
        row = curate_pair(raw, fetch, self.settings, self.cpu_gate)
        self.activity.move(token, "batched")  # done; waits for the rest of its batch
        return row

    def __call__(self, batch: pa.Table) -> pa.Table:
        raws = batch.to_pylist()
        tokens = self.activity.enter([(r["key"], r["source"]) for r in raws])
        try:
            # Remote sources wait on the network: fetch them on the thread pool. Local files and
            # embedded bytes are CPU-bound: run them right here (more threads would only fight over
            # the GIL), overlapping with the remote fetches still in flight.
            remote = {i: self.pool.submit(self.curate_row, r, tokens[i]) for i, r in enumerate(raws)
                      if r["data"] is None and r["source"].startswith(REMOTE_SCHEMES)}
            rows = [None if i in remote else self.curate_row(r, tokens[i])
                    for i, r in enumerate(raws)]
            for i, future in remote.items():
                rows[i] = future.result()
            self.activity.move(tokens, "dedup")
            mark_duplicates(rows, self.dedup_shards, self.config.dedup)
            report_batch(self.tracker, rows)
            return pa.Table.from_pylist(rows, schema=PROCESSED_SCHEMA)
        finally:
            self.activity.leave(tokens)

    def __del__(self):
        activity = getattr(self, "activity", None)
        if activity is not None:
            activity.close()


def run_image_curation(src: str, output: str, config: CurationConfig, *, resume: bool = False,
                       stream=None) -> dict:
    """Curate image-text pairs from ``src`` into shards under ``output``; returns the run's stats.

    ``stream``: where progress and the summary go (default: ``sys.stderr`` at the time of the call).

    Raises:
        CurationError, InputError: with a message for a person, for bad inputs, outputs or configs.
    """
    return run_curation(src, output, config, media="image", processor=ImageTextProcessor,
                        kind=ShardKind.IMAGE_TEXT, resume=resume, stream=stream)


__all__ = ["run_image_curation", "CurationError", "InputError", "ImageTextProcessor"]
