"""Generated video-text pairs whose captions depend on frame order, for the tests and the quickstart.

Each clip shows one coloured shape on a light, static background doing one motion: moving across the
frame, growing or shrinking, appearing or disappearing. Motions come in pairs that are time reversals of
each other (``left_to_right`` and ``right_to_left``, ``grows`` and ``shrinks``, ...), so a model that
ignores frame order cannot tell a clip's caption from its reversal's. Backgrounds, paths, speeds and
sizes are random per clip, so no two clean clips are near-duplicates.

Files are encoded with PyAV (no ffmpeg binary needed). With ``broken=True`` the set also holds one of
every bad case the video curation must survive; ``expected.json`` records what should happen to each key
(``kept`` or the drop reason) and ``expected_motion.json`` which motion each captioned clip shows, so
tests compare against them instead of hard-coding counts. A new motion is a new reversal pair in
``MOTIONS`` plus its trajectory in ``_Trajectory.state``.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np
from PIL import Image, ImageDraw

from vlp.data.sample_vocabulary import COLOURS, SHAPES, VIDEO_COLOURS, VIDEO_SHAPES
from vlp.data.synthetic import ManifestBuilder, SampleSet


class Motion(NamedTuple):
    en: str  # English verb phrase, after "a red circle"
    zh: str  # Chinese verb phrase, after "红色圆形"
    reverse: str  # the motion this one becomes when the frames play backwards


# Phrases are worded so that py3langid calls every English caption English (e.g. "moves from bottom
# to top" after "a yellow square" reads as Nigerian Pidgin, "disappears" after "a blue square" as
# Italian; the tests run every caption through the real language filter).
MOTIONS: dict[str, Motion] = {
    "left_to_right": Motion("moves from the left to the right", "从左向右移动", "right_to_left"),
    "right_to_left": Motion("moves from the right to the left", "从右向左移动", "left_to_right"),
    "top_to_bottom": Motion("moves from the top to the bottom", "从上向下移动", "bottom_to_top"),
    "bottom_to_top": Motion("moves from the bottom to the top", "从下向上移动", "top_to_bottom"),
    "grows": Motion("grows bigger", "逐渐变大", "shrinks"),
    "shrinks": Motion("shrinks", "逐渐变小", "grows"),
    "appears": Motion("slowly appears", "慢慢出现", "disappears"),
    "disappears": Motion("slowly disappears", "慢慢消失", "appears"),
}
# The forward member of each pair; its reverse is drawn as the same trajectory played backwards.
_FORWARD = ("left_to_right", "top_to_bottom", "grows", "appears")

# Encoder settings: small files, one thread each so the bytes depend only on the seed. H.264 uses a
# constant QP: x264's CRF (macroblock-tree and adaptive quantisation) gave different bytes for the same
# frames about one encode in a hundred.
_H264 = {"preset": "medium", "qp": "26", "threads": "1"}
# Stills near-losslessly: at QP 26 x264 refines a new still over the next frames, a small change the
# motion score can sample (the still and the slideshow must be unambiguously static).
_STILL_H264 = {"preset": "medium", "qp": "12", "threads": "1"}
# The near-duplicate: the same frames under other encoder settings. A lower quality is the textbook
# re-encode, but it moves the pHash of these small, smooth frames by up to 6 bits, past the dedup's
# default radius of 4; the preset change alone keeps them within 2.
_NEAR_COPY_H264 = {"preset": "fast", "qp": "26", "threads": "1"}
_VP9 = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
        "threads": "1"}
_MPEG4 = {"qscale": "2", "threads": "1"}
# Muxers otherwise write random ids (Matroska's segment UID) that make same-seed files differ.
_BITEXACT = {"fflags": "+bitexact"}


@dataclass(frozen=True)
class VideoSpec:
    colour: str
    shape: str
    motion: str

    def caption(self, lang: str) -> str:
        """``"a red circle moves from the left to the right"`` or ``"红色圆形从左向右移动"``."""
        if lang == "zh":
            return f"{COLOURS[self.colour][1]}{SHAPES[self.shape]}{MOTIONS[self.motion].zh}"
        return f"a {self.colour} {self.shape} {MOTIONS[self.motion].en}"

    def reversed(self) -> VideoSpec:
        """The spec whose clip is this one's frames in reverse order."""
        return VideoSpec(self.colour, self.shape, MOTIONS[self.motion].reverse)


