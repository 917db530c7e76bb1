"""Curation filters: a registry of small typed checks, each with its own drop reason.

A filter is a frozen dataclass (its fields are its parameters) registered under a name with
``@register_filter``. The config's ``filters`` section maps registered names to parameters; a name set
to ``null`` is switched off. Filters run at one of two stages:

- ``caption``: on the normalised caption, before anything is fetched (cheap, saves downloads);
- ``image``: on the image header (displayed width and height), before the image is decoded.

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


FILTERS: dict[str, type] = {}


def register_filter(name: str):
    def wrap(cls):
        if name in FILTERS:
            raise ValueError(f"filter {name!r} registered twice")
        if getattr(cls, "stage", None) not in ("caption", "image"):
            raise TypeError(f"filter {cls.__name__} must set stage = 'caption' or 'image'")
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


DEFAULT_FILTERS: dict[str, dict[str, Any] | None] = {
    "caption_length": {},
    "language": {},
    "min_side": {},
    "max_aspect_ratio": {},
}


@dataclass(frozen=True)
class FilterSet:
    caption: tuple = ()
    image: tuple = ()


def build_filters(spec: dict[str, dict[str, Any] | None]) -> FilterSet:
    """Instantiate the filters named in a config section, in the registry's order."""
    unknown = sorted(set(spec) - set(FILTERS))
    if unknown:
        raise ConfigError(
            f"unknown filter {unknown[0]!r}; registered filters: {', '.join(sorted(FILTERS))}"
        )
    caption, image = [], []
    for name, cls in FILTERS.items():
        if name not in spec or spec[name] is None:
            continue
        f = from_dict(cls, spec[name] or {}, where=f"filters.{name}")
        (caption if cls.stage == "caption" else image).append(f)
    return FilterSet(tuple(caption), tuple(image))
