"""Image transforms: probing, decoding every mode to RGB, orientation, resize modes, pHash."""

import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from vlp.curation.drops import DropError
from vlp.curation.image import (
    ImageConfig,
    decode_image,
    hamming_distance,
    perceptual_hash,
    probe_image,
    render_image,
    resize_image,
)


def _bytes(im, fmt="PNG", **kw):
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w=320, h=200):
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8))


def test_phash_equals_imagehash_reference():
    rng = np.random.default_rng(0)
    for i in range(30):
        im = Image.fromarray((rng.random((50 + i, 70, 3)) * 255).astype(np.uint8))
        ours = perceptual_hash(im) & (2**64 - 1)
        assert f"{ours:016x}" == str(imagehash.phash(im))


@pytest.mark.parametrize("side", [256, 224, 31, 32, 33, 97, 512])
def test_phash_of_square_images_equals_imagehash_reference(side):
    """Square images (every stored center crop) take the matrix-product Lanczos path."""
    rng = np.random.default_rng(side)
    for i in range(15):
        pixels = rng.random((side, side, 3)) * 255 if i % 2 else rng.normal(128, 70, (side, side, 3))
        im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        ours = perceptual_hash(im) & (2**64 - 1)
        assert f"{ours:016x}" == str(imagehash.phash(im))


def test_lanczos_shrink_exact_is_pillow_bit_for_bit():
    from vlp.curation.image import lanczos_shrink_exact

    rng = np.random.default_rng(7)
    for side in [1, 2, 5, 32, 33, 64, 100, 255, 256, 257, 640, 1001]:
        for out in (32, 8, 47):
            grey = np.clip(rng.normal(128, 90, (side, side)), 0, 255).astype(np.uint8)
            expected = np.asarray(Image.fromarray(grey).resize((out, out), Image.Resampling.LANCZOS))
            assert np.array_equal(lanczos_shrink_exact(grey, out, out), expected), (side, out)
    with pytest.raises(ValueError, match="square"):
        lanczos_shrink_exact(np.zeros((10, 20), np.uint8), 4, 4)


def test_phash_is_stable_under_reencoding_and_far_for_other_images():
    a = _gradient()
    again = Image.open(io.BytesIO(_bytes(a.resize((290, 180)), "JPEG", quality=60)))
    assert hamming_distance(perceptual_hash(a), perceptual_hash(again)) <= 4
    assert hamming_distance(perceptual_hash(a), perceptual_hash(a.transpose(Image.Transpose.ROTATE_180))) > 10


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"\x00\x01garbage" * 50, "not_an_image"),
    (b"<html>nope</html>", "not_an_image"),
])
def test_probe_rejects_non_images_with_a_reason(data, reason):
    with pytest.raises(DropError) as e:
        probe_image(data, 10**8)
    assert e.value.reason == reason


def test_decompression_bomb_is_refused_from_the_header():
    data = _bytes(Image.new("1", (5000, 5000)), optimize=True)
    assert len(data) < 100_000
    with pytest.raises(DropError) as e:
        probe_image(data, 20_000_000)
    assert e.value.reason == "decompression_bomb"


