"""Pure batch transforms from shard rows to model inputs (plain functions over dicts of arrays).

Ray Data runs ``prepare_train_batch`` on CPU workers: decode the stored JPEG/WebP bytes (an image, or
the frames of a video clip, picked to the model's ``num_frames``), take a random resized crop (one for
all frames of a clip), tokenize the caption. Pixels leave as ``uint8`` HWC (a quarter of the bytes of float32
through the object store); ``pixels_to_model`` turns them into normalised float CHW on the training
device, where that is one cheap fused op. There is no horizontal flip: captions say "left" and
"right", and a flip would make them lie.
"""

from __future__ import annotations

import functools
import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vlp.batch import LANG, PIXELS, SIGNIFICANT

# Caption languages as model inputs (a captioner's language prompt): 0 for any other or unknown.
LANGUAGE_CODES = {"en": 1, "zh": 2}


def language_codes(langs) -> np.ndarray:
    """Language tags (``en``, ``zh``, ...) -> int64 codes (``LANGUAGE_CODES``, 0 for the rest)."""
    return np.array([LANGUAGE_CODES.get(str(lang), 0) for lang in langs], dtype=np.int64)


# CLIP's pixel statistics: the convention of the pretrained towers a user may load.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def random_box(rng: np.random.Generator, min_crop_scale: float, aspect_of_image: float = 1.0
               ) -> tuple[float, float, float, float]:
    """A crop, as fractions of the image (x0, y0, x1, y1), of area in [min_crop_scale, 1] and aspect
    ratio in [3/4, 4/3] (``aspect_of_image``: the image's width / height)."""
    scale = rng.uniform(min_crop_scale, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))) / aspect_of_image
    cw = min(1.0, np.sqrt(scale * aspect))
    ch = min(1.0, np.sqrt(scale / aspect))
    x0 = rng.uniform(0.0, 1.0 - cw)
    y0 = rng.uniform(0.0, 1.0 - ch)
    return x0, y0, x0 + cw, y0 + ch


def decode_resize(data: bytes, size: int, rng: np.random.Generator | None = None,
                  min_crop_scale: float = 1.0,
                  box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """One image -> ``(size, size, 3)`` uint8; a random crop of area in [min_crop_scale, 1] when
    ``rng`` is given, the fractional ``box`` when given (the frames of one clip share one crop), the
    whole image otherwise (evaluation)."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a reduced scale
        im = im.convert("RGB")
        w, h = im.size
        if box is None and rng is not None and min_crop_scale < 1.0:
            box = random_box(rng, min_crop_scale, w / h)
        x0, y0, x1, y1 = box or (0.0, 0.0, 1.0, 1.0)
        out = im.resize((size, size), Image.Resampling.BILINEAR, box=(x0 * w, y0 * h, x1 * w, y1 * h))
        return np.asarray(out, dtype=np.uint8)


def decode_images(images: Sequence[bytes], size: int, rng: np.random.Generator | None = None,
                  min_crop_scale: float = 1.0) -> np.ndarray:
    """Many images -> ``(B, size, size, 3)`` uint8."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = decode_resize(data, size, rng, min_crop_scale)
    return out


def frame_indices(stored: int, wanted: int) -> np.ndarray:
    """Which of ``stored`` frames (in time order) make ``wanted``: the centres of ``wanted`` equal
    bins, so fewer frames are spread over the whole clip and more repeat the nearest (an image, one
    stored frame, becomes a still video)."""
    return np.minimum(((np.arange(wanted) + 0.5) * stored / wanted).astype(np.int64), stored - 1)


def decode_clip(frames: Sequence[bytes], num_frames: int, size: int,
                rng: np.random.Generator | None = None, min_crop_scale: float = 1.0) -> np.ndarray:
    """One clip's encoded frames -> ``(num_frames, size, size, 3)`` uint8, one crop for all frames
    (a crop that moved between frames would be motion that is not in the video)."""
    box = None
    if rng is not None and min_crop_scale < 1.0:
        with Image.open(io.BytesIO(frames[0])) as im:
            box = random_box(rng, min_crop_scale, im.size[0] / im.size[1])
    picked = frame_indices(len(frames), num_frames)
    decoded = {int(i): decode_resize(frames[i], size, box=box) for i in np.unique(picked)}
    return np.stack([decoded[int(i)] for i in picked])


def decode_media(items: Sequence, num_frames: int, size: int, rng: np.random.Generator | None = None,
                 min_crop_scale: float = 1.0) -> np.ndarray:
    """Images (bytes) and clips (lists of frame bytes) -> ``(B, size, size, 3)`` when ``num_frames``
    is 1 (a clip gives its middle frame), else ``(B, num_frames, size, size, 3)`` (an image repeats)."""
    if num_frames == 1:
        stills = [item if isinstance(item, bytes) else item[len(item) // 2] for item in items]
        return decode_images(stills, size, rng, min_crop_scale)
    out = np.empty((len(items), num_frames, size, size, 3), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = decode_clip([item] if isinstance(item, bytes) else item, num_frames, size, rng,
                             min_crop_scale)
    return out


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """One tokenizer per path per process (Ray Data workers reuse it across batches)."""
    from vlp.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def prepare_train_batch(batch: dict[str, np.ndarray], *, image_size: int, max_text_length: int,
                        tokenizer_path: str, min_crop_scale: float = 1.0, augment: bool = True,
                        num_frames: int = 1,
                        significant_words: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Shard rows (``image`` bytes or video ``frames``, ``caption``, optional ``lang``) -> ``pixels``,
    ``input_ids``, ``attention_mask`` (and ``lang`` codes); pixels are ``(B, T, H, W, 3)`` when
    ``num_frames`` > 1. With
    ``significant_words`` also ``significant``: per token, 0 or the 1-based index of the significant
    word it belongs to (SNP-S3's masking and word matching read it)."""
    from vlp.data.tokenizer import tokenize_captions

    rng = np.random.default_rng() if augment else None
    items = ([list(f) for f in batch["frames"]] if "frames" in batch else list(batch["image"]))
    pixels = decode_media(items, num_frames, image_size, rng, min_crop_scale)
    captions = [str(c) for c in batch["caption"]]
    tokens = tokenize_captions(cached_tokenizer(tokenizer_path), captions, max_text_length,
                               offsets=significant_words is not None)
    if "lang" in batch:  # the shard column
        tokens[LANG] = language_codes(batch["lang"])
    if significant_words is not None:
        from vlp.data.significant_words import significant_word_ids

        tokens[SIGNIFICANT] = significant_word_ids(captions, tokens.pop("offsets"),
                                                     _word_set(significant_words))
    return {PIXELS: pixels, **tokens}


@functools.lru_cache(maxsize=2)
def _word_set(words: tuple[str, ...]) -> frozenset[str]:
    return frozenset(words)


def pixels_to_model(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(..., H, W, 3)`` uint8 -> ``(..., 3, H, W)`` normalised floats, on the tensor's device
    (images ``(B, H, W, 3)`` and clips ``(B, T, H, W, 3)`` alike)."""
    x = pixels.movedim(-1, -3).to(dtype) / 255.0
    mean = torch.tensor(PIXEL_MEAN, device=x.device, dtype=dtype).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device, dtype=dtype).view(3, 1, 1)
    return (x - mean) / std
