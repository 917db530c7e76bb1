"""Video decoding backends: the container header, the frame index, and RGB frames by index.

``read_header`` reads the container header only (frame size, codec) with PyAV, for every backend, so that
a frame size check comes before any packet is read. A ``VideoReader`` indexes the packets when it opens
(the real frame timestamps in presentation order, with the frame count, rate and duration as decodable
rather than as the header claims), then decodes frames by index. Every failure raises
``DropError`` with a drop reason, never a bare library exception.

A new backend is a ``VideoReader`` subclass plus ``@VIDEO_BACKENDS.register("name")``; the backend
tests loop over the registry.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Sequence

import av
import numpy as np

from vlp.curation.drops import DropError
from vlp.registry import Registry

logger = logging.getLogger(__name__)



# --- header -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoHeader:
    """What the container header says about the first video stream; 0 where it says nothing."""

    width: int
    height: int
    fps: float
    frames: int
    duration_s: float
    codec: str
    container: str
    time_base: float


def _looks_like_container(head: bytes) -> bool:
    """Whether the first bytes carry the signature of a container FFmpeg demuxes video from."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):  # ISO BMFF / QuickTime
        return True
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return True
    if len(head) > 188 and head[0] == 0x47 and head[188] == 0x47:  # MPEG-TS sync bytes
        return True
    return head.startswith((
        b"\x1a\x45\xdf\xa3",  # Matroska / WebM (EBML)
        b"FLV",
        b"OggS",
        b"\x30\x26\xb2\x75",  # ASF / WMV
        b"\x00\x00\x01\xba",  # MPEG-PS
        b"\x00\x00\x01\xb3",  # MPEG-1/2 video
    ))


def _first_video_stream(container) -> av.VideoStream | None:
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:  # cover art is not a video
            return stream
    return None


def _open_container(path: str):
    """``av.open`` with FFmpeg's failures turned into drop reasons."""
    try:
        return av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        with open(path, "rb") as f:
            head = f.read(512)
        # FFmpeg says "invalid data" both for bytes no demuxer claims and for a known container whose
        # index is lost (an mp4 cut before its moov box); the signature tells the two apart.
        reason = "corrupt_video" if _looks_like_container(head) else "not_a_video"
        raise DropError(reason, str(e)[:200]) from None


def read_header(path: str) -> VideoHeader:
    """Read the container header: no packet is indexed and no frame decoded (beyond FFmpeg's stream
    probe, which reads the first packets of formats whose header lacks the frame size, such as MPEG-TS).

    Raises:
        DropError: ``not_a_video``, ``corrupt_video`` or ``no_video_stream``.
    """
    with _open_container(path) as container:
        stream = _first_video_stream(container)
        if stream is None:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise DropError("no_video_stream", f"{container.format.name}; streams: {kinds}")
        cc = stream.codec_context
        if cc is None:  # FFmpeg has no decoder for the stream's codec (or its id is garbage)
            raise DropError("corrupt_video", f"no decoder for codec of stream {stream.index}")
        if not cc.width or not cc.height:
            raise DropError("corrupt_video", f"{cc.name}: frame size unknown")
        rate = stream.average_rate or stream.guessed_rate
        if stream.duration is not None and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / 1e6 if container.duration else 0.0
        return VideoHeader(
            cc.width, cc.height, float(rate) if rate else 0.0, int(stream.frames or 0), duration,
            cc.name, container.format.name, float(stream.time_base or 0),
        )


# --- frame index ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoInfo:
    """A probed video: header size plus the real frame timestamps (seconds from the first frame).

    ``fps`` is the average rate of the decodable frames and ``duration_s`` runs to the end of the last
    one (its display time taken as the interval before it).
    """

    width: int
    height: int
    fps: float
    duration_s: float
    num_frames: int
    times_s: np.ndarray = field(repr=False, compare=False)


def _validated_times(raw: np.ndarray, header: VideoHeader) -> np.ndarray:
    """Timestamps in presentation order, checked, relative to the first frame.

    Raises:
        DropError: ``zero_frames`` or ``bad_timestamps``.
    """
    raw = np.asarray(raw, dtype=np.float64).reshape(-1)
    if raw.size == 0:
        raise DropError("zero_frames", f"{header.codec} in {header.container}")
    if not np.isfinite(raw).all():
        raise DropError("bad_timestamps", f"{int((~np.isfinite(raw)).sum())} non-finite timestamps")
    steps = np.diff(raw)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise DropError("bad_timestamps", f"frame {i + 1} at {raw[i + 1]:.3f}s before {raw[i]:.3f}s")
    if raw.size > 1 and raw[-1] == raw[0]:
        raise DropError("bad_timestamps", f"all {raw.size} frames at {raw[0]:.3f}s")
    # Microseconds: both backends then place a time that falls exactly on a frame the same way.
    return np.round(raw - raw[0], 6)


def _info(header: VideoHeader, times: np.ndarray) -> VideoInfo:
    n = len(times)
    if n > 1:
        fps = (n - 1) / float(times[-1])
        duration = float(times[-1] + (times[-1] - times[-2]))
    else:
        fps = header.fps
        duration = 1.0 / fps if fps > 0 else 0.0
    return VideoInfo(header.width, header.height, fps, duration, n, times)


