"""Image transforms: probe, decode, convert, resize, encode and perceptual hash.

Pure functions on bytes and Pillow images. Work is split so that cheap checks come first:
``probe_image`` reads only the header (size, orientation, format), image filters look at that, and only
then ``render_image`` decodes, at a reduced scale when JPEG draft decoding allows it (the DCT is
scaled by 1/2, 1/4 or 1/8 inside libjpeg, which is most of the speed of a resize to 256 px).

Every failure raises ``ImageDropError`` with a drop reason, never a bare Pillow exception.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Size limits are checked explicitly in probe_image against the configured max_pixels; Pillow's own
# guard would otherwise raise or warn with its default limit first.
Image.MAX_IMAGE_PIXELS = None
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

ResizeMode = Literal["center_crop", "keep_ratio", "border", "none"]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class ImageConfig:
    """Decoding and output of images.

    Attributes:
        size: target side in pixels (the square side for ``center_crop`` and ``border``, the short side
            for ``keep_ratio``).
        resize_mode: ``center_crop`` (short side to size, crop the centre), ``keep_ratio`` (short side
            to size), ``border`` (long side to size, pad to a square), ``none`` (keep the size).
        format: output encoding.
        quality: JPEG/WebP quality.
        max_pixels: images with more pixels are dropped as decompression bombs before decoding.
        draft: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller.
        resample: resampling filter of the resize.
        resizer: ``opencv`` (default): an antialiased resize built from OpenCV's SIMD kernels, a
            Gaussian pre-filter matched to the scale factor and then ``resample`` interpolation; about
            4x faster than Pillow's and within 2 dB PSNR of it on high-frequency content
            (``benchmarks/README.md``). ``pillow``: Pillow's own convolution resize, the reference.
        upscale: enlarge images smaller than ``size``; if false they keep their size.
    """

    size: int = 256
    resize_mode: ResizeMode = "center_crop"
    format: Literal["jpeg", "webp"] = "jpeg"
    quality: int = 95
    max_pixels: int = 89_478_485
    draft: bool = True
    resample: Literal["nearest", "bilinear", "bicubic", "lanczos", "box"] = "bicubic"
    resizer: Literal["opencv", "pillow"] = "opencv"
    upscale: bool = True

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"image.size must be at least 8, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"image.quality must be in 1..100, got {self.quality}")


class ImageDropError(Exception):
    """An image that cannot be used; ``reason`` is the drop reason counted in the stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ProbedImage:
    """An opened (not yet decoded) image and its displayed size (after EXIF orientation)."""

    image: Image.Image
    orig_width: int
    orig_height: int
    orientation: int


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def probe_image(data: bytes, max_pixels: int) -> ProbedImage:
    """Open image bytes and read the header only.

    Raises:
        ImageDropError: ``empty_file``, ``not_an_image``, ``decompression_bomb`` or ``corrupt_image``.
    """
    if not data:
        raise ImageDropError("empty_file")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDropError("not_an_image", f"{len(data)} bytes, unknown format") from None
    except Image.DecompressionBombError as e:
        raise ImageDropError("decompression_bomb", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageDropError("corrupt_image", str(e)[:200]) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDropError("corrupt_image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDropError("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not drop a decodable image
        orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return ProbedImage(im, w, h, orientation)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB from any mode: alpha composited on white, 16-bit scaled, palettes and CMYK converted."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def _draft_request(w: int, h: int, config: ImageConfig) -> tuple[int, int] | None:
    """Smallest decode size that still covers the target, in stored (pre-orientation) pixels."""
    if config.resize_mode == "none":
        return None
    if config.resize_mode == "border":
        scale = config.size / max(w, h)
    else:
        scale = config.size / min(w, h)
    if scale >= 1:
        return None
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def decode_image(probed: ProbedImage, config: ImageConfig) -> Image.Image:
    """Decode to an upright RGB image, at a reduced scale when draft decoding allows it.

    Raises:
        ImageDropError: ``corrupt_image`` for truncated or undecodable data.
    """
    im = probed.image
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animations: the first frame
        if config.draft and im.format == "JPEG":
            request = _draft_request(im.size[0], im.size[1], config)
            if request:
                im.draft("RGB", request)
        im.load()
        if probed.orientation != 1:
            im = ImageOps.exif_transpose(im)
        return _to_rgb(im)
    except ImageDropError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageDropError("corrupt_image", str(e)[:200]) from None


def resize_image(im: Image.Image, config: ImageConfig) -> Image.Image:
    """Apply the configured resize mode to an RGB image."""
    size = config.size
    w, h = im.size
    mode = config.resize_mode
    if mode == "none":
        return im
    if mode == "center_crop":
        side = min(w, h)
        if side < size and not config.upscale:
            size = side
        if config.resizer == "opencv":
            # Whole-pixel crop: the centre moves by at most half a source pixel.
            left, top = (w - side) // 2, (h - side) // 2
            crop = np.asarray(im)[top:top + side, left:left + side]
            return Image.fromarray(opencv_resize(crop, size, size, config.resample))
        left, top = (w - side) / 2, (h - side) / 2
        # One resampling pass straight from the centre square of the source: no intermediate image.
        return im.resize((size, size), _RESAMPLE[config.resample],
                         box=(left, top, left + side, top + side))
    if mode == "keep_ratio":
        scale = size / min(w, h)
    else:  # border
        scale = size / max(w, h)
    if scale > 1 and not config.upscale:
        scale = 1.0
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new == (w, h):
        out = im
    elif config.resizer == "opencv":
        out = Image.fromarray(opencv_resize(np.asarray(im), new[0], new[1], config.resample))
    else:
        out = im.resize(new, _RESAMPLE[config.resample])
    if mode == "border":
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(out, ((size - new[0]) // 2, (size - new[1]) // 2))
        return canvas
    return out


_CV_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
    "box": cv2.INTER_AREA,
}


def _antialias_sigma(scale: float) -> float:
    """Gaussian pre-filter for a downscale by ``scale`` (> 1) ahead of a fixed-support interpolator.

    OpenCV's linear and cubic kernels keep their support when shrinking, so frequencies above the new
    Nyquist limit alias. A Gaussian of this width adds what the interpolator lacks to act like a
    kernel stretched by ``scale`` (variances add: 0.25 (scale^2 - 1)); the constant was chosen on
    high-frequency test images against a full-resolution Lanczos reference.
    """
    return 0.5 * math.sqrt(scale * scale - 1.0)


def opencv_resize(pixels: np.ndarray, width: int, height: int, resample: str = "bicubic") -> np.ndarray:
    """Resize an HxWxC uint8 array to ``width`` x ``height``, antialiased when shrinking.

    ``box`` is OpenCV's area averaging and ``nearest`` picks pixels; the others pre-filter each
    shrinking axis with a Gaussian, then interpolate.
    """
    h, w = pixels.shape[:2]
    if (w, h) == (width, height):
        return np.ascontiguousarray(pixels)
    sx, sy = w / width, h / height
    if resample not in ("nearest", "box") and (sx > 1 or sy > 1):
        # sigma 0 would mean "derive from the kernel size"; a tiny sigma is a 1-tap (identity) kernel.
        sigma_x = _antialias_sigma(sx) if sx > 1 else 1e-3
        sigma_y = _antialias_sigma(sy) if sy > 1 else 1e-3
        pixels = cv2.GaussianBlur(pixels, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    return cv2.resize(np.ascontiguousarray(pixels), (width, height),
                      interpolation=_CV_INTERPOLATION[resample])


def limit_native_threads(n: int) -> None:
    """Cap OpenCV's and the BLAS library's thread pools (both default to every core of the machine):
    a curation worker that reserved ``n`` CPUs must not spread its resizes and the pHash's small
    matrix products over the other workers' cores (a 2-thread BLAS doubles the pHash's CPU time)."""
    from threadpoolctl import threadpool_limits

    cv2.setNumThreads(max(1, int(n)))
    threadpool_limits(limits=max(1, int(n)))


def encode_image(im: Image.Image, config: ImageConfig) -> bytes:
    buf = io.BytesIO()
    if config.format == "jpeg":
        im.save(buf, format="JPEG", quality=config.quality)
    else:
        im.save(buf, format="WEBP", quality=config.quality)
    return buf.getvalue()


# DCT-II basis for 32 samples; phash = sign of the 8x8 lowest frequencies against their median.
_N = 32
_DCT = np.cos(np.pi * np.outer(np.arange(_N), 2 * np.arange(_N) + 1) / (2 * _N))


def perceptual_hash(im: Image.Image) -> int:
    """64-bit DCT perceptual hash (the ``phash`` of the imagehash library), as a signed int64.

    Grey 32x32 (Lanczos), 2-D DCT-II, the top-left 8x8 coefficients compared with their median, bits
    packed row-major with the first bit most significant.
    """
    grey_image = im.convert("L")
    if grey_image.size[0] == grey_image.size[1]:  # the stored square crops: the fast exact path
        grey = lanczos_shrink_exact(np.asarray(grey_image), _N, _N)
    else:
        grey = np.asarray(grey_image.resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    coeffs = _DCT @ grey @ _DCT.T
    low = coeffs[:8, :8]
    bits = (low > np.median(low)).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


# Pillow's fixed-point resampling of 8-bit images (libImaging/Resample.c): coefficients scaled by
# 2^22, a rounding half added, an arithmetic shift, a clamp to 0..255, horizontal pass first.
_PRECISION_BITS = 22


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)


@functools.lru_cache(maxsize=64)
def _pillow_lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) fixed-point weights of Pillow's Lanczos resize along one axis, as float64
    (integers below 2^31: every product and sum of a pass stays exact in double precision)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    inverse = 1.0 / filterscale
    weights = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = _lanczos3((np.arange(xmin, xmax) - center + 0.5) * inverse)
        total = 0.0
        for value in w:  # in order, as Pillow sums (numpy's pairwise sum may round differently)
            total += value
        if total != 0.0:
            w = w / total
        # C's (int)(w * 2^22 +/- 0.5): round half away from zero, by truncation.
        weights[xx, xmin:xmax] = np.trunc(w * (1 << _PRECISION_BITS) + np.where(w < 0, -0.5, 0.5))
    return weights


def _fixed_point_pass(weighted: np.ndarray) -> np.ndarray:
    return np.clip(np.floor((weighted + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)), 0, 255)


def lanczos_shrink_exact(grey: np.ndarray, width: int, height: int) -> np.ndarray:
    """``Image.fromarray(grey).resize((width, height), LANCZOS)`` bit for bit, as float64, by two
    matrix products: 0.13 ms for 256 -> 32 px where Pillow's own loop takes 0.29 ms.

    Only for a square input to a square output: there Pillow runs the horizontal pass first. For
    other shapes Pillow 13 may run the vertical pass first (its choice depends on both sizes), and the
    rounding between the passes makes the order matter.
    """
    h, w = grey.shape
    if h != w or width != height:
        raise ValueError(f"lanczos_shrink_exact takes square to square, got {w}x{h} -> {width}x{height}")
    across = _fixed_point_pass(grey.astype(np.float64) @ _pillow_lanczos_matrix(w, width).T)
    return _fixed_point_pass(_pillow_lanczos_matrix(h, height) @ across)


def hamming_distance(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


@dataclass
class RenderedImage:
    data: bytes
    width: int
    height: int
    phash: int


def render_image(probed: ProbedImage, config: ImageConfig) -> RenderedImage:
    """Decode, resize, hash and encode a probed image.

    The pHash is that of the stored image (after the resize): a 256 px image hashes about 8x faster
    than the decoded source, copies at any source resolution still meet, and a reader can check it
    against ``perceptual_hash`` of the shard's own pixels.
    """
    out = resize_image(decode_image(probed, config), config)
    return RenderedImage(encode_image(out, config), out.size[0], out.size[1], perceptual_hash(out))
