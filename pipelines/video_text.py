"""Video-text curation on Ray Data: raw videos with captions in, clip shards with manifest and stats out.

The job (reading, dedup actors, atomic shard commits, resume) is ``pipelines.curation_job``, shared with
images. This module is the processor: per source row it checks the caption (no I/O), fetches remote
videos, and hands the file to a ``VideoDecodePool``, whose child processes probe, filter, cut clips,
sample and encode frames under a time limit (decord can hang or leak; a child that does is killed and
replaced, and the file becomes a counted drop). Each clip becomes a row (key ``<row key>#<clip>``), all
clips of a source row leave in one batch, and the sink commits a batch's rows together, so resume
(which skips finished source rows by ``video_id``) never finds a video half written.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from pipelines.curation_job import CurationError, mark_duplicates, report_batch, run_curation
from pipelines.progress import RowActivity, activity_interval
from pipelines.sources import InputError
from vlp.curation.config import VideoCurationConfig
from vlp.curation.drops import DropError
from vlp.curation.fetch import REMOTE_SCHEMES, Fetcher
from vlp.curation.filters import build_filters
from vlp.curation.pair import check_caption
from vlp.curation.text import warm_up
from vlp.curation.video import VideoResult
from vlp.curation.video_worker import VideoDecodePool
from vlp.data.schema import VIDEO_TEXT_SCHEMA, ShardKind
from vlp.data.storage import Storage

logger = logging.getLogger(__name__)

VIDEO_PROCESSED_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in VIDEO_TEXT_SCHEMA]
    + [pa.field("drop_reason", pa.string()), pa.field("drop_detail", pa.string())]
)


def clip_key(video_key: str, index: int) -> str:
    return f"{video_key}#{index}"


def clip_digest(file_sha256: str, start_s: float, end_s: float) -> str:
    """A clip's exact-duplicate identity: the same bytes cut at the same place."""
    return hashlib.sha256(f"{file_sha256}:{start_s:.3f}:{end_s:.3f}".encode()).hexdigest()


def _drop(key: str, source: str, caption, reason: str, detail=None, video_id: str | None = None) -> dict:
    row = dict.fromkeys(VIDEO_PROCESSED_SCHEMA.names)
    row.update(key=key, source=source, caption=caption, video_id=video_id or key,
               drop_reason=reason, drop_detail=detail)
    return row


