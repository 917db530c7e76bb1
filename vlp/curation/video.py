"""Video transforms: probe, index, plan clips, sample frames, decode, score motion, hash and encode.

``process_video`` is the whole per-file transform on a local path. It never raises for bad input: the
``VideoResult`` carries a drop reason instead. It runs inside ``vlp.curation.video_worker``'s child
processes, which add the time limit and the crash isolation that a decoder written in C needs.

Cheap checks come first. The container header gives the frame size, so ``video_too_large`` is decided
before anything else is read; the packet index gives the real frame timestamps, so the frame count,
rate and duration that the video filters see are those of what can be decoded, not what the header
claims; only the frames that the clip plan samples are decoded, a few at a time.

Frame indices are positions in presentation order and every time is in seconds from the first frame.
Times map to frames through the real timestamps (never ``index / fps``), so variable frame rate files
sample correctly.

Decoders live in ``vlp.curation.video_backends`` (``VIDEO_BACKENDS``). New clip plans go in
``plan_clips``, new samplers in ``sample_indices``; both are pure functions of the frame timestamps.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import numpy as np
from PIL import Image

from vlp.curation.drops import DropError
from vlp.curation.filters import ClipItem, FilterSet, VideoItem
from vlp.curation.image import ImageConfig, encode_pixels, perceptual_hash, resize_pixels
from vlp.curation.video_backends import (
    VIDEO_BACKENDS,
    VideoHeader,
    VideoInfo,
    VideoReader,
    open_video,
    read_header,
)

__all__ = [  # the backends' public names, re-exported: callers need only this module
    "VIDEO_BACKENDS", "VideoHeader", "VideoInfo", "VideoReader", "open_video",
    "read_header", "VideoConfig", "ClipResult", "VideoResult", "process_video", "plan_clips",
    "sample_indices", "motion_pair_indices", "window_spans", "scene_cuts", "motion_score",
]

logger = logging.getLogger(__name__)

DROP_REASONS = (
    "empty_file", "not_a_video", "no_video_stream", "corrupt_video", "zero_frames", "video_too_large",
    "bad_timestamps", "decode_timeout", "decoder_crash", "internal_error", "clip_too_short",
)
# What a second backend may judge differently; header-level verdicts are shared by both backends.
_RETRY_REASONS = {"corrupt_video", "zero_frames", "bad_timestamps"}

_MOTION_SIDE = 64  # grey thumbnail side for motion scores
_SCENE_SIDE = 32  # grey thumbnail side for scene cuts
_READ_CHUNK = 8  # frames decoded at full resolution at once (4K RGB is 25 MB a frame)


@dataclass(frozen=True)
class VideoConfig:
    """Decoding, clip planning, frame sampling and output of videos.

    Attributes:
        backend: decoder tried first.
        fallback: decoder tried when the first one rejects a file (``none``: no second try).
        threads: decoder threads per file; 0 lets FFmpeg choose. Parallelism comes from the worker
            processes, so 1 is right unless a worker has cores to itself.
        clips: ``segment``: one clip, the captioned ``[start, end]`` given with the row or the whole
            video; ``window``: windows of ``window_s`` every ``stride_s``; ``scene``: one clip per shot,
            cut where consecutive frames differ by more than ``scene_threshold``. Windows and scenes are
            planned inside the segment when a row gives one.
        window_s: window length in seconds.
        stride_s: seconds between window starts (less than ``window_s`` overlaps).
        scene_threshold: mean absolute grey-level difference (0..1) of two 32x32 frames that counts as
            a cut.
        scene_sample_fps: frames per second compared by the scene detector (scene plans decode this
            many frames per second of video); a cut found between two samples is bisected down to the
            first frame of the new shot.
        min_clip_s: planned clips shorter than this are dropped as ``clip_too_short``.
        max_clips: most clips per video; more are thinned evenly over the video.
        sampling: ``uniform``: ``num_frames`` frames, the centres of equal time bins of the clip;
            ``sparse`` (ClipBERT): ``sparse_clips`` runs of ``frames_per_sparse_clip`` consecutive
            frames, centred on equal time bins.
        num_frames: frames per clip for ``uniform``.
        sparse_clips: runs per clip for ``sparse``.
        frames_per_sparse_clip: consecutive frames per run for ``sparse``.
        frame: resize, format and quality of the stored frames (its ``max_pixels`` is not used).
        max_pixels: videos whose frame has more pixels are dropped as ``video_too_large`` from the
            header, before any decoding.
        motion_pairs: frame pairs per clip whose grey-level change gives the motion score.
        motion_gap_s: a pair is a frame and the frame on screen this long after it (at least the next
            frame). A fixed time rather than the next frame keeps scores comparable across frame
            rates and counts motion in videos that repeat each frame (12 fps content in 24 fps
            files); the default equals the next frame at 8 fps. 0 pairs each frame with the next.
        timeout_s: time limit per file in a worker process.
        max_decodes_per_worker: a worker process is replaced after this many files.
        max_worker_memory_mb: a worker process is replaced when its resident memory exceeds this.
    """

    backend: Literal["decord", "pyav"] = "decord"
    fallback: Literal["pyav", "decord", "none"] = "pyav"
    threads: int = 1
    clips: Literal["segment", "window", "scene"] = "segment"
    window_s: float = 4.0
    stride_s: float = 4.0
    scene_threshold: float = 0.1
    scene_sample_fps: float = 4.0
    min_clip_s: float = 0.5
    max_clips: int = 32
    sampling: Literal["uniform", "sparse"] = "uniform"
    num_frames: int = 8
    sparse_clips: int = 4
    frames_per_sparse_clip: int = 2
    frame: ImageConfig = field(default_factory=lambda: ImageConfig(size=224, quality=90))
    max_pixels: int = 3840 * 2160
    motion_pairs: int = 4
    motion_gap_s: float = 0.125
    timeout_s: float = 60.0
    max_decodes_per_worker: int = 200
    max_worker_memory_mb: int = 2048

    def __post_init__(self):
        if self.backend not in VIDEO_BACKENDS:
            raise ValueError(f"video.backend must be one of {VIDEO_BACKENDS.names()}, got {self.backend!r}")
        if self.fallback != "none" and self.fallback not in VIDEO_BACKENDS:
            raise ValueError(
                f"video.fallback must be 'none' or one of {VIDEO_BACKENDS.names()}, got {self.fallback!r}"
            )
        if self.clips not in ("segment", "window", "scene"):
            raise ValueError(f"video.clips must be segment, window or scene, got {self.clips!r}")
        if self.sampling not in ("uniform", "sparse"):
            raise ValueError(f"video.sampling must be uniform or sparse, got {self.sampling!r}")
        positive = {
            "window_s": self.window_s, "stride_s": self.stride_s, "scene_sample_fps": self.scene_sample_fps,
            "timeout_s": self.timeout_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"video.{name} must be positive, got {value}")
        at_least_one = {
            "max_clips": self.max_clips, "num_frames": self.num_frames, "sparse_clips": self.sparse_clips,
            "frames_per_sparse_clip": self.frames_per_sparse_clip, "max_pixels": self.max_pixels,
            "motion_pairs": self.motion_pairs, "max_decodes_per_worker": self.max_decodes_per_worker,
        }
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"video.{name} must be at least 1, got {value}")
        if not 0 < self.scene_threshold <= 1:
            raise ValueError(f"video.scene_threshold must be in (0, 1], got {self.scene_threshold}")
        if self.min_clip_s < 0 or self.motion_gap_s < 0:
            raise ValueError(f"video.min_clip_s and video.motion_gap_s must be >= 0, got {self.min_clip_s}, "
                             f"{self.motion_gap_s}")
        if self.threads < 0:
            raise ValueError(f"video.threads must be >= 0, got {self.threads}")
        if self.max_worker_memory_mb < 64:
            raise ValueError(f"video.max_worker_memory_mb must be at least 64, got {self.max_worker_memory_mb}")


@dataclass
class ClipResult:
    """One clip: its stored frames (encoded per ``VideoConfig.frame``) or why it was dropped.

    ``phash`` is the perceptual hash of the middle sampled frame after the resize; ``motion`` the clip's
    motion score (see ``motion_score``). A dropped clip keeps its times and scores but no frames.
    """

    index: int
    start_s: float
    end_s: float
    frames: list[bytes]
    frame_times_s: list[float]
    width: int
    height: int
    phash: int
    motion: float
    drop_reason: str | None = None
    drop_detail: str | None = None


@dataclass
class VideoResult:
    """One video file: what was decoded and its clips, or why it was dropped.

    ``fps``, ``duration_s`` and ``num_frames`` are those of the decodable frames. A video whose clips
    were all dropped carries the most common clip drop reason.
    """

    sha256: str
    backend: str
    orig_width: int
    orig_height: int
    fps: float
    duration_s: float
    num_frames: int
    clips: list[ClipResult]
    drop_reason: str | None = None
    drop_detail: str | None = None

    @property
    def kept_clips(self) -> list[ClipResult]:
        return [c for c in self.clips if c.drop_reason is None]


def dropped_video(sha256: str, reason: str, detail: str | None = None, backend: str = "") -> VideoResult:
    """A ``VideoResult`` for a video dropped before it was indexed."""
    return VideoResult(sha256, backend, 0, 0, 0.0, 0.0, 0, [], reason, detail)


# --- clip planning and sampling (pure functions of the timestamps) -----------------------------------

def frame_at(times_s: np.ndarray, t: float) -> int:
    """Index of the frame on screen at time ``t`` (the last one starting at or before it)."""
    return max(0, int(np.searchsorted(times_s, t + 1e-9, side="right")) - 1)


def clip_frame_range(times_s: np.ndarray, start_s: float, end_s: float) -> tuple[int, int]:
    """First and last index of the frames shown during ``[start_s, end_s)`` (at least one frame)."""
    lo = frame_at(times_s, start_s)
    hi = max(lo, int(np.searchsorted(times_s, end_s - 1e-9, side="left")) - 1)
    return lo, min(hi, len(times_s) - 1)


def _bin_centres(start_s: float, end_s: float, n: int) -> np.ndarray:
    return start_s + (np.arange(n) + 0.5) * (end_s - start_s) / n


def sample_indices(times_s: np.ndarray, start_s: float, end_s: float, config: VideoConfig) -> list[int]:
    """Frame indices a clip stores, in time order (repeated when the clip has fewer frames).

    ``uniform``: the frame on screen at the centre of each of ``num_frames`` equal time bins.
    ``sparse``: for each of ``sparse_clips`` equal bins, ``frames_per_sparse_clip`` consecutive frames
    around the bin's centre, kept inside the clip.
    """
    lo, hi = clip_frame_range(times_s, start_s, end_s)
    if config.sampling == "uniform":
        return [min(max(frame_at(times_s, t), lo), hi) for t in _bin_centres(start_s, end_s, config.num_frames)]
    run = config.frames_per_sparse_clip
    out = []
    for t in _bin_centres(start_s, end_s, config.sparse_clips):
        first = min(max(frame_at(times_s, t) - run // 2, lo), max(lo, hi - run + 1))
        out.extend(min(first + k, hi) for k in range(run))
    return out


def motion_pair_indices(times_s: np.ndarray, start_s: float, end_s: float, pairs: int,
                        gap_s: float = 0.0) -> list[tuple[int, int]]:
    """``pairs`` (frame, later frame) index pairs at the centres of equal time bins of the clip: the
    frame on screen ``gap_s`` later, at least the next one, kept inside the clip."""
    lo, hi = clip_frame_range(times_s, start_s, end_s)
    if hi == lo:
        return [(lo, lo)]
    out = []
    for t in _bin_centres(start_s, end_s, pairs):
        i = min(max(frame_at(times_s, t), lo), hi - 1)
        j = min(max(i + 1, frame_at(times_s, float(times_s[i]) + gap_s)), hi)
        out.append((i, j))
    return out


def window_spans(start_s: float, end_s: float, window_s: float, stride_s: float) -> list[tuple[float, float]]:
    """Windows of ``window_s`` every ``stride_s`` over ``[start_s, end_s]``; the last one is cut at the
    end, and a window wholly inside the one before it (the tail of an overlapping stride) is left out."""
    spans, prev_end, s = [], -math.inf, start_s
    while s < end_s - 1e-9:
        e = min(s + window_s, end_s)
        if e > prev_end + 1e-9:
            spans.append((s, e))
            prev_end = e
        if e >= end_s:
            break
        s += stride_s
    return spans


def _grey(frame: np.ndarray, side: int) -> np.ndarray:
    """A side x side grey thumbnail in 0..1 (box filter: an average, so codec noise mostly cancels)."""
    im = Image.fromarray(frame).resize((side, side), Image.Resampling.BOX).convert("L")
    return np.asarray(im, dtype=np.float32) / 255.0


def _read_chunked(reader: VideoReader, indices: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) for each unique index in time order, decoding a few frames at a time."""
    unique = sorted(set(indices))
    for k in range(0, len(unique), _READ_CHUNK):
        chunk = unique[k:k + _READ_CHUNK]
        yield from zip(chunk, reader.read(chunk))