def test_truncated_jpeg_is_a_corrupt_image():
    data = _bytes(_gradient(), "JPEG")
    probed = probe_image(data[: len(data) // 2], 10**8)
    with pytest.raises(DropError) as e:
        decode_image(probed, ImageConfig())
    assert e.value.reason == "corrupt_image"


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (100, 100), (255, 0, 0, 0))  # fully transparent red
    out = decode_image(probe_image(_bytes(rgba), 10**8), ImageConfig())
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)  # composited on white
    grey16 = Image.fromarray(np.full((64, 64), 65535 // 2, dtype=np.uint16))
    out = decode_image(probe_image(_bytes(grey16), 10**8), ImageConfig())
    assert out.mode == "RGB" and abs(out.getpixel((0, 0))[0] - 127) <= 1  # scaled, not clipped
    cmyk = _gradient().convert("CMYK")
    assert decode_image(probe_image(_bytes(cmyk, "JPEG"), 10**8), ImageConfig()).mode == "RGB"
    pal = _gradient().convert("P")
    assert decode_image(probe_image(_bytes(pal), 10**8), ImageConfig()).mode == "RGB"


def test_animation_gives_its_first_frame():
    first, second = Image.new("RGB", (80, 80), (255, 0, 0)), Image.new("RGB", (80, 80), (0, 0, 255))
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=[second])
    out = decode_image(probe_image(buf.getvalue(), 10**8), ImageConfig())
    r, g, b = out.getpixel((40, 40))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied_to_size_and_pixels():
    upright = Image.new("RGB", (200, 100), (0, 0, 0))
    upright.paste((255, 255, 255), (0, 0, 100, 100))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    probed = probe_image(_bytes(stored, "JPEG", exif=exif.tobytes(), quality=95), 10**8)
    assert (probed.orig_width, probed.orig_height) == (200, 100)
    out = decode_image(probed, ImageConfig(resize_mode="none"))
    assert out.size == (200, 100)
    assert out.getpixel((20, 50))[0] > 200 and out.getpixel((180, 50))[0] < 50


@pytest.mark.parametrize("resizer", ["opencv", "pillow"])
@pytest.mark.parametrize("mode,size,expected", [
    ("center_crop", 64, (64, 64)), ("keep_ratio", 64, (102, 64)), ("border", 64, (64, 64)),
    ("none", 64, (320, 200)), ("center_crop", 400, (400, 400)), ("keep_ratio", 300, (480, 300)),
])
def test_resize_modes(mode, size, expected, resizer):
    out = resize_image(_gradient(), ImageConfig(size=size, resize_mode=mode, resizer=resizer))
    assert out.size == expected and out.mode == "RGB"


@pytest.mark.parametrize("resizer", ["opencv", "pillow"])
def test_border_pads_with_black_and_keeps_content(resizer):
    out = resize_image(Image.new("RGB", (200, 100), (255, 255, 255)),
                       ImageConfig(size=64, resize_mode="border", resizer=resizer))
    assert out.getpixel((32, 2)) == (0, 0, 0) and out.getpixel((32, 32)) == (255, 255, 255)


def _resized(im, resizer, size=128, resample="bicubic"):
    cfg = ImageConfig(size=size, resize_mode="center_crop", resizer=resizer, resample=resample)
    return np.asarray(resize_image(im, cfg), dtype=np.float64)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos", "box", "nearest"])
def test_opencv_resize_matches_pillow_on_natural_content(resample):
    """The fast resizer gives the same picture as Pillow's (the reference) on photo-like content."""
    import random

    from vlp.data.synthetic import draw_sample, random_spec

    rng = random.Random(5)
    for w, h in ((900, 700), (333, 517), (256, 256), (100, 80)):  # shrink, shrink, same, enlarge
        im = draw_sample(random_spec(rng), w, h, rng).convert("RGB")
        ours, ref = _resized(im, "opencv", resample=resample), _resized(im, "pillow", resample=resample)
        assert ours.shape == ref.shape == (128, 128, 3)
        tolerance = 12.0 if resample == "nearest" else 3.0  # nearest picks pixels: edges may move one
        assert np.abs(ours - ref).mean() < tolerance, (w, h)


def test_opencv_resize_antialiases_detail_finer_than_the_output_grid():
    """Stripes too fine for the output grid must average to grey, not alias into coarse moire."""
    import cv2

    x = np.arange(448)
    stripes = np.where((x // 1) % 2 == 0, 255, 0).astype(np.uint8)  # period 2 px: far above Nyquist at 1.75x
    im = Image.fromarray(np.repeat(np.repeat(stripes[None, :, None], 448, 0), 3, 2))
    ours, ref = _resized(im, "opencv", 256), _resized(im, "pillow", 256)
    naive = cv2.resize(np.asarray(im), (256, 256), interpolation=cv2.INTER_LINEAR).astype(np.float64)
    assert abs(ours.mean() - 127.5) < 3 and abs(ref.mean() - 127.5) < 3
    assert naive.std() > 40  # the failure this guards against: a shrink without a pre-filter
    assert ours.std() < 0.3 * naive.std()
    assert ours.std() < ref.std() + 15  # about as flat as Pillow's antialiased kernel


def test_opencv_resize_keeps_an_image_of_the_target_size_unchanged():
    arr = np.asarray(_gradient(128, 128))
    out = _resized(Image.fromarray(arr), "opencv", 128)
    assert np.array_equal(out, arr)


def test_draft_decoding_matches_full_decoding_closely():
    import random

    from vlp.data.synthetic import draw_sample, random_spec

    rng = random.Random(3)
    src = _bytes(draw_sample(random_spec(rng), 1600, 1200, rng), "JPEG", quality=95)
    fast = render_image(probe_image(src, 10**8), ImageConfig(size=128, draft=True))
    slow = render_image(probe_image(src, 10**8), ImageConfig(size=128, draft=False))
    a = np.asarray(Image.open(io.BytesIO(fast.data)), dtype=np.float32)
    b = np.asarray(Image.open(io.BytesIO(slow.data)), dtype=np.float32)
    assert a.shape == b.shape == (128, 128, 3)
    assert np.abs(a - b).mean() < 4.0
    assert hamming_distance(fast.phash, slow.phash) <= 4


def test_webp_output():
    out = render_image(probe_image(_bytes(_gradient()), 10**8), ImageConfig(size=32, format="webp"))
    assert Image.open(io.BytesIO(out.data)).format == "WEBP"


def test_stored_phash_is_the_phash_of_the_stored_pixels():
    src = _bytes(_gradient(900, 700), "JPEG", quality=95)
    cfg = ImageConfig(size=128)
    rendered = render_image(probe_image(src, 10**8), cfg)
    expected = resize_image(decode_image(probe_image(src, 10**8), cfg), cfg)
    assert rendered.phash == perceptual_hash(expected)
    stored = Image.open(io.BytesIO(rendered.data)).convert("RGB")
    assert hamming_distance(rendered.phash, perceptual_hash(stored)) <= 2  # JPEG round trip


def _photo_jpeg(w, h, seed=0, **save):
    import random

    from vlp.data.synthetic import draw_sample, random_spec

    rng = random.Random(seed)
    return _bytes(draw_sample(random_spec(rng), w, h, rng).convert("RGB"), "JPEG", **save)


def _both_decoders(data, **cfg):
    from vlp.curation.image import decode_pixels

    fast = decode_pixels(probe_image(data, 10**8), ImageConfig(jpeg_decoder="simplejpeg", **cfg))
    slow = np.asarray(decode_image(probe_image(data, 10**8), ImageConfig(jpeg_decoder="pillow", **cfg)))
    return fast, slow


@pytest.mark.parametrize("w,h,size", [(900, 700, 256), (500, 1400, 256), (2100, 1700, 256),
                                      (640, 480, 64), (300, 200, 256), (257, 513, 128)])
@pytest.mark.parametrize("draft", [True, False])
def test_simplejpeg_decode_is_pillows_bit_for_bit(w, h, size, draft):
    """Same library, same draft scale (1, 1/2, 1/4 or 1/8 as Pillow picks it), same pixels."""
    fast, slow = _both_decoders(_photo_jpeg(w, h, quality=90), size=size, draft=draft)
    assert fast.dtype == np.uint8 and fast.shape == slow.shape and fast.shape[2] == 3
    assert np.array_equal(fast, slow)
    if draft and min(w, h) >= 2 * size:
        assert fast.shape[0] < h  # a reduced-scale decode did happen


@pytest.mark.parametrize("save", [{"progressive": True}, {"subsampling": 0}, {"subsampling": 1},
                                  {"optimize": True}])
def test_simplejpeg_decode_is_pillows_for_other_jpeg_encodings(save):
    """Progressive scans, 4:4:4 and 4:2:2 chroma, optimised Huffman tables."""
    fast, slow = _both_decoders(_photo_jpeg(900, 640, seed=1, quality=88, **save))
    assert fast.shape == slow.shape and np.array_equal(fast, slow)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_simplejpeg_decode_applies_every_exif_orientation_as_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _photo_jpeg(300, 180, seed=orientation, quality=95, exif=exif.tobytes())
    fast, slow = _both_decoders(data, resize_mode="none")
    assert np.array_equal(fast, slow)
    probed = probe_image(data, 10**8)
    assert fast.shape[:2] == (probed.orig_height, probed.orig_width)


def test_simplejpeg_decodes_greyscale_jpegs_and_leaves_cmyk_to_pillow():
    grey = Image.open(io.BytesIO(_photo_jpeg(400, 300))).convert("L")
    fast, slow = _both_decoders(_bytes(grey, "JPEG", quality=90), size=128)
    assert fast.shape == slow.shape and fast.shape[2] == 3 and np.array_equal(fast, slow)
    cmyk = Image.open(io.BytesIO(_photo_jpeg(400, 300))).convert("CMYK")
    fast, slow = _both_decoders(_bytes(cmyk, "JPEG", quality=90), size=128)
    assert np.array_equal(fast, slow)


def test_jpegs_simplejpeg_refuses_get_pillows_verdict():
    data = _photo_jpeg(400, 300, quality=90)
    # Stray bytes before the end marker: libjpeg only warns, simplejpeg (strict) refuses, Pillow decodes.
    stray = data[:-2] + b"\x00\x00" + data[-2:]
    fast, slow = _both_decoders(stray, size=128)
    assert np.array_equal(fast, slow)
    from vlp.curation.image import decode_pixels

    with pytest.raises(DropError) as e:  # truncated: corrupt either way
        decode_pixels(probe_image(data[: len(data) // 2], 10**8), ImageConfig())
    assert e.value.reason == "corrupt_image"


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border", "none"])
def test_render_is_the_same_with_either_jpeg_decoder(mode):
    src = _photo_jpeg(900, 600, seed=4, quality=92)
    fast = render_image(probe_image(src, 10**8), ImageConfig(size=128, resize_mode=mode))
    slow = render_image(probe_image(src, 10**8), ImageConfig(size=128, resize_mode=mode,
                                                             jpeg_decoder="pillow"))
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert fast.data == slow.data and fast.phash == slow.phash