def _suspect_tail(header: VideoHeader, raw: np.ndarray, clean: bool = True) -> bool:
    """Whether the file may end in frames that do not decode: fewer packets than the header counts,
    a header duration well past the last packet, or a demuxer that stopped on an error."""
    if not clean or (header.frames and header.frames > len(raw)):
        return True
    if len(raw) > 1 and header.duration_s:
        span = float(raw[-1] - raw[0])
        step = span / (len(raw) - 1)
        return header.duration_s > span + 2 * step + 0.5
    return False


# --- backends -------------------------------------------------------------------------------------------

class VideoReader:
    """An open video file: frame timestamps at construction, RGB frames by index on demand.

    Subclasses set ``name``, fill ``self._raw_times`` (seconds, presentation order, as stored) in their
    constructor and implement ``_read``. Constructors and ``read`` raise ``DropError`` only.
    """

    name: ClassVar[str]

    def __init__(self, path: str, header: VideoHeader, threads: int = 1):
        self.path = path
        self.header = header
        self.threads = threads
        self._raw_times = np.zeros(0)

    def probe(self) -> VideoInfo:
        """Size, frame rate, duration and frame count of the decodable frames.

        Raises:
            DropError: ``zero_frames`` or ``bad_timestamps``.
        """
        return _info(self.header, _validated_times(self._raw_times, self.header))

    def read(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Decoded HxWx3 uint8 RGB frames, one per index, in the order given (repeats allowed).

        Raises:
            DropError: ``corrupt_video`` when a frame does not decode.
        """
        if not len(indices):
            return []
        n = len(self._raw_times)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"frame indices {bad[:5]} outside 0..{n - 1}")
        unique = sorted(set(int(i) for i in indices))
        frames = dict(zip(unique, self._read(unique)))
        return [frames[int(i)] for i in indices]

    def _read(self, indices: list[int]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


VIDEO_BACKENDS: Registry[type[VideoReader]] = Registry("video backend")


@VIDEO_BACKENDS.register("decord")
class DecordReader(VideoReader):
    """decord's ``VideoReader`` (seek and batch decode in C++).

    decord trusts the header's frame count, and asking it for a frame past the real packets hangs or
    returns garbage, so the count is clamped to the timestamps it indexed, and a file whose tail looks
    short has its last frame decoded once here (a failure rejects the file; the fallback takes over).
    Where the container's timestamps are broken decord invents its own; a span far past the header's
    duration is rejected as ``bad_timestamps``. decord has no header API for the frame size;
    ``read_header`` (PyAV) gives it before decord opens the file.

    Files in MPEG program and transport streams (``.ts``, ``.mpg``, ``.vob``) and raw elementary
    streams are declined (``corrupt_video``, so the fallback decodes them): decord's seeks there land a
    GOP off and it returns the wrong frames without an error.
    """

    name = "decord"
    unseekable: ClassVar[frozenset[str]] = frozenset({"mpegts", "mpeg", "mpegvideo", "h264", "hevc", "m4v"})

    def __init__(self, path: str, header: VideoHeader, threads: int = 1):
        super().__init__(path, header, threads)
        import decord

        if header.container in self.unseekable:
            raise DropError("corrupt_video", f"decord cannot seek in {header.container} files")
        decord.logging.set_level(decord.logging.QUIET)
        try:
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
            self._vr.get_frame_timestamp([0])  # loads the whole timestamp table
            # The table is private but has one row per indexed packet; len(vr) is the header's claim.
            table = np.asarray(self._vr._frame_pts, dtype=np.float64).reshape(-1, 2)
        except (RuntimeError, AssertionError, IndexError, decord.DECORDError) as e:
            raise DropError("corrupt_video", _first_line(e)) from None
        n = min(len(self._vr), len(table))
        if n < len(self._vr):
            logger.debug("%s: header claims %d frames, %d indexed", path, len(self._vr), n)
        self._raw_times = table[:n, 0]
        if header.time_base > 0:  # decord keeps float32 seconds: back to whole ticks of the stream
            self._raw_times = np.round(self._raw_times / header.time_base) * header.time_base
        span = float(self._raw_times[-1] - self._raw_times[0]) if n else 0.0
        if header.duration_s > 0 and span > 1.5 * header.duration_s + 1.0:
            # decord makes timestamps up where the container's are broken (e.g. zero sample durations)
            raise DropError("bad_timestamps", f"frames span {span:.2f}s, the container says "
                                                   f"{header.duration_s:.2f}s")
        if n and _suspect_tail(header, self._raw_times):
            self._read([n - 1])

    def _read(self, indices: list[int]) -> list[np.ndarray]:
        import decord

        try:
            return list(self._vr.get_batch(indices).asnumpy())
        except (RuntimeError, decord.DECORDError) as e:
            raise DropError("corrupt_video", _first_line(e)) from None

    def close(self) -> None:
        self.__dict__.pop("_vr", None)


@VIDEO_BACKENDS.register("pyav")
class PyAVReader(VideoReader):
    """PyAV (FFmpeg's libavformat and libavcodec).

    The constructor reads every packet once (no decoding) for the timestamps and keyframes. Frames are
    read by seeking to the keyframe before a target and decoding forward, continuing without a seek when
    the next target lies in the same run; packets that fail to decode are skipped, as ffmpeg does. A
    file whose tail looks short (truncated downloads) is clamped to its last frame that decodes.
    """

    name = "pyav"

    def __init__(self, path: str, header: VideoHeader, threads: int = 1):
        super().__init__(path, header, threads)
        self._container = None
        self._frames: Iterator | None = None
        self._last_pts: int | None = None
        try:
            self._open()
            pts, keys, clean = self._index()
            self._pts = np.asarray(sorted(pts), dtype=np.int64)
            self._keys = np.asarray(sorted(keys), dtype=np.int64)
            if len(self._pts) and _suspect_tail(header, self._pts * self._tb, clean):
                self._pts = self._pts[self._pts <= self._last_decodable()]
        except av.error.FFmpegError as e:
            self.close()
            raise DropError("corrupt_video", _first_line(e)) from None
        self._raw_times = self._pts * self._tb

    def _open(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = av.open(self.path, metadata_errors="ignore")
        self._stream = _first_video_stream(self._container)
        if self._stream is None:
            raise DropError("no_video_stream", self._container.format.name)
        self._stream.codec_context.thread_count = self.threads
        self._tb = float(self._stream.time_base)
        self._frames, self._last_pts = None, None

    def _index(self) -> tuple[list[int], list[int], bool]:
        """Timestamps of all packets and of the keyframes; ``clean`` is false if demuxing failed."""
        pts, keys = [], []
        try:
            for packet in self._container.demux(self._stream):
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None or packet.size == 0:
                    continue
                pts.append(ts)
                if packet.is_keyframe:
                    keys.append(ts)
        except av.error.FFmpegError:
            return pts, keys, False
        return pts, keys, True

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Frames from the current demuxer position to the end, skipping packets that fail."""
        try:
            for packet in self._container.demux(self._stream):
                try:
                    yield from packet.decode()
                except av.error.FFmpegError:
                    continue
        except av.error.FFmpegError:
            try:  # a truncated file ends the demuxer without its flush packet: flush here
                yield from self._stream.codec_context.decode(None)
            except (av.error.FFmpegError, EOFError):
                pass

    def _start_at(self, key: int | None) -> None:
        """Position the decoder at a keyframe, or at the very start (reopening) for ``None``."""
        if key is None:
            self._open()
        else:
            self._container.seek(int(key), stream=self._stream, backward=True, any_frame=False)
        self._frames, self._last_pts = self._decode(), None

    def _key_before(self, pts: int) -> int | None:
        i = int(np.searchsorted(self._keys, pts, side="right")) - 1
        return int(self._keys[i]) if i >= 0 else None

    def _last_decodable(self) -> int:
        """Presentation timestamp of the last frame that decodes, trying back from the last keyframe."""
        for key in list(self._keys[::-1][:3]) + [None]:
            self._start_at(None if key is None else int(key))
            last = max((f.pts for f in self._frames if f.pts is not None), default=None)
            if last is not None:
                return last
        raise DropError("corrupt_video", "no frame decodes")

    def _read(self, indices: list[int]) -> list[np.ndarray]:
        out = []
        try:
            for i in indices:
                out.append(self._frame_at(int(self._pts[i]), i))
        except av.error.FFmpegError as e:
            raise DropError("corrupt_video", _first_line(e)) from None
        return out

    def _frame_at(self, target: int, index: int) -> np.ndarray:
        key = self._key_before(target)
        ahead = self._frames is not None and self._last_pts is not None and self._last_pts < target
        seeked = False
        if not ahead or (key is not None and key > self._last_pts):
            self._start_at(key)
            seeked = key is not None
        while True:
            frame = next(self._frames, None)
            if frame is None or (seeked and self._last_pts is None and frame.pts is not None
                                 and frame.pts > target):
                if seeked:  # the seek landed past the target (formats without an index): start over
                    self._start_at(None)
                    seeked = False
                    continue
                raise DropError("corrupt_video", f"frame {index} does not decode")
            if frame.pts is None:
                raise DropError("bad_timestamps", f"decoded frame without timestamp near frame {index}")
            self._last_pts = frame.pts
            if frame.pts >= target:  # a missing target frame gives the next one that decodes
                return frame.to_ndarray(format="rgb24")

    def close(self) -> None:
        self._frames = None
        if self._container is not None:
            self._container.close()
            self._container = None


def _first_line(e: BaseException) -> str:
    """The message of a library error: decord's carry a ``[time] file.cc:line:`` prefix and a C++ stack
    trace after it."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", lines[0].strip())[:200]


def open_video(path: str, backend: str, header: VideoHeader, threads: int = 1) -> VideoReader:
    """Open a file whose header was read with the named backend."""
    return VIDEO_BACKENDS.get(backend)(path, header, threads)
