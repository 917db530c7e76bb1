"""Image transforms: probe, decode, convert, resize, encode and perceptual hash.

Pure functions on bytes, Pillow images and numpy arrays. Work is split so that cheap checks come first:
``probe_image`` reads only the header (size, orientation, format), image filters look at that, and only
then ``render_image`` decodes, at a reduced scale when JPEG draft decoding allows it (the DCT is
scaled by 1/2, 1/4 or 1/8 inside libjpeg, which is most of the speed of a resize to 256 px).

Between decoding and encoding the pixels are numpy arrays (height x width x RGB, uint8): OpenCV resizes
them and, for JPEG, simplejpeg (libjpeg-turbo's TurboJPEG API) decodes straight into one, skipping
Pillow's chunked decoder loop and its copy (``ImageConfig.jpeg_decoder``). Encoding stays with Pillow:
simplejpeg's encoder uses libjpeg's fast integer DCT whatever it is asked, 0.9 dB lower PSNR at q95.

Every failure raises ``DropError`` with a drop reason, never a bare Pillow exception.
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
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from vlp.curation.drops import DropError

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
        jpeg_decoder: ``simplejpeg`` (default): colour and greyscale JPEGs are decoded by libjpeg-turbo's
            TurboJPEG API straight into a numpy array: the same library Pillow wraps, the same draft
            scale, the same pixels bit for bit, in about 0.8 instead of 1.3 ms for the benchmark's
            photos (``benchmarks/README.md``). Other JPEGs (CMYK, multi-picture) and any JPEG it
            refuses go through Pillow, which then decides whether the image is corrupt. ``pillow``:
            Pillow decodes every image.
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
    jpeg_decoder: Literal["simplejpeg", "pillow"] = "simplejpeg"

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"image.size must be at least 8, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"image.quality must be in 1..100, got {self.quality}")



@dataclass
class ProbedImage:
    """An opened (not yet decoded) image, its bytes and its displayed size (after EXIF orientation)."""

    image: Image.Image
    orig_width: int
    orig_height: int
    orientation: int
    data: bytes = b""


_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def probe_image(data: bytes, max_pixels: int) -> ProbedImage:
    """Open image bytes and read the header only.

    Raises:
        DropError: ``empty_file``, ``not_an_image``, ``decompression_bomb`` or ``corrupt_image``.
    """
    if not data:
        raise DropError("empty_file")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DropError("not_an_image", f"{len(data)} bytes, unknown format") from None
    except Image.DecompressionBombError as e:
        raise DropError("decompression_bomb", str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DropError("corrupt_image", str(e)[:200]) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise DropError("corrupt_image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise DropError("decompression_bomb", f"{w}x{h} > {max_pixels} pixels")
    try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not drop a decodable image
        orientation = 1
    if orientation in _SWAPPING_ORIENTATIONS:
        w, h = h, w
    return ProbedImage(im, w, h, orientation, data)


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
        DropError: ``corrupt_image`` for truncated or undecodable data.
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
    except DropError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise DropError("corrupt_image", str(e)[:200]) from None


# EXIF orientation as array views (the inverse of how the camera stored the pixels), as
# ``ImageOps.exif_transpose`` applies it.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _draft_factor(w: int, h: int, config: ImageConfig) -> int:
    """Pillow's draft scale choice: the largest of 8, 4, 2, 1 that keeps the decode at least as large
    as ``_draft_request`` on both axes."""
    request = _draft_request(w, h, config) if config.draft else None
    if not request:
        return 1
    fits = min(w // request[0], h // request[1])
    return next(k for k in (8, 4, 2, 1) if fits >= k)


def _decode_jpeg_fast(probed: ProbedImage, config: ImageConfig) -> np.ndarray | None:
    """libjpeg-turbo decode of a colour or greyscale JPEG at Pillow's draft scale, upright; None when
    this path does not apply or the codec refuses the data (Pillow then has the last word)."""
    im = probed.image
    if im.format != "JPEG" or im.mode not in ("RGB", "L") or not probed.data:
        return None
    w, h = im.size
    k = _draft_factor(w, h, config)
    try:
        # min_factor with the exact 1/k size pins the TurboJPEG scale to 1/k (it also offers 3/8, 5/8
        # and others; those scaled IDCTs keep too little margin above the target and alias: 3.6 dB
        # lower PSNR on the benchmark's photos, 4.7 dB on high-frequency images).
        pixels = simplejpeg.decode_jpeg(probed.data, colorspace="RGB", min_factor=k,
                                        min_width=-(-w // k), min_height=-(-h // k))
    except ValueError:
        return None
    if probed.orientation in _ORIENT:
        pixels = np.ascontiguousarray(_ORIENT[probed.orientation](pixels))
    return pixels


def decode_pixels(probed: ProbedImage, config: ImageConfig) -> np.ndarray:
    """``decode_image`` as an upright RGB uint8 array, by simplejpeg where ``config.jpeg_decoder`` allows.

    Raises:
        DropError: ``corrupt_image`` for truncated or undecodable data.
    """
    if config.jpeg_decoder == "simplejpeg":
        pixels = _decode_jpeg_fast(probed, config)
        if pixels is not None:
            return pixels
    return np.asarray(decode_image(probed, config))


def resize_pixels(pixels: np.ndarray, config: ImageConfig) -> np.ndarray:
    """Apply the configured resize mode to an RGB uint8 array."""
    size = config.size
    h, w = pixels.shape[:2]
    mode = config.resize_mode
    if mode == "none":
        return pixels
    if mode == "center_crop":
        side = min(w, h)
        if side < size and not config.upscale:
            size = side
        if config.resizer == "opencv":
            # Whole-pixel crop: the centre moves by at most half a source pixel.
            left, top = (w - side) // 2, (h - side) // 2
            return opencv_resize(pixels[top:top + side, left:left + side], size, size, config.resample)
        left, top = (w - side) / 2, (h - side) / 2
        # One resampling pass straight from the centre square of the source: no intermediate image.
        return np.asarray(Image.fromarray(pixels).resize(
            (size, size), _RESAMPLE[config.resample], box=(left, top, left + side, top + side)))
    if mode == "keep_ratio":
        scale = size / min(w, h)
    else:  # border
        scale = size / max(w, h)
    if scale > 1 and not config.upscale:
        scale = 1.0
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new == (w, h):
        out = pixels
    elif config.resizer == "opencv":
        out = opencv_resize(pixels, new[0], new[1], config.resample)
    else:
        out = np.asarray(Image.fromarray(pixels).resize(new, _RESAMPLE[config.resample]))
    if mode == "border":
        canvas = np.zeros((size, size, 3), np.uint8)
        top, left = (size - new[1]) // 2, (size - new[0]) // 2
        canvas[top:top + new[1], left:left + new[0]] = out
        return canvas
    return out


def resize_image(im: Image.Image, config: ImageConfig) -> Image.Image:
    """``resize_pixels`` on a Pillow RGB image."""
    return Image.fromarray(resize_pixels(np.asarray(im), config))


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
    """Encode an RGB image in the configured format and quality (Pillow)."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG" if config.format == "jpeg" else "WEBP", quality=config.quality)
    return buf.getvalue()


def encode_pixels(pixels: np.ndarray, config: ImageConfig) -> bytes:
    return encode_image(Image.fromarray(pixels), config)


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
    out = Image.fromarray(resize_pixels(decode_pixels(probed, config), config))  # once, for both
    return RenderedImage(encode_image(out, config), out.size[0], out.size[1], perceptual_hash(out))
