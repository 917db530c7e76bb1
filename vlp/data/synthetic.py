"""Generated image-text pairs with known content, for the quickstart, the tests and the benchmarks.

Each image shows one coloured shape (circle, square, triangle, ...) of a given size at a given place on
a light background; its caption says so, in English or in Chinese. Layouts and backgrounds are random
per sample, so no two clean samples are near-duplicates. With ``broken=True`` the set also holds one of
every bad case the curation must survive, and ``expected.json`` records what should happen to each key
(``kept`` or the drop reason), so tests compare against it instead of hard-coding counts.
"""

from __future__ import annotations

import io
import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from vlp.data.sample_vocabulary import COLOURS, SHAPES

SIZES = {"small": "小", "large": "大"}
PLACES = {
    "top left": "左上角", "top right": "右上角", "bottom left": "左下角", "bottom right": "右下角",
    "centre": "中间",
}


@dataclass(frozen=True)
class SampleSpec:
    colour: str
    shape: str
    size: str
    place: str

    def caption(self, lang: str) -> str:
        if lang == "zh":
            return (f"{PLACES[self.place]}有一个{SIZES[self.size]}的"
                    f"{COLOURS[self.colour][1]}{SHAPES[self.shape]}")
        where = "in the centre" if self.place == "centre" else f"in the {self.place}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


def _place_centre(place: str, w: int, h: int, rng: random.Random) -> tuple[float, float]:
    fx = {"left": 0.27, "right": 0.73}.get(place.split()[-1], 0.5) if place != "centre" else 0.5
    fy = {"top": 0.27, "bottom": 0.73}.get(place.split()[0], 0.5) if place != "centre" else 0.5
    return (fx + rng.uniform(-0.07, 0.07)) * w, (fy + rng.uniform(-0.07, 0.07)) * h


def draw_sample(spec: SampleSpec, width: int, height: int, rng: random.Random) -> Image.Image:
    """Render a sample: a light, smooth random background, a few faint strokes, the shape.

    The background is random low-frequency noise: it decides most of an image's perceptual hash, so
    two distinct samples are far apart in pHash space (and only real copies count as duplicates).
    """
    base = np.array([rng.randint(185, 235) for _ in range(3)], dtype=np.float32)
    grid = np.array([[rng.uniform(-1, 1) for _ in range(5)] for _ in range(5)], dtype=np.float32)
    smooth = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8), "L").resize(
        (width, height), Image.Resampling.BICUBIC)
    noise = (np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0)[..., None] * 45.0
    im = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(2, 5)):  # faint strokes make layouts (and so pHashes) distinct
        tone = tuple(int(c) - rng.randint(20, 60) for c in base)
        d.line([(rng.uniform(0, width), rng.uniform(0, height)),
                (rng.uniform(0, width), rng.uniform(0, height))], fill=tone,
               width=max(2, width // 60))
    cx, cy = _place_centre(spec.place, width, height, rng)
    r = min(width, height) * (0.11 if spec.size == "small" else 0.22) * rng.uniform(0.9, 1.1)
    colour = COLOURS[spec.colour][0]
    if spec.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif spec.shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif spec.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif spec.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif spec.shape == "cross":
        t = r / 3
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    else:  # star
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy - rad * np.sin(a)))
        d.polygon(pts, fill=colour)
    return im


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_spec(rng: random.Random) -> SampleSpec:
    return SampleSpec(rng.choice(list(COLOURS)), rng.choice(list(SHAPES)),
                      rng.choice(list(SIZES)), rng.choice(list(PLACES)))


@dataclass
class SampleSet:
    root: str
    manifest: str
    expected: dict[str, str]  # key -> "kept" or the expected drop reason
    # Copies of one image: exactly one of them is kept (which one depends on processing order, since
    # parallel workers race), the others drop as duplicate_exact or duplicate_near.
    duplicate_groups: list[set[str]] = field(default_factory=list)

    @property
    def kept_keys(self) -> set[str]:
        return {k for k, v in self.expected.items() if v == "kept"}


