"""Curation filters: a registry of small typed checks, each with its own drop reason.

A filter is a frozen dataclass (its fields are its parameters) registered under a name with
``@register_filter``. The config's ``filters`` section maps registered names to parameters; a name set
to ``null`` is switched off. Filters run at one of four stages:

- ``caption``: on the normalised caption, before anything is fetched (cheap, saves downloads);
- ``image``: on the image header (displayed width and height), before the image is decoded;
- ``video``: on a video's header and frame index (size, frame rate, duration), before any frame is
  decoded;
- ``clip``: on a planned and decoded video clip (its motion score and length), before its frames are
  resized and encoded.

A new filter is a new class here (or in any imported module) plus ``@register_filter``; the
registry-wide tests pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from vlp.config import ConfigError, from_dict
from vlp.curation.text import count_words, detect_language


@dataclass
class CaptionItem:
    """What caption filters see; ``lang`` is filled by the language filter (or after the filters)."""

    text: str
    lang: str = ""


@dataclass(frozen=True)
class ImageItem:
    """What image filters see: the displayed size from the header, before decoding."""

    width: int
    height: int


@dataclass(frozen=True)
class VideoItem:
    """What video filters see: the stream's frame size, average frame rate and decodable duration."""

    width: int
    height: int
    fps: float
    duration_s: float


@dataclass(frozen=True)
class ClipItem:
    """What clip filters see: the clip's motion score (0..1, see ``vlp.curation.video``) and length."""

    motion: float
    duration_s: float


STAGES = ("caption", "image", "video", "clip")

FILTERS: dict[str, type] = {}


def register_filter(name: str):
    def wrap(cls):
        if name in FILTERS:
            raise ValueError(f"filter {name!r} registered twice")
        if getattr(cls, "stage", None) not in STAGES:
            raise TypeError(f"filter {cls.__name__} must set stage to one of {', '.join(STAGES)}")
        cls.name = name
        FILTERS[name] = cls
        return cls

    return wrap


@register_filter("caption_length")
@dataclass(frozen=True)
class CaptionLengthFilter:
    """Caption length in characters and in words (a CJK character counts as a word)."""

    stage: ClassVar[Literal["caption"]] = "caption"
    reasons: ClassVar[tuple[str, ...]] = (
        "caption_too_short",
        "caption_too_long",
        "caption_too_few_words",
        "caption_too_many_words",
    )
    min_chars: int = 5
    max_chars: int = 1000
    min_words: int = 1
    max_words: int = 256

    def check(self, item: CaptionItem) -> str | None:
        n = len(item.text)
        if n < self.min_chars:
            return "caption_too_short"
        if n > self.max_chars:
            return "caption_too_long"
        words = count_words(item.text)
        if words < self.min_words:
            return "caption_too_few_words"
        if words > self.max_words:
            return "caption_too_many_words"
        return None


@register_filter("language")
@dataclass(frozen=True)
class LanguageFilter:
    """Keep captions in the allowed languages; fills ``lang``.

    A caption is dropped only when its best guess is another language with at least ``min_confidence``;
    short captions that no model can place confidently take the best allowed language instead.
    """

    stage: ClassVar[Literal["caption"]] = "caption"
    reasons: ClassVar[tuple[str, ...]] = ("language_not_allowed",)
    allowed: list[str] = field(default_factory=lambda: ["zh", "en"])
    min_confidence: float = 0.3

    def __post_init__(self):
        if not self.allowed:
            raise ValueError("language.allowed must name at least one language")

    def check(self, item: CaptionItem) -> str | None:
        lang, kept = detect_language(item.text, tuple(self.allowed), self.min_confidence)
        item.lang = lang
        return None if kept else "language_not_allowed"


@register_filter("min_side")
@dataclass(frozen=True)
class MinSideFilter:
    """Drop images whose shorter side is below ``min_side`` pixels."""

    stage: ClassVar[Literal["image"]] = "image"
    reasons: ClassVar[tuple[str, ...]] = ("image_too_small",)
    min_side: int = 64

    def check(self, item: ImageItem) -> str | None:
        return "image_too_small" if min(item.width, item.height) < self.min_side else None


@register_filter("max_aspect_ratio")
@dataclass(frozen=True)
class MaxAspectRatioFilter:
    """Drop images whose long side exceeds ``max_ratio`` times the short side (M2-Encoder: 3)."""

    stage: ClassVar[Literal["image"]] = "image"
    reasons: ClassVar[tuple[str, ...]] = ("aspect_ratio_too_large",)
    max_ratio: float = 3.0

    def check(self, item: ImageItem) -> str | None:
        ratio = max(item.width, item.height) / max(1, min(item.width, item.height))
        return "aspect_ratio_too_large" if ratio > self.max_ratio else None


