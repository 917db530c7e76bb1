"""One image-text pair from raw source row to shard row (or a counted drop).

``curate_pair`` is the whole per-row transform, in the order that spends the least on rows that will be
dropped: caption normalisation and caption filters (no I/O), then fetching, then the image header and
image filters (no decode), then decoding, hashing, resizing and encoding. Deduplication needs the whole
dataset and happens after, in the pipeline.

It is a plain function of a row and a ``fetch`` callable, so it is tested without Ray or a network.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable

from vlp.curation.drops import DropError
from vlp.curation.filters import CaptionItem, FilterSet, ImageItem
from vlp.curation.image import ImageConfig, probe_image, render_image
from vlp.curation.text import TextConfig, identify_language, normalize_caption

logger = logging.getLogger(__name__)

# Columns of a processed row: the shard columns plus the drop reason and detail (null when kept).
PROCESSED_COLUMNS = (
    "key", "caption", "lang", "image", "image_format", "width", "height", "orig_width",
    "orig_height", "sha256", "phash", "source", "drop_reason", "drop_detail",
)


@dataclass(frozen=True)
class PairSettings:
    text: TextConfig
    image: ImageConfig
    filters: FilterSet


def _row(key, source, caption=None, reason=None, detail=None, **fields) -> dict:
    row = dict.fromkeys(PROCESSED_COLUMNS)
    row.update(key=key, source=source, caption=caption, drop_reason=reason, drop_detail=detail)
    row.update(fields)
    return row


def curate_pair(raw: dict, fetch: Callable[[str], bytes], settings: PairSettings,
                cpu_gate: AbstractContextManager = nullcontext()) -> dict:
    """Process one source row (``pipelines.sources.SOURCE_SCHEMA``) into a processed row.

    ``cpu_gate`` is held around decoding, hashing and encoding: a worker runs many fetches at once
    (network latency) but only as many image computations as it has cores (more only fight over the
    GIL).
    """
    key, source = raw["key"], raw["source"]
    if raw.get("drop_reason"):
        return _row(key, source, raw.get("caption"), raw["drop_reason"], raw.get("drop_detail"))
    try:
        return _curate(raw, key, source, fetch, settings, cpu_gate)
    except Exception as e:  # a bug or an exotic library error costs one row, not the run
        logger.exception("unexpected error on %s", key)
        return _row(key, source, raw.get("caption"), "internal_error", f"{type(e).__name__}: {e}"[:300])


@dataclass(frozen=True)
class CaptionVerdict:
    """A normalised caption and its language, or the reason it is dropped."""

    caption: str | None
    lang: str | None = None
    drop_reason: str | None = None
    drop_detail: str | None = None


def check_caption(raw_caption: str | None, text: TextConfig, filters: FilterSet) -> CaptionVerdict:
    """Normalise a caption and run the caption filters (shared by images and videos)."""
    caption = normalize_caption(raw_caption or "", text)
    if not caption:
        return CaptionVerdict(raw_caption, drop_reason="missing_caption",
                              drop_detail="empty after normalisation")
    item = CaptionItem(caption)
    for f in filters.caption:
        reason = f.check(item)
        if reason:
            return CaptionVerdict(caption, drop_reason=reason,
                                  drop_detail=f"lang={item.lang}" if item.lang else None)
    return CaptionVerdict(caption, item.lang or identify_language(caption)[0][0])


def _curate(raw, key, source, fetch, settings: PairSettings, cpu_gate) -> dict:
    verdict = check_caption(raw.get("caption"), settings.text, settings.filters)
    caption, lang = verdict.caption, verdict.lang
    if verdict.drop_reason:
        return _row(key, source, caption, verdict.drop_reason, verdict.drop_detail)

    data = raw.get("data")
    if data is None:
        try:
            data = fetch(source)
        except DropError as e:
            return _row(key, source, caption, e.reason, e.detail)
    try:
        probed = probe_image(data, settings.image.max_pixels)
        header = ImageItem(probed.orig_width, probed.orig_height)
        for f in settings.filters.image:
            reason = f.check(header)
            if reason:
                return _row(key, source, caption, reason,
                            f"{probed.orig_width}x{probed.orig_height}")
        with cpu_gate:
            rendered = render_image(probed, settings.image)
            digest = hashlib.sha256(data).hexdigest()
    except DropError as e:
        return _row(key, source, caption, e.reason, e.detail)
    return _row(
        key, source, caption,
        lang=lang,
        image=rendered.data,
        image_format=settings.image.format,
        width=rendered.width,
        height=rendered.height,
        orig_width=probed.orig_width,
        orig_height=probed.orig_height,
        sha256=digest,
        phash=rendered.phash,
    )
