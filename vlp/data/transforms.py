"""Pure batch transforms from shard rows to model inputs (plain functions over dicts of arrays).

Ray Data runs ``prepare_train_batch`` on CPU workers: decode the stored JPEG/WebP bytes, take a random
resized crop, tokenize the caption. Pixels leave as ``uint8`` HWC (a quarter of the bytes of float32
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

# CLIP's pixel statistics: the convention of the pretrained towers a user may load.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


def decode_resize(data: bytes, size: int, rng: np.random.Generator | None = None,
                  min_crop_scale: float = 1.0) -> np.ndarray:
    """One image -> ``(size, size, 3)`` uint8; a random crop of area in [min_crop_scale, 1] when
    ``rng`` is given, the whole image otherwise (evaluation)."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))  # JPEG: let libjpeg decode at a reduced scale
        im = im.convert("RGB")
        w, h = im.size
        box = (0, 0, w, h)
        if rng is not None and min_crop_scale < 1.0:
            scale = rng.uniform(min_crop_scale, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw = int(round(min(w, np.sqrt(scale * w * h * aspect))))
            ch = int(round(min(h, np.sqrt(scale * w * h / aspect))))
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
        out = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(out, dtype=np.uint8)


def decode_images(images: Sequence[bytes], size: int, rng: np.random.Generator | None = None,
                  min_crop_scale: float = 1.0) -> np.ndarray:
    """Many images -> ``(B, size, size, 3)`` uint8."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = decode_resize(data, size, rng, min_crop_scale)
    return out


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """One tokenizer per path per process (Ray Data workers reuse it across batches)."""
    from vlp.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def prepare_train_batch(batch: dict[str, np.ndarray], *, image_size: int, max_text_length: int,
                        tokenizer_path: str, min_crop_scale: float = 1.0,
                        augment: bool = True) -> dict[str, np.ndarray]:
    """Shard rows (``image`` bytes, ``caption``) -> ``pixels``, ``input_ids``, ``attention_mask``."""
    from vlp.data.tokenizer import tokenize_captions

    rng = np.random.default_rng() if augment else None
    pixels = decode_images(list(batch["image"]), image_size, rng, min_crop_scale)
    tokens = tokenize_captions(cached_tokenizer(tokenizer_path), [str(c) for c in batch["caption"]],
                               max_text_length)
    return {"pixels": pixels, **tokens}


def pixels_to_model(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` normalised floats, on the tensor's device."""
    x = pixels.permute(0, 3, 1, 2).to(dtype) / 255.0
    mean = torch.tensor(PIXEL_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std