@register_filter("video_duration")
@dataclass(frozen=True)
class VideoDurationFilter:
    """Drop videos shorter than ``min_s`` or longer than ``max_s`` seconds (decodable duration)."""

    stage: ClassVar[Literal["video"]] = "video"
    reasons: ClassVar[tuple[str, ...]] = ("video_too_short", "video_too_long")
    min_s: float = 1.0
    max_s: float = 3600.0

    def __post_init__(self):
        if not 0 <= self.min_s <= self.max_s:
            raise ValueError(f"video_duration needs 0 <= min_s <= max_s, got {self.min_s}, {self.max_s}")

    def check(self, item: VideoItem) -> str | None:
        if item.duration_s < self.min_s:
            return "video_too_short"
        if item.duration_s > self.max_s:
            return "video_too_long"
        return None


@register_filter("video_fps")
@dataclass(frozen=True)
class VideoFpsFilter:
    """Drop videos whose average frame rate is outside ``[min_fps, max_fps]``."""

    stage: ClassVar[Literal["video"]] = "video"
    reasons: ClassVar[tuple[str, ...]] = ("fps_too_low", "fps_too_high")
    min_fps: float = 1.0
    max_fps: float = 240.0

    def __post_init__(self):
        if not 0 <= self.min_fps <= self.max_fps:
            raise ValueError(f"video_fps needs 0 <= min_fps <= max_fps, got {self.min_fps}, {self.max_fps}")

    def check(self, item: VideoItem) -> str | None:
        if item.fps < self.min_fps:
            return "fps_too_low"
        if item.fps > self.max_fps:
            return "fps_too_high"
        return None


@register_filter("video_resolution")
@dataclass(frozen=True)
class VideoResolutionFilter:
    """Drop videos whose frame's shorter side is below ``min_side`` pixels."""

    stage: ClassVar[Literal["video"]] = "video"
    reasons: ClassVar[tuple[str, ...]] = ("video_too_small",)
    min_side: int = 32

    def check(self, item: VideoItem) -> str | None:
        return "video_too_small" if min(item.width, item.height) < self.min_side else None


@register_filter("motion")
@dataclass(frozen=True)
class MotionFilter:
    """Drop clips whose motion score is below ``min_score``: still images, slideshows, frozen streams.

    The score is the median, over a few positions in the clip, of the mean absolute grey-level change
    (0..1) between a frame and the frame ``video.motion_gap_s`` later (at least the next one). The default sits between what encoded still images score
    (up to about 0.0005: codec noise) and what an object of 1/8 of the frame side moving one pixel per
    frame (at 64 px) scores (about 0.004); see tests/test_video_decode.py.
    """

    stage: ClassVar[Literal["clip"]] = "clip"
    reasons: ClassVar[tuple[str, ...]] = ("static_video",)
    min_score: float = 0.002

    def check(self, item: ClipItem) -> str | None:
        return "static_video" if item.motion < self.min_score else None


DEFAULT_FILTERS: dict[str, dict[str, Any] | None] = {
    "caption_length": {},
    "language": {},
    "min_side": {},
    "max_aspect_ratio": {},
}

DEFAULT_VIDEO_FILTERS: dict[str, dict[str, Any] | None] = {
    "caption_length": {},
    "language": {},
    "video_duration": {},
    "video_fps": {},
    "video_resolution": {},
    "motion": {},
}


@dataclass(frozen=True)
class FilterSet:
    caption: tuple = ()
    image: tuple = ()
    video: tuple = ()
    clip: tuple = ()

    def all(self) -> tuple:
        """Every filter, stage by stage in pipeline order."""
        return self.caption + self.image + self.video + self.clip


def build_filters(spec: dict[str, dict[str, Any] | None]) -> FilterSet:
    """Instantiate the filters named in a config section, sorted into stages in the registry's order."""
    unknown = sorted(set(spec) - set(FILTERS))
    if unknown:
        raise ConfigError(
            f"unknown filter {unknown[0]!r}; registered filters: {', '.join(sorted(FILTERS))}"
        )
    stages: dict[str, list] = {stage: [] for stage in STAGES}
    for name, cls in FILTERS.items():
        if name not in spec or spec[name] is None:
            continue
        stages[cls.stage].append(from_dict(cls, spec[name] or {}, where=f"filters.{name}"))
    return FilterSet(**{stage: tuple(found) for stage, found in stages.items()})