class ManifestBuilder:
    """The files, ``manifest.jsonl`` and ``expected.json`` of a generated sample set, row by row."""

    def __init__(self, root: str, folder: str):
        self.root, self.folder = root, folder
        self.lines: list[bytes] = []
        self.expected: dict[str, str] = {}  # key -> "kept" or the expected drop reason
        os.makedirs(os.path.join(root, folder), exist_ok=True)

    def add(self, key: str, data: bytes | None, ext: str, caption, outcome: str, *,
            file: str | None = None, raw_line: bytes | None = None, **fields) -> None:
        """A row for ``key`` (its file ``<folder>/<file or key>.<ext>`` written when ``data`` is given;
        ``raw_line`` replaces the JSON line; ``fields`` that are not None join the record)."""
        rel = f"{self.folder}/{file or key}.{ext}"
        if data is not None:
            with open(os.path.join(self.root, rel), "wb") as f:
                f.write(data)
        if raw_line is not None:
            self.lines.append(raw_line)
        else:
            rec = {"key": key, "path": rel}
            if caption is not None:
                rec["caption"] = caption
            rec.update({k: v for k, v in fields.items() if v is not None})
            self.lines.append(json.dumps(rec, ensure_ascii=False).encode())
        self.expected[key] = outcome

    def next_line_key(self) -> str:
        """The key the reader gives the next line when it cannot parse it (file and line number)."""
        return f"manifest-{len(self.lines):09d}"

    def write(self) -> str:
        """Write ``manifest.jsonl`` and ``expected.json``; return the manifest's path."""
        manifest = os.path.join(self.root, "manifest.jsonl")
        with open(manifest, "wb") as f:
            f.write(b"\n".join(self.lines) + b"\n")
        with open(os.path.join(self.root, "expected.json"), "w", encoding="utf-8") as f:
            json.dump(self.expected, f, indent=1, sort_keys=True)
        return manifest