def scene_cuts(reader: VideoReader, times_s: np.ndarray, start_s: float, end_s: float,
               config: VideoConfig) -> list[float]:
    """Times of shot changes in ``(start_s, end_s)``.

    Grey thumbnails sampled ``1 / scene_sample_fps`` apart are compared; where two differ by more than
    ``scene_threshold``, the frames between them are bisected (the half that differs more holds the
    cut) down to the first frame of the new shot, whose start time is the cut.
    """
    step = 1.0 / config.scene_sample_fps
    probes = sorted({frame_at(times_s, t) for t in np.arange(start_s, end_s, step)})
    cuts, prev = [], None
    for i, frame in _read_chunked(reader, probes):
        thumb = _grey(frame, _SCENE_SIDE)
        if prev is not None and float(np.abs(prev[1] - thumb).mean()) > config.scene_threshold:
            cut = float(times_s[_first_of_new_shot(reader, *prev, i, thumb)])
            if start_s < cut < end_s:
                cuts.append(cut)
        prev = (i, thumb)
    return cuts


def _first_of_new_shot(reader: VideoReader, a: int, ga: np.ndarray, b: int, gb: np.ndarray) -> int:
    """Bisect frames ``a < b`` (thumbnails ``ga``, ``gb``) down to the first frame after the cut."""
    while b - a > 1:
        m = (a + b) // 2
        gm = _grey(reader.read([m])[0], _SCENE_SIDE)
        if np.abs(ga - gm).mean() >= np.abs(gm - gb).mean():
            b, gb = m, gm
        else:
            a, ga = m, gm
    return b