def random_video_spec(rng: random.Random, colours: int = len(VIDEO_COLOURS),
                      shapes: int = len(VIDEO_SHAPES)) -> VideoSpec:
    """A random clip: one of the first ``colours`` colours and ``shapes`` shapes, any motion."""
    return VideoSpec(rng.choice(VIDEO_COLOURS[:colours]), rng.choice(VIDEO_SHAPES[:shapes]),
                     rng.choice(list(MOTIONS)))


@dataclass(frozen=True)
class _Trajectory:
    """One clip's random path, as fractions of the frame side and of the clip's duration.

    Every motion reads the same fields, drawn in the same order, so a motion and its reverse drawn
    from equal generators give exactly reversed frames.
    """

    lo: float  # start and end of a move across the frame
    hi: float
    across: float  # the other coordinate of a move
    cx: float  # centre of growing and appearing shapes
    cy: float
    r: float  # radius of moving shapes
    r_fade: float  # radius of appearing shapes (larger: a fade changes less per frame than a move)
    r_lo: float  # radius range of growing shapes
    r_hi: float
    # Each motion runs from t0 to t1, still only briefly before and after: the motion score samples
    # a few frame pairs across the clip and takes their median, so a clip that is still for long
    # stretches scores as a still image.
    t0: float
    t1: float

    @classmethod
    def draw(cls, rng: random.Random) -> _Trajectory:
        return cls(lo=rng.uniform(0.16, 0.26), hi=rng.uniform(0.74, 0.84), across=rng.uniform(0.3, 0.7),
                   cx=rng.uniform(0.4, 0.6), cy=rng.uniform(0.4, 0.6), r=rng.uniform(0.11, 0.14),
                   r_fade=rng.uniform(0.27, 0.32), r_lo=rng.uniform(0.1, 0.12),
                   r_hi=rng.uniform(0.3, 0.34), t0=rng.uniform(0.0, 0.08), t1=rng.uniform(0.92, 1.0))

    def state(self, motion: str, t: float) -> tuple[float, float, float, float]:
        """Centre x, centre y, radius (fractions of the side) and opacity at clip fraction ``t``."""
        if motion not in _FORWARD:
            return self.state(MOTIONS[motion].reverse, 1.0 - t)
        s = min(1.0, max(0.0, (t - self.t0) / (self.t1 - self.t0)))
        pos = self.lo + (self.hi - self.lo) * s
        if motion == "left_to_right":
            return pos, self.across, self.r, 1.0
        if motion == "top_to_bottom":
            return self.across, pos, self.r, 1.0
        if motion == "grows":
            return self.cx, self.cy, self.r_lo + (self.r_hi - self.r_lo) * s, 1.0
        return self.cx, self.cy, self.r_fade, s  # appears: fades in


