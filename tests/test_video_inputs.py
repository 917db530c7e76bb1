"""Video batches for training and evaluation: frame picking, one crop per clip, images as still videos,
the temporal shuffle of the evaluation (pure functions, no Ray)."""

import io

import numpy as np
import torch
from PIL import Image

from vlp.data.transforms import decode_clip, decode_media, frame_indices, pixels_to_model
from vlp.eval.pairs import encode_images, shuffled_order
from vlp.models import DualEncoder
from vlp.models.config import DualEncoderConfig, EncoderConfig


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _moving_square(n: int, size: int = 32) -> list[bytes]:
    """Frames of a white square moving right one step per frame on black."""
    frames = []
    for t in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        a[12:20, 2 + 3 * t: 10 + 3 * t] = 255
        frames.append(_jpeg(a))
    return frames


def test_frame_indices_spread_over_the_clip_or_repeat():
    assert frame_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert frame_indices(8, 8).tolist() == list(range(8))
    assert frame_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert frame_indices(1, 4).tolist() == [0, 0, 0, 0]
    for stored, wanted in [(16, 5), (5, 16), (7, 7)]:
        idx = frame_indices(stored, wanted)
        assert len(idx) == wanted and np.all(np.diff(idx) >= 0) and idx.max() < stored


def test_one_crop_for_every_frame_of_a_clip():
    """A still clip cropped at random stays still: every frame got the same box."""
    still = [_jpeg(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))] * 6
    for seed in range(5):
        clip = decode_clip(still, 6, 24, np.random.default_rng(seed), min_crop_scale=0.3)
        assert clip.shape == (6, 24, 24, 3)
        assert all(np.array_equal(clip[0], clip[t]) for t in range(1, 6))
    # and the crop is random across clips
    a = decode_clip(still, 2, 24, np.random.default_rng(1), 0.3)
    b = decode_clip(still, 2, 24, np.random.default_rng(2), 0.3)
    assert not np.array_equal(a, b)


def test_images_and_clips_in_one_batch():
    image = _jpeg(np.full((40, 40, 3), 128, np.uint8))
    clip = _moving_square(4)
    videos = decode_media([image, clip], 4, 32)
    assert videos.shape == (2, 4, 32, 32, 3)
    assert all(np.array_equal(videos[0, 0], videos[0, t]) for t in range(4))  # still video
    assert not np.array_equal(videos[1, 0], videos[1, 3])  # the square moved
    stills = decode_media([image, clip], 1, 32)  # an image tower: a clip gives its middle frame
    assert stills.shape == (2, 32, 32, 3)
    assert np.array_equal(stills[1], decode_media([clip[2]], 1, 32)[0])
    x = pixels_to_model(torch.from_numpy(videos))
    assert x.shape == (2, 4, 3, 32, 32)
    assert torch.allclose(x[:, 0], pixels_to_model(torch.from_numpy(videos[:, 0])))


def test_shuffled_order_is_never_the_original():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 8):
        for _ in range(50):
            perm = shuffled_order(n, g)
            assert sorted(perm.tolist()) == list(range(n)) and perm.tolist() != list(range(n))


def test_temporal_shuffle_changes_a_video_tower_not_a_time_blind_one():
    """The shuffle test's premise: meanP (the vit tower on frames) cannot see order, video_vit can."""
    clips = [_moving_square(4) for _ in range(3)]
    for name, blind in (("vit", True), ("video_vit", False)):
        torch.manual_seed(0)
        cfg = DualEncoderConfig(image=EncoderConfig(name=name, preset="tiny"), image_size=32,
                                num_frames=4, embed_dim=16)
        model = DualEncoder(cfg, vocab_size=50).eval()
        ordered = encode_images(model, clips, 32, 8, torch.device("cpu"), num_frames=4)
        shuffled = encode_images(model, clips, 32, 8, torch.device("cpu"), num_frames=4,
                                 shuffle_seed=0)
        same = torch.allclose(ordered, shuffled, atol=1e-5)
        assert same == blind, name