def clip_rows(key: str, source: str, caption: str, lang: str, result: VideoResult,
              image_format: str) -> list[dict]:
    """The processed rows of a decoded video: one per clip, kept or dropped."""
    if result.drop_reason:
        return [_drop(key, source, caption, result.drop_reason, result.drop_detail)]
    if not result.clips:
        return [_drop(key, source, caption, "no_clips", "no clip could be planned")]
    rows = []
    for clip in result.clips:
        ck = clip_key(key, clip.index)
        if clip.drop_reason:
            rows.append(_drop(ck, source, caption, clip.drop_reason, clip.drop_detail, video_id=key))
            continue
        rows.append({
            "key": ck, "caption": caption, "lang": lang, "source": source,
            "image": clip.frames[len(clip.frames) // 2], "image_format": image_format,
            "width": clip.width, "height": clip.height,
            "orig_width": result.orig_width, "orig_height": result.orig_height,
            "sha256": clip_digest(result.sha256, clip.start_s, clip.end_s), "phash": clip.phash,
            "frames": clip.frames, "frame_times_s": clip.frame_times_s,
            "num_frames": len(clip.frames), "fps": result.fps, "duration_s": result.duration_s,
            "clip_start_s": clip.start_s, "clip_end_s": clip.end_s, "clip_index": clip.index,
            "video_id": key, "motion": clip.motion,
            "drop_reason": None, "drop_detail": None,
        })
    return rows


class VideoTextProcessor:
    """Ray Data callable class: a batch of source rows in, clip rows (kept or dropped) out."""

    def __init__(self, config: VideoCurationConfig, dedup_shards: list, tracker=None):
        self.config = config
        self.storage = Storage(config.storage)
        self.fetcher = Fetcher(config.fetch, self.storage)
        self.filters = build_filters(config.filters)
        self.dedup_shards = dedup_shards
        self.tracker = tracker
        # Which stage each video is in, for the stall check (reports only when it is on).
        self.activity = RowActivity(tracker if config.execution.stall_timeout_s else None,
                                    activity_interval(config.execution))
        decoders = config.execution.decode_threads or max(1, round(config.execution.worker_cpus))
        self.decoders = VideoDecodePool(config.video, self.filters, workers=decoders)
        # Threads wait on fetches and on decoder processes, never compute: one per fetch slot.
        self.threads = ThreadPoolExecutor(max(decoders, config.fetch.threads),
                                          thread_name_prefix="curate-video")
        warm_up(config.text)

    def _media(self, raw: dict, token: int) -> str | bytes:
        """What the decoder reads: embedded bytes, fetched bytes, or a local path as it is."""
        if raw["data"] is not None:
            return raw["data"]
        source = raw["source"]
        if source.startswith(REMOTE_SCHEMES):
            self.activity.move(token, "fetch")
            return self.fetcher.fetch(source)
        return self.fetcher.local_file(source)

    def _one(self, raw: dict, token: int) -> list[dict]:
        try:
            return self._one_video(raw, token)
        finally:
            self.activity.move(token, "batched")  # done; waits for the rest of its batch

    def _one_video(self, raw: dict, token: int) -> list[dict]:
        key, source = raw["key"], raw["source"]
        if raw.get("drop_reason"):
            return [_drop(key, source, raw.get("caption"), raw["drop_reason"], raw.get("drop_detail"))]
        try:
            verdict = check_caption(raw.get("caption"), self.config.text, self.filters)
            if verdict.drop_reason:
                return [_drop(key, source, verdict.caption, verdict.drop_reason, verdict.drop_detail)]
            try:
                media = self._media(raw, token)
            except DropError as e:
                return [_drop(key, source, verdict.caption, e.reason, e.detail)]
            self.activity.move(token, "decode")
            segment = None
            if raw.get("start") is not None or raw.get("end") is not None:
                segment = (raw.get("start") or 0.0, raw.get("end") if raw.get("end") is not None
                           else float("inf"))
            result = self.decoders.process(media, segment)
            return clip_rows(key, source, verdict.caption, verdict.lang, result,
                             self.config.video.frame.format)
        except Exception as e:  # a bug or an exotic library error costs one video, not the run
            logger.exception("unexpected error on %s", key)
            return [_drop(key, source, raw.get("caption"), "internal_error",
                          f"{type(e).__name__}: {e}"[:300])]

    def __call__(self, batch: pa.Table) -> pa.Table:
        raws = batch.to_pylist()
        tokens = self.activity.enter([(r["key"], r["source"]) for r in raws])
        try:
            futures = [self.threads.submit(self._one, raw, token) for raw, token in zip(raws, tokens)]
            rows = [row for future in futures for row in future.result()]
            self.activity.move(tokens, "dedup")
            mark_duplicates(rows, self.dedup_shards, self.config.dedup)
            report_batch(self.tracker, rows)
            return pa.Table.from_pylist(rows, schema=VIDEO_PROCESSED_SCHEMA)
        finally:
            self.activity.leave(tokens)

    def __del__(self):
        activity = getattr(self, "activity", None)
        if activity is not None:
            activity.close()
        decoders = getattr(self, "decoders", None)
        if decoders is not None:
            decoders.close()


def run_video_curation(src: str, output: str, config: VideoCurationConfig, *, resume: bool = False,
                       stream=None) -> dict:
    """Curate video-text pairs from ``src`` into clip shards under ``output``; returns the run's stats.

    ``stream``: where progress and the summary go (default: ``sys.stderr`` at the time of the call).

    Raises:
        CurationError, InputError: with a message for a person, for bad inputs, outputs or configs.
    """
    return run_curation(src, output, config, media="video", processor=VideoTextProcessor,
                        kind=ShardKind.VIDEO_TEXT, resume=resume, stream=stream)


__all__ = ["run_video_curation", "CurationError", "InputError", "VideoTextProcessor", "clip_rows"]