def plan_clips(reader: VideoReader, info: VideoInfo, config: VideoConfig,
               segment: tuple[float, float] | None) -> list[tuple[float, float]]:
    """Clip spans in seconds, inside the segment (clamped to the video: ``(start, inf)`` runs to the
    end) or the whole video."""
    start, end = 0.0, info.duration_s
    if segment is not None:
        s, e = (float(x) for x in segment)
        if math.isnan(s) or math.isnan(e):
            return [(s, e)]  # reported as clip_too_short
        start, end = max(0.0, s), min(info.duration_s, e)  # an open end (inf) runs to the end
    if end - start <= 0 or config.clips == "segment":
        spans = [(start, end)]
    elif config.clips == "window":
        spans = window_spans(start, end, config.window_s, config.stride_s)
    else:
        bounds = [start, *scene_cuts(reader, info.times_s, start, end, config), end]
        spans = list(zip(bounds[:-1], bounds[1:]))
    if len(spans) > config.max_clips:
        keep = np.unique(np.linspace(0, len(spans) - 1, config.max_clips).round().astype(int))
        spans = [spans[i] for i in keep]
    return spans


def motion_score(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Median over frame pairs of the mean absolute grey-level difference (0..1) of 64x64 thumbnails.

    Still images and slideshows (a change once a second, which a median over several pairs ignores)
    score about 0, anything that moves scores above.
    """
    return float(np.median([np.abs(a - b).mean() for a, b in pairs])) if pairs else 0.0


# --- the per-file transform ----------------------------------------------------------------------------

def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes (the identity of a source video)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def process_video(path: str, config: VideoConfig, filters: FilterSet,
                  segment: tuple[float, float] | None = None) -> VideoResult:
    """Decode one video file into clips of stored frames, or a drop reason. Never raises for bad input.

    Args:
        path: a local file.
        segment: the captioned ``[start, end]`` in seconds, if the row gives one.
    """
    try:
        digest = file_sha256(path)
        if os.path.getsize(path) == 0:
            return dropped_video(digest, "empty_file")
    except OSError as e:
        return dropped_video("", "not_a_video", f"cannot read: {e}"[:200])
    try:
        header = read_header(path)
        if header.width * header.height > config.max_pixels:
            result = dropped_video(digest, "video_too_large",
                                   f"{header.width}x{header.height} > {config.max_pixels} pixels")
            result.orig_width, result.orig_height = header.width, header.height
            return result
    except DropError as e:
        return dropped_video(digest, e.reason, e.detail or None)
    except Exception as e:  # a bug: one file, not the run
        logger.exception("unexpected error reading the header of %s", path)
        return dropped_video(digest, "internal_error", f"{type(e).__name__}: {e}"[:300])

    backends = [config.backend]
    if config.fallback not in ("none", config.backend):
        backends.append(config.fallback)
    details = []
    for backend in backends:
        try:
            return _process_with(backend, path, digest, header, config, filters, segment)
        except DropError as e:
            details.append(f"{backend}: {e.detail}" if e.detail else backend)
            result = dropped_video(digest, e.reason, "; ".join(details)[:300], backend)
            if e.reason not in _RETRY_REASONS:
                return result
        except Exception as e:
            logger.exception("unexpected error decoding %s with %s", path, backend)
            return dropped_video(digest, "internal_error", f"{backend}: {type(e).__name__}: {e}"[:300], backend)
    return result


def _process_with(backend: str, path: str, digest: str, header: VideoHeader, config: VideoConfig,
                  filters: FilterSet, segment) -> VideoResult:
    with open_video(path, backend, header, config.threads) as reader:
        info = reader.probe()
        result = VideoResult(digest, backend, info.width, info.height, info.fps, info.duration_s,
                             info.num_frames, [])
        item = VideoItem(info.width, info.height, info.fps, info.duration_s)
        for f in filters.video:
            reason = f.check(item)
            if reason:
                result.drop_reason = reason
                result.drop_detail = (f"{info.width}x{info.height}, {info.fps:.2f} fps, "
                                      f"{info.duration_s:.2f}s")
                return result
        for index, (start, end) in enumerate(plan_clips(reader, info, config, segment)):
            result.clips.append(_process_clip(reader, info, config, filters, index, start, end))
    if not result.kept_clips:
        reasons = Counter(c.drop_reason for c in result.clips)
        result.drop_reason = reasons.most_common(1)[0][0] if reasons else "clip_too_short"
        result.drop_detail = f"all {len(result.clips)} clips dropped: " + ", ".join(
            f"{r} x{n}" for r, n in reasons.items())
    return result


def _process_clip(reader: VideoReader, info: VideoInfo, config: VideoConfig, filters: FilterSet,
                  index: int, start: float, end: float) -> ClipResult:
    length = end - start
    if not length >= config.min_clip_s or length <= 0:
        return ClipResult(index, start, end, [], [], 0, 0, 0, 0.0, "clip_too_short",
                          f"{length:.3f}s < {config.min_clip_s}s" if math.isfinite(length) else "no span")
    times = info.times_s
    sampled = sample_indices(times, start, end, config)
    in_sample = set(sampled)
    pairs = motion_pair_indices(times, start, end, config.motion_pairs, config.motion_gap_s)
    in_pairs = {i for pair in pairs for i in pair}
    resized: dict[int, np.ndarray] = {}
    grey: dict[int, np.ndarray] = {}
    for i, frame in _read_chunked(reader, in_sample | in_pairs):
        if i in in_pairs:
            grey[i] = _grey(frame, _MOTION_SIDE)
        if i in in_sample:
            resized[i] = resize_pixels(frame, config.frame)
    motion = motion_score([(grey[a], grey[b]) for a, b in pairs])
    key = resized[sampled[len(sampled) // 2]]
    clip = ClipResult(index, start, end, [], [float(times[i]) for i in sampled], key.shape[1], key.shape[0],
                      perceptual_hash(Image.fromarray(key)), motion)
    item = ClipItem(motion, length)
    for f in filters.clip:
        reason = f.check(item)
        if reason:
            clip.drop_reason, clip.drop_detail = reason, f"motion {motion:.5f}"
            return clip
    encoded = {i: encode_pixels(pixels, config.frame) for i, pixels in resized.items()}
    clip.frames = [encoded[i] for i in sampled]
    return clip