def _background(size: int, rng: random.Random) -> np.ndarray:
    """A light, smooth random background with a few faint strokes (float32, H x W x 3).

    As for the image samples, it decides most of a frame's perceptual hash, so distinct clips are far
    apart; on a 7x7 grid rather than 5x5, since at 64 px a 5x5 grid leaves the higher of pHash's 8x8
    DCT coefficients near zero (400 clips then had pairs within 4 bits; now none within 6). Its
    strokes are fainter, so the shape's colour stays far from every background pixel.
    """
    base = np.array([rng.randint(195, 240) for _ in range(3)], dtype=np.float32)
    grid = np.array([[rng.uniform(-1, 1) for _ in range(7)] for _ in range(7)], dtype=np.float32)
    smooth = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8), "L").resize(
        (size, size), Image.Resampling.BICUBIC)
    noise = (np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0)[..., None] * 45.0
    im = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 4)):
        tone = tuple(int(c) - rng.randint(10, 25) for c in base)
        d.line([(rng.uniform(0, size), rng.uniform(0, size)),
                (rng.uniform(0, size), rng.uniform(0, size))], fill=tone, width=max(2, size // 60))
    return np.asarray(im, dtype=np.float32)


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Coverage of the shape (0..1, H x W), centre and radius in pixels."""
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif shape == "cross":
        t = r / 3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    else:  # star
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy - rad * np.sin(a)))
        d.polygon(pts, fill=255)
    return np.asarray(im, dtype=np.float32) / 255.0


def render_frames(spec: VideoSpec, size: int, n_frames: int, rng: random.Random) -> list[np.ndarray]:
    """The clip's RGB frames (uint8, size x size x 3); the first shows the motion's start state, the
    last its end state.

    Rendering ``spec.reversed()`` from a generator in the same state gives the same frames in reverse
    order (the temporal tests rely on it).
    """
    bg = _background(size, rng)
    path = _Trajectory.draw(rng)
    times = [k / (n_frames - 1) for k in range(n_frames)] if n_frames > 1 else [0.0]
    return [_compose(bg, spec, path.state(spec.motion, t), size) for t in times]


def _compose(bg: np.ndarray, spec: VideoSpec, state, size: int) -> np.ndarray:
    cx, cy, r, opacity = state
    alpha = _shape_mask(spec.shape, cx * size, cy * size, r * size, size)[..., None] * opacity
    colour = np.array(COLOURS[spec.colour][0], dtype=np.float32)
    return np.clip(bg * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


def encode_video(frames: list[np.ndarray], fps: float, container: str = "mp4", *,
                 options: dict[str, str] | None = None, pts_ms: list[int] | None = None) -> bytes:
    """Encode RGB frames: ``mp4`` (H.264), ``webm`` (VP9) or ``avi`` (MPEG-4 part 2), all yuv420p.

    Args:
        options: encoder options replacing the container's defaults (``crf``, ``preset``, ...).
        pts_ms: per-frame presentation times in milliseconds, for variable frame rate; by default
            frames are ``1/fps`` apart.
    """
    codec, defaults = {"mp4": ("libx264", _H264), "webm": ("libvpx-vp9", _VP9),
                       "avi": ("mpeg4", _MPEG4)}[container]
    buf = io.BytesIO()
    with av.open(buf, "w", format=container, options=_BITEXACT) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000),
                                options=options or defaults)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        ms = Fraction(1, 1000)
        if pts_ms is not None:
            stream.codec_context.time_base = stream.time_base = ms
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], ms
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def _encode_sine(seconds: float, rate: int = 16_000, hz: float = 440.0) -> bytes:
    """An audio-only MP4 (AAC, mono): a video file with no video stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options=_BITEXACT) as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        n = int(seconds * rate)
        wave = (0.3 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)
        for start in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[None, start:start + 1024]),
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


@dataclass
class VideoSampleSet(SampleSet):
    # key -> what the clip shows during the row's interval, for every row whose clip shows a motion
    # (clean rows, duplicates, both rows of the segmented clip); also in ``expected_motion.json``.
    motions: dict[str, VideoSpec] = field(default_factory=dict)


