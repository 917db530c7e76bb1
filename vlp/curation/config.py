"""The curation configs (image-text and video-text): one typed section per component, composed here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from vlp.config import ConfigError, to_dict
from vlp.curation.dedup import DedupConfig
from vlp.curation.fetch import FetchConfig
from vlp.curation.filters import DEFAULT_FILTERS, DEFAULT_VIDEO_FILTERS, build_filters
from vlp.curation.image import ImageConfig
from vlp.curation.text import TextConfig
from vlp.curation.video import VideoConfig
from vlp.data.storage import StorageConfig

InputFormat = Literal["auto", "jsonl", "csv", "parquet", "folder", "webdataset"]


@dataclass(frozen=True)
class InputConfig:
    """What the input looks like.

    Attributes:
        format: ``auto`` picks by file extension (``.jsonl``/``.json``, ``.csv``, ``.parquet``, ``.tar``)
            or ``folder`` for a folder of images with sidecar ``.txt`` captions.
        caption_column, url_column, path_column, key_column, lang_column: manifest column names; a row
            needs a caption and either a url or a path (relative paths are relative to the manifest).
        start_column, end_column: a captioned segment of a video in seconds (optional; videos only).
        rows_per_block: rows per block read from a manifest (Ray Data's unit of work).
        files_per_task: images per read task for folder inputs.
    """

    format: InputFormat = "auto"
    caption_column: str = "caption"
    url_column: str = "url"
    path_column: str = "path"
    key_column: str = "key"
    lang_column: str = "lang"
    start_column: str = "start"
    end_column: str = "end"
    rows_per_block: int = 512
    files_per_task: int = 2000


OutputFormat = Literal["parquet", "webdataset"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)


@dataclass(frozen=True)
class OutputConfig:
    """Shards and side files.

    Attributes:
        format: what a shard is. ``parquet``: ``shard-NNNNNN.parquet`` with the columns of
            ``vlp/data/schema.py`` (what ``vlp train``, ``score``, ``select`` and ``eval`` read).
            ``webdataset``: ``shard-NNNNNN.tar`` in the WebDataset layout (per row ``<key>.jpg``
            (``.webp``), ``<key>.txt`` the caption, ``<key>.json`` every other non-pixel column, and
            for clips ``<key>.frameNNN.jpg`` per frame; keys percent-encoded, the original in the
            json), for OpenCLIP-style loaders, each with ``shard-NNNNNN.index.parquet`` beside it
            (its rows' non-pixel columns, for resume and dedup). The drop ledger, manifest and stats
            are the same in both; ``vlp train`` and the other readers refuse a webdataset folder.
        shard_rows: a shard closes at this many rows ...
        shard_bytes: ... or at this many bytes of encoded images, whichever comes first.
        compression: Parquet compression of the non-image columns (images are already compressed);
            with ``webdataset``, of the index files (tar members are stored as they are).
        reject_samples_per_reason: rejects per drop reason written to ``_rejects.jsonl``.
    """

    format: OutputFormat = "parquet"
    shard_rows: int = 10_000
    shard_bytes: int = 512 * 1024 * 1024
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    reject_samples_per_reason: int = 20

    def __post_init__(self):
        # load_config checks the Literal; a config built in code reaches the writer only through here.
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"output.format must be one of {list(OUTPUT_FORMATS)}, got {self.format!r}")
        if self.shard_rows < 1 or self.shard_bytes < 1024:
            raise ValueError("output.shard_rows must be >= 1 and output.shard_bytes >= 1024")


@dataclass(frozen=True)
class ExecutionConfig:
    """How the Ray Data job runs.

    Attributes:
        ray_address: an existing cluster (``auto`` or ``ray://...``); empty starts Ray in-process.
        workers: curation worker actors; 0 means one per CPU of the cluster.
        worker_cpus: CPUs each worker reserves (fractions let readers and writers run beside them).
        batch_size: rows per batch handed to a worker (the fetch concurrency is ``fetch.threads``).
        decode_threads: image computations (decode, resize, hash, encode) a worker runs at once;
            0 means one per reserved CPU. Fetches stay ``fetch.threads``-wide.
        progress_interval_s: seconds between progress lines.
        progress_bars: show Ray Data's own progress bars too.
        max_workers: on an autoscaling cluster, grow the worker pool from 1 up to this many actors
            (demand that makes the autoscaler add data nodes); 0 keeps the fixed ``workers`` pool.
        node_resources: custom resources every curation task and actor asks for, e.g.
            ``{data_node: 0.001}`` to keep curation on the CPU node type of ``ray_configs/clusters``
            (off the CPU-less head and off GPU nodes, which can then idle out). The run's tiny
            part-number tracker is the exception: it stays on the driver's node, whose fate it shares.
        stall_timeout_s: once a worker is up, a run in which no row moves on (to its next stage:
            fetch, decode, dedup, out of the worker, into a committed shard) for this long prints
            the rows in flight and fails with a one-line message; ``--resume`` then goes on. 0
            disables the check.
    """

    ray_address: str = ""
    workers: int = 0
    max_workers: int = 0
    node_resources: dict[str, float] = field(default_factory=dict)
    worker_cpus: float = 1.0
    batch_size: int = 256
    decode_threads: int = 0
    progress_interval_s: float = 5.0
    progress_bars: bool = False
    stall_timeout_s: float = 600.0

    def __post_init__(self):
        if self.progress_interval_s <= 0:
            raise ValueError("execution.progress_interval_s must be positive")
        if self.stall_timeout_s < 0:
            raise ValueError("execution.stall_timeout_s must be >= 0 (0: no stall check)")


@dataclass(frozen=True)
class CurationConfig:
    input: InputConfig = field(default_factory=InputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    filters: dict[str, dict[str, Any] | None] = field(default_factory=lambda: dict(DEFAULT_FILTERS))
    dedup: DedupConfig = field(default_factory=DedupConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self):
        _record_filters(self, self.filters, ("caption", "image"))


def _record_filters(config, filters: dict, stages: tuple[str, ...]) -> None:
    """Fail at load time, naming the filter, on a bad section or one that cannot run on this medium;
    then record every parameter, so that the manifest holds the whole config and equal settings hash
    equally."""
    built = build_filters(filters)
    full = {name: None for name in filters}
    for f in built.all():
        if f.stage not in stages:
            raise ConfigError(f"filter {type(f).name!r} works on {f.stage}s; it cannot run in this "
                              f"curation (filters here: {', '.join(stages)})")
        full[type(f).name] = to_dict(f)
    object.__setattr__(config, "filters", full)


@dataclass(frozen=True)
class VideoCurationConfig:
    """``vlp curate videos``: the image-text sections plus ``video`` (decoding, clips, frames).

    Videos are large: fetches may be bigger (``fetch.max_bytes``), and a processor batch holds few
    videos (``execution.batch_size``), so that one batch's clips stay one Ray Data block and commit
    together. ``execution.decode_threads`` is the number of decoder processes per worker (0: one per
    reserved CPU).
    """

    input: InputConfig = field(default_factory=InputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    fetch: FetchConfig = field(default_factory=lambda: FetchConfig(max_bytes=1024 * 1024 * 1024))
    text: TextConfig = field(default_factory=TextConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    filters: dict[str, dict[str, Any] | None] = field(
        default_factory=lambda: dict(DEFAULT_VIDEO_FILTERS))
    dedup: DedupConfig = field(default_factory=DedupConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(shard_rows=2000))
    execution: ExecutionConfig = field(default_factory=lambda: ExecutionConfig(batch_size=8))

    def __post_init__(self):
        _record_filters(self, self.filters, ("caption", "video", "clip"))


def output_affecting(config: CurationConfig | VideoCurationConfig) -> dict:
    """The parts of a config that change what is written (a resume must keep them equal)."""
    data = to_dict(config)
    for volatile in ("execution", "storage"):
        data.pop(volatile)
    data["fetch"] = {k: v for k, v in data["fetch"].items() if k in ("max_bytes",)}
    data["output"].pop("reject_samples_per_reason")
    if data["output"]["format"] == "parquet":  # the fingerprint of runs made before the option existed
        data["output"].pop("format")
    if "video" in data:
        # how the decoder is run changes nothing written (the backend does: frames may differ a little)
        for volatile in ("timeout_s", "max_decodes_per_worker", "max_worker_memory_mb"):
            data["video"].pop(volatile, None)
    return data