def generate_image_text_samples(
    root: str,
    n: int = 200,
    *,
    seed: int = 0,
    broken: bool = True,
    min_size: int = 160,
    max_size: int = 480,
    zh_fraction: float = 0.5,
    varied_formats: bool = True,
) -> SampleSet:
    """Write ``images/`` and ``manifest.jsonl`` (paths relative to it) under ``root``.

    Args:
        n: clean samples (broken cases come on top).
        broken: add one of each bad case, see ``expected.json``.
        min_size, max_size: range of the clean images' sides.
        varied_formats: also write PNG, RGBA, palette, CMYK, 16-bit, WebP, animated GIF and
            EXIF-rotated JPEGs among the clean samples.
    """
    rng = random.Random(seed)
    rows = ManifestBuilder(root, "images")
    add = rows.add
    keep_files: dict[str, bytes] = {}

    formats = ["jpeg"] * 6
    if varied_formats:
        formats += ["png", "rgba", "palette", "cmyk", "i16", "webp", "gif_anim", "exif_rot"]
    for i in range(n):
        spec = random_spec(rng)
        w, h = rng.randint(min_size, max_size), rng.randint(min_size, max_size)
        if max(w, h) / min(w, h) > 2.5:
            w = h
        im = draw_sample(spec, w, h, rng)
        lang = "zh" if rng.random() < zh_fraction else "en"
        fmt = formats[i % len(formats)]
        if fmt == "jpeg":
            data, ext = _encode(im, "JPEG", quality=90), "jpg"
        elif fmt == "png":
            data, ext = _encode(im, "PNG"), "png"
        elif fmt == "rgba":
            data, ext = _encode(im.convert("RGBA"), "PNG"), "png"
        elif fmt == "palette":
            data, ext = _encode(im.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "png"
        elif fmt == "cmyk":
            data, ext = _encode(im.convert("CMYK"), "JPEG", quality=90), "jpg"
        elif fmt == "i16":
            grey = (np.asarray(im.convert("L"), dtype=np.uint16) * 257)
            data, ext = _encode(Image.fromarray(grey), "PNG"), "png"  # mode I;16
        elif fmt == "webp":
            data, ext = _encode(im, "WEBP", quality=90), "webp"
        elif fmt == "gif_anim":
            frames = [im, im.rotate(10)]
            buf = io.BytesIO()
            frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
            data, ext = buf.getvalue(), "gif"
        else:  # exif_rot: stored sideways, EXIF orientation 6 says rotate to display upright
            exif = Image.Exif()
            exif[0x0112] = 6
            data, ext = _encode(im.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90,
                                exif=exif.tobytes()), "jpg"
        key = f"s{i:06d}"
        add(key, data, ext, spec.caption(lang), "kept")
        keep_files[key] = data

    if broken:
        clean = draw_sample(random_spec(rng), 300, 240, rng)
        good_jpeg = _encode(clean, "JPEG", quality=90)
        cap = "a large red circle in the centre"
        add("bad_random_bytes", bytes(rng.getrandbits(8) for _ in range(2048)), "jpg", cap,
            "not_an_image")
        add("bad_truncated", good_jpeg[: len(good_jpeg) // 2], "jpg", cap, "corrupt_image")
        add("bad_empty", b"", "jpg", cap, "empty_file")
        add("bad_text_file", b"<html>404 not found</html>", "jpg", cap, "not_an_image")
        add("bad_missing_file", None, "jpg", cap, "file_not_found")
        add("bad_no_caption", good_jpeg, "jpg", None, "missing_caption")
        add("bad_empty_caption", good_jpeg, "jpg", "   ", "missing_caption")
        add("bad_utf8", good_jpeg, "jpg", None, "invalid_utf8",
            raw_line=b'{"key": "bad_utf8", "path": "images/bad_utf8.jpg", "caption": "a red \xff\xfe circle"}')
        # A line that is not JSON has no readable key: the reader names it by file and line number.
        add(rows.next_line_key(), None, "jpg", None, "malformed_row",
            raw_line=b'{"key": "bad_json", "path": "images/x.jpg", "caption": ')
        add("bad_tiny", _encode(draw_sample(random_spec(rng), 24, 24, rng), "PNG"), "png",
            "a small blue square in the centre", "image_too_small")
        add("bad_aspect", _encode(draw_sample(random_spec(rng), 1200, 150, rng), "JPEG"), "jpg",
            "a small green circle in the centre", "aspect_ratio_too_large")
        add("bad_short_caption", good_jpeg, "jpg", "ok", "caption_too_short")
        add("bad_language_ja", good_jpeg, "jpg", "中央に大きな赤い丸があります", "language_not_allowed")
        add("bad_language_ru", good_jpeg, "jpg", "большой красный круг в центре изображения",
            "language_not_allowed")
        bomb = Image.new("1", (12_000, 12_000), 0)
        add("bad_bomb", _encode(bomb, "PNG", optimize=True), "png", cap, "decompression_bomb")
        # Duplicates of clean samples: exact bytes, and a re-encoded, slightly smaller copy.
        first = next(k for k in keep_files)
        add("dup_exact", keep_files[first], "jpg", "a copy of the first sample", "duplicate_exact")
        src = Image.open(io.BytesIO(keep_files[first])).convert("RGB")
        near = src.resize((int(src.width * 0.9), int(src.height * 0.9)))
        add("dup_near", _encode(near, "JPEG", quality=70), "jpg", "a smaller copy of the first sample",
            "duplicate_near")
        # Captions that normalisation must clean (and keep).
        add("html_caption", _encode(draw_sample(random_spec(rng), 320, 256, rng), "JPEG"), "jpg",
            "a small black star &amp; a line <b>in the centre</b> https://example.com/x.jpg",
            "kept")
    manifest = rows.write()
    groups = [{next(iter(keep_files)), "dup_exact", "dup_near"}] if broken else []
    return SampleSet(root, manifest, rows.expected, groups)


def generate_classification_set(root: str, per_class: int = 20, seed: int = 1,
                                size: int = 128) -> dict:
    """A labelled zero-shot classification set: which shape is in the image (any colour, size, place).

    Writes ``data.parquet`` (``image`` JPEG bytes, ``label``) and ``classes.json`` (class names in
    English and Chinese, as the prompt templates of ``vlp eval`` expect).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    names = list(SHAPES)
    images, labels = [], []
    for label, shape in enumerate(names):
        for _ in range(per_class):
            spec = SampleSpec(rng.choice(list(COLOURS)), shape, rng.choice(list(SIZES)),
                              rng.choice(list(PLACES)))
            images.append(_encode(draw_sample(spec, size, size, rng), "JPEG", quality=90))
            labels.append(label)
    os.makedirs(root, exist_ok=True)
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()),
                             "label": pa.array(labels, pa.int32())}),
                   os.path.join(root, "data.parquet"))
    classes = {"task": "shape", "classnames": {"en": names, "zh": [SHAPES[n] for n in names]}}
    with open(os.path.join(root, "classes.json"), "w", encoding="utf-8") as f:
        json.dump(classes, f, ensure_ascii=False, indent=2)
    return classes