def generate_video_text_samples(
    root: str,
    n: int = 120,
    *,
    seed: int = 0,
    broken: bool = True,
    size: int = 64,
    fps: int = 8,
    seconds: float = 2.0,
    zh_fraction: float = 0.5,
    varied_formats: bool = True,
    colours: int = len(VIDEO_COLOURS),
    shapes: int = len(VIDEO_SHAPES),
) -> VideoSampleSet:
    """Write ``videos/``, ``manifest.jsonl`` (paths relative to it), ``expected.json`` and
    ``expected_motion.json`` under ``root``.

    Manifest rows carry ``key``, ``path``, ``caption`` and ``lang``; the two rows captioning halves of
    one long clip also carry ``start`` and ``end`` in seconds.

    Args:
        n: clean clips (broken cases come on top).
        broken: add one of each bad case, the duplicates and the two-segment clip; see
            ``expected.json``.
        size: side of the clean clips, in pixels.
        fps, seconds: frame rate and duration of the clean clips.
        varied_formats: also write VP9 WebM, MPEG-4 AVI and variable-frame-rate H.264 clips among the
            clean ones (all kept).
        colours, shapes: how many of ``VIDEO_COLOURS`` and ``VIDEO_SHAPES`` the clean clips use. Few
            of each make most in-batch negatives differ only in time, which is what trains (and
            tests) a model's sense of frame order; clips then repeat captions, never frames.
    """
    rng = random.Random(seed)
    n_frames = max(2, round(seconds * fps))
    rows = ManifestBuilder(root, "videos")
    add = rows.add
    motions: dict[str, tuple[VideoSpec, str, dict]] = {}

    def clip(spec: VideoSpec, lang: str, key: str, data: bytes | None, ext: str,
             outcome: str = "kept", *, file: str | None = None, **interval):
        add(key, data, ext, spec.caption(lang), outcome, lang=lang, file=file, **interval)
        motions[key] = (spec, lang, interval)

    formats = ["h264"] * 6
    if varied_formats:
        formats += ["vp9", "mpeg4", "vfr"]
    first: tuple[str, VideoSpec, str, list[np.ndarray], bytes] | None = None
    for i in range(n):
        spec = random_video_spec(rng, colours, shapes)
        lang = "zh" if rng.random() < zh_fraction else "en"
        frames = render_frames(spec, size, n_frames, rng)
        fmt = formats[i % len(formats)]
        if fmt == "vp9":
            data, ext = encode_video(frames, fps, "webm"), "webm"
        elif fmt == "mpeg4":
            data, ext = encode_video(frames, fps, "avi"), "avi"
        elif fmt == "vfr":
            # Frame gaps of 0.5x to 1.5x the nominal one: irregular timestamps, same mean rate.
            step = 1000.0 / fps
            gaps = [rng.uniform(0.5, 1.5) * step for _ in range(n_frames - 1)]
            scale = step * (n_frames - 1) / sum(gaps)
            pts = [0] + [round(sum(gaps[:k]) * scale) for k in range(1, n_frames)]
            data, ext = encode_video(frames, fps, "mp4", pts_ms=pts), "mp4"
        else:
            data, ext = encode_video(frames, fps, "mp4"), "mp4"
        key = f"v{i:06d}"
        clip(spec, lang, key, data, ext)
        if first is None and fmt == "h264":
            first = (key, spec, lang, frames, data)

    groups: list[set[str]] = []
    if broken:
        spec = random_video_spec(rng)
        good = encode_video(render_frames(spec, size, n_frames, rng), fps)
        cap = spec.caption("en")
        add("bad_empty", b"", "mp4", cap, "empty_file")
        add("bad_random_bytes", bytes(rng.getrandbits(8) for _ in range(4096)), "mp4", cap,
            "not_a_video")
        add("bad_audio_only", _encode_sine(seconds), "m4a", cap, "no_video_stream")
        # PyAV's MP4 muxer writes the index (moov) after the media data: half a file has none.
        add("bad_truncated", good[: len(good) // 2], "mp4", cap, "corrupt_video")
        # One frame shown for 2 s: too large by its header alone (not too short), and cheap to make.
        huge = encode_video([np.full((4000, 4000, 3), 200, np.uint8)], 0.5,
                            options={"preset": "ultrafast", "threads": "1"})
        add("bad_too_large", huge, "mp4", "a very large grey picture", "video_too_large")
        still = render_frames(VideoSpec(spec.colour, spec.shape, "grows"), size, 1, rng)[0]
        add("bad_static", encode_video([still] * n_frames, fps, options=_STILL_H264), "mp4",
            f"a {spec.colour} {spec.shape} in the centre", "static_video")
        slides = [render_frames(random_video_spec(rng), size, 1, rng)[0] for _ in range(3)]
        hold = max(1, round(0.7 * fps))
        add("bad_slideshow", encode_video([s for s in slides for _ in range(hold)], fps,
                                          options=_STILL_H264), "mp4",
            "three pictures of coloured shapes", "static_video")
        short = VideoSpec(spec.colour, spec.shape, "left_to_right")
        add("bad_too_short", encode_video(render_frames(short, size, max(2, fps // 2), rng), fps),
            "mp4", short.caption("en"), "video_too_short")
        add("bad_missing_file", None, "mp4", cap, "file_not_found")
        add("bad_no_caption", good, "mp4", None, "missing_caption")
        add("bad_empty_caption", good, "mp4", "", "missing_caption")
        # A line that is not JSON has no readable key: the reader names it by file and line number.
        add(rows.next_line_key(), None, "mp4", None, "malformed_row",
            raw_line=b'{"key": "bad_json", "path": "videos/x.mp4", "caption": ')
        add("bad_short_caption", good, "mp4", "123!", "caption_too_short")
        # Duplicates of the first clean H.264 clip: its exact bytes, and the same frames re-encoded
        # at a lower quality. One of the group is kept (whichever the pipeline sees first).
        if first is not None:
            fkey, fspec, flang, fframes, fdata = first
            clip(fspec, flang, "dup_exact", fdata, "mp4", "duplicate_exact")
            clip(fspec, flang, "dup_near", encode_video(fframes, fps, options=_NEAR_COPY_H264), "mp4",
                 "duplicate_near")
            groups.append({fkey, "dup_exact", "dup_near"})
        # One long clip, captioned in two rows by interval: over and back along the same path.
        half = 3.0
        long_spec = VideoSpec(rng.choice(VIDEO_COLOURS), rng.choice(VIDEO_SHAPES), "left_to_right")
        long_data = encode_video(_over_and_back(long_spec, size, fps, half, rng), fps)
        lang = "zh" if rng.random() < zh_fraction else "en"
        clip(long_spec, lang, "long_part1", long_data, "mp4", file="long", start=0.0, end=half)
        clip(long_spec.reversed(), lang, "long_part2", None, "mp4", file="long", start=half,
             end=2 * half)

    manifest = rows.write()
    sidecar = {k: {"motion": s.motion, "colour": s.colour, "shape": s.shape, "lang": lg, **iv}
               for k, (s, lg, iv) in motions.items()}
    with open(os.path.join(root, "expected_motion.json"), "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=1, sort_keys=True)
    return VideoSampleSet(root, manifest, rows.expected, groups,
                          motions={k: s for k, (s, _, _) in motions.items()})


def _over_and_back(spec: VideoSpec, size: int, fps: int, half: float,
                   rng: random.Random) -> list[np.ndarray]:
    """Frames of a ``2 * half`` second clip: ``spec.motion`` over the first half, its reverse over the
    second, along the same path (the shape ends where it started)."""
    bg = _background(size, rng)
    path = _Trajectory.draw(rng)
    back = spec.reversed()
    frames = []
    for k in range(round(2 * half * fps)):
        t = k / (fps * half)
        state = path.state(spec.motion, t) if t <= 1.0 else path.state(back.motion, t - 1.0)
        frames.append(_compose(bg, spec, state, size))
    return frames


def load_motions(root: str) -> dict[str, dict]:
    """``expected_motion.json``: key -> ``motion``, ``colour``, ``shape``, ``lang`` (and ``start``,
    ``end`` for interval rows)."""
    with open(os.path.join(root, "expected_motion.json"), encoding="utf-8") as f:
        return json.load(f)


def reverse_caption_pairs(root: str, kept_only: bool = True) -> list[tuple[str, str, str]]:
    """``(key, caption, reversed caption)`` for every row with a known motion.

    The reversed caption describes the clip played backwards: the hard negative of a temporal test
    (a model that ignores frame order scores both the same).
    """
    with open(os.path.join(root, "expected.json"), encoding="utf-8") as f:
        expected = json.load(f)
    out = []
    for key, m in sorted(load_motions(root).items()):
        if kept_only and expected.get(key) != "kept":
            continue
        spec = VideoSpec(m["colour"], m["shape"], m["motion"])
        out.append((key, spec.caption(m["lang"]), spec.reversed().caption(m["lang"])))
    return out
