"""A web-like photo corpus for the curation benchmarks, made from the photos scikit-image ships.

Web photos are bigger and more varied than the project's synthetic shapes (27 KB, 400-1000 px): issue
16 measured the gap. Each file here is a random crop of one of scikit-image's photos, scaled so that its
sides are 300-1600 px (aspect 0.6-1.7; mean about 0.8 MP, 120 KB), with mild sensor-like grain (so that it
compresses like a photo, not like an upscaled one), saved as JPEG at quality 75-95; 30 % progressive,
10 % greyscale, 10 % with an EXIF orientation (the pixels stored turned, as a camera writes them).

    write_web_photos(root, n, seed)   # root/images/*.jpg and root/manifest.jsonl (key, path, caption)
"""

from __future__ import annotations

import io
import json
import os

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel", "moon", "clock", "coins",
          "cell", "colorwheel")
CAPTIONS = ("an astronaut in a space suit", "a cup of coffee", "a cat looking at the camera",
            "a rocket on the launch pad", "a photographer with a camera", "distant galaxies",
            "stained tissue under a microscope", "a retina", "a brick wall", "green grass", "gravel",
            "the surface of the moon", "a clock on a wall", "old coins", "cells", "a colour wheel")
EXIF_ORIENTATION = 0x0112


def _photo(name: str):
    import numpy as np
    from skimage import data

    a = np.asarray(getattr(data, name)())
    if a.dtype != np.uint8:
        a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def web_photo(rng, photos: list) -> tuple[bytes, int]:
    """One JPEG like a web photo, and the index of the photo it shows."""
    import numpy as np
    from PIL import Image

    which = int(rng.integers(len(photos)))
    src = photos[which]
    h, w = src.shape[:2]
    frac = rng.uniform(0.55, 1.0)
    ch, cw = max(32, int(h * frac)), max(32, int(w * frac * rng.uniform(0.8, 1.2)))
    cw = min(cw, w)
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(src[top:top + ch, left:left + cw])
    aspect = rng.uniform(0.6, 1.7)
    # longer side mostly 720-1280 (mean area about 0.8 MP), the tails to 300 and 1600
    long = int(np.clip(rng.normal(1000, 280), 300, 1600))
    short = max(300, int(long / max(aspect, 1 / aspect)))
    size = (long, short) if aspect >= 1 else (short, long)
    im = crop.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.float32)
    arr = np.clip(arr + rng.normal(0, rng.uniform(2.0, 5.0), arr.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    if rng.random() < 0.1:
        im = im.convert("L")
    exif = Image.Exif()
    if rng.random() < 0.1:  # a camera's way: pixels stored turned, the tag says how to show them
        orientation = int(rng.choice([6, 8]))
        im = im.transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
        exif[EXIF_ORIENTATION] = orientation
    out = io.BytesIO()
    im.save(out, "JPEG", quality=int(rng.integers(75, 96)), progressive=bool(rng.random() < 0.3),
            optimize=False, exif=exif.tobytes())
    return out.getvalue(), which


def write_web_photos(root: str, n: int, seed: int) -> str:
    """``n`` web-like photos under ``root/images/`` and ``root/manifest.jsonl``; returns the manifest."""
    import numpy as np

    rng = np.random.default_rng(seed)
    photos = [_photo(name) for name in PHOTOS]
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest + ".tmp", "w", encoding="utf-8") as f:
        for i in range(n):
            data, which = web_photo(rng, photos)
            path = f"images/{seed:03d}_{i:07d}.jpg"
            with open(os.path.join(root, path), "wb") as img:
                img.write(data)
            f.write(json.dumps({"key": f"{seed:03d}_{i:07d}", "path": path,
                                "caption": f"a photo of {CAPTIONS[which]}"}) + "\n")
    os.replace(manifest + ".tmp", manifest)
    return manifest
