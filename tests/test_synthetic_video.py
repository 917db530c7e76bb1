"""The video-text sample generator writes what it says: decodable clips whose motion matches the
caption, exact time reversals for reversed motions, one of each bad case, and the same bytes per seed."""

import json
import os
import random

import av
import numpy as np
import pytest
from PIL import Image

from vlp.curation.dedup import DedupConfig
from vlp.curation.filters import CaptionItem, CaptionLengthFilter, LanguageFilter
from vlp.curation.image import hamming_distance, perceptual_hash
from vlp.curation.text import normalize_caption
from vlp.data.sample_vocabulary import COLOURS
from vlp.data.synthetic_video import (
    MOTIONS,
    VideoSpec,
    generate_video_text_samples,
    load_motions,
    render_frames,
    reverse_caption_pairs,
)

N, SIZE, FPS, SECONDS = 40, 64, 8, 2.0
CAPTION_REASONS = {"missing_caption", "malformed_row", "caption_too_short", "file_not_found"}


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return generate_video_text_samples(str(tmp_path_factory.mktemp("videos")), N, seed=0)


def _rows(samples) -> list[dict | None]:
    """Manifest rows in order (``None`` for a line that is not JSON)."""
    rows = []
    with open(samples.manifest, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append(None)
    return rows


def _by_key(samples) -> dict[str, dict]:
    return {r["key"]: r for r in _rows(samples) if r is not None}


def _frames(path: str) -> tuple[list[np.ndarray], list[float]]:
    """Decoded RGB frames and their times in seconds."""
    with av.open(path) as c:
        frames = list(c.decode(c.streams.video[0]))
    return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames]


def _object(frame: np.ndarray, colour: str) -> tuple[int, float, float]:
    """Pixel count and centroid (x, y) of the pixels close to the shape's colour."""
    dist = np.linalg.norm(frame.astype(np.float32) - np.array(COLOURS[colour][0], np.float32), axis=2)
    ys, xs = np.nonzero(dist < 80)
    if len(xs) == 0:
        return 0, float("nan"), float("nan")
    return len(xs), float(xs.mean()), float(ys.mean())


def test_every_row_has_an_expected_outcome_unique_key_and_existing_file(samples):
    rows = _rows(samples)
    keys = [r["key"] if r else f"manifest-{i:09d}" for i, r in enumerate(rows)]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(samples.expected)
    for r in rows:
        if r is None:
            continue
        exists = os.path.isfile(os.path.join(samples.root, r["path"]))
        assert exists == (samples.expected[r["key"]] != "file_not_found"), r["key"]
    assert samples.expected["bad_missing_file"] == "file_not_found"
    with open(os.path.join(samples.root, "expected.json"), encoding="utf-8") as f:
        assert json.load(f) == samples.expected


def test_one_of_each_bad_case_with_the_shared_reason_names(samples):
    reasons = set(samples.expected.values())
    assert reasons == {
        "kept", "empty_file", "not_a_video", "no_video_stream", "corrupt_video", "video_too_large",
        "static_video", "video_too_short", "file_not_found", "missing_caption", "malformed_row",
        "caption_too_short", "duplicate_exact", "duplicate_near",
    }
    assert list(samples.expected.values()).count("static_video") == 2  # still and slideshow


def test_clean_clips_decode_with_the_promised_frames_size_and_rate(samples):
    rows = _by_key(samples)
    containers = set()
    for key in (k for k in samples.kept_keys if k.startswith("v")):
        path = os.path.join(samples.root, rows[key]["path"])
        frames, times = _frames(path)
        with av.open(path) as c:
            stream = c.streams.video[0]
            containers.add((c.format.name.split(",")[0], stream.codec_context.name))
            assert stream.codec_context.pix_fmt == "yuv420p"
            rate = stream.average_rate
        assert len(frames) == round(SECONDS * FPS), key
        assert frames[0].shape == (SIZE, SIZE, 3)
        gaps = np.diff(times)
        if np.allclose(gaps, 1 / FPS):
            assert rate == FPS, key
        else:  # the variable-frame-rate clip: irregular gaps around the nominal one
            assert gaps.min() < 0.8 / FPS and gaps.max() > 1.2 / FPS, key
            containers.add(("vfr", "h264"))
    assert containers == {("mov", "h264"), ("matroska", "vp9"), ("avi", "mpeg4"), ("vfr", "h264")}


def test_the_shape_moves_the_way_the_caption_says(samples):
    """First and last frame of each captioned interval: centroid, or size, or presence changed in the
    captioned direction (segments of the long clip checked within their own interval)."""
    rows = _by_key(samples)
    motions = load_motions(samples.root)
    seen = set()
    for key, m in motions.items():
        frames, times = _frames(os.path.join(samples.root, rows[key]["path"]))
        inside = [f for f, t in zip(frames, times)
                  if m.get("start", 0.0) - 1e-6 <= t < m.get("end", float("inf")) - 1e-6]
        (n0, x0, y0), (n1, x1, y1) = _object(inside[0], m["colour"]), _object(inside[-1], m["colour"])
        motion, shift = m["motion"], 0.25 * SIZE
        if motion in ("appears", "disappears"):
            before, after = (n0, n1) if motion == "appears" else (n1, n0)
            assert before <= 2 and after >= 20, (key, motion, n0, n1)
        else:
            assert min(n0, n1) >= 10, (key, motion, n0, n1)
        if motion == "left_to_right":
            assert x1 - x0 > shift and abs(y1 - y0) < 3, (key, x0, x1, y0, y1)
        elif motion == "right_to_left":
            assert x0 - x1 > shift and abs(y1 - y0) < 3, (key, x0, x1, y0, y1)
        elif motion == "top_to_bottom":
            assert y1 - y0 > shift and abs(x1 - x0) < 3, (key, x0, x1, y0, y1)
        elif motion == "bottom_to_top":
            assert y0 - y1 > shift and abs(x1 - x0) < 3, (key, x0, x1, y0, y1)
        elif motion == "grows":
            assert n1 > 3 * n0, (key, n0, n1)
        elif motion == "shrinks":
            assert n0 > 3 * n1, (key, n0, n1)
        seen.add(motion)
    assert seen == set(MOTIONS)


def test_every_kept_clip_moves_enough_for_the_motion_filter_and_stills_do_not(samples):
    """The curation's motion score (median grey change over a few frame pairs) puts every kept clip
    at least twice over the default threshold, and the still and the slideshow under it: the expected
    ``kept`` and ``static_video`` hold with a margin."""
    video = pytest.importorskip("vlp.curation.video")
    from vlp.curation.filters import MotionFilter

    threshold = MotionFilter().min_score
    rows = _by_key(samples)

    def grey(frame):  # as the curation's motion thumbnails: 64 px box-filtered grey in 0..1
        im = Image.fromarray(frame).resize((64, 64), Image.Resampling.BOX).convert("L")
        return np.asarray(im, dtype=np.float32) / 255.0

    scores = {}
    for key, outcome in samples.expected.items():
        if outcome not in ("kept", "static_video"):
            continue
        frames, times = _frames(os.path.join(samples.root, rows[key]["path"]))
        end = rows[key].get("end", times[-1] + 1 / FPS)
        pairs = video.motion_pair_indices(np.array(times), rows[key].get("start", 0.0), end, 4)
        scores[key] = video.motion_score([(grey(frames[a]), grey(frames[b])) for a, b in pairs])
    for key, score in scores.items():
        if samples.expected[key] == "kept":
            assert score > 2 * threshold, (key, score)
        else:
            assert score < threshold / 4, (key, score)


def test_long_clip_is_captioned_over_and_back_in_two_intervals(samples):
    rows = _by_key(samples)
    a, b = rows["long_part1"], rows["long_part2"]
    assert a["path"] == b["path"] and (a["start"], a["end"], b["start"], b["end"]) == (0, 3, 3, 6)
    assert samples.expected["long_part1"] == samples.expected["long_part2"] == "kept"
    m = load_motions(samples.root)
    assert MOTIONS[m["long_part1"]["motion"]].reverse == m["long_part2"]["motion"]
    _, times = _frames(os.path.join(samples.root, a["path"]))
    assert len(times) == 6 * FPS


def test_reversed_motions_are_exact_time_reversals():
    for name, motion in MOTIONS.items():
        assert MOTIONS[motion.reverse].reverse == name and motion.reverse != name
        spec = VideoSpec("red", "circle", name)
        forward = render_frames(spec, SIZE, 16, random.Random(7))
        backward = render_frames(spec.reversed(), SIZE, 16, random.Random(7))
        assert all(np.array_equal(f, b) for f, b in zip(forward, backward[::-1])), name
        assert not np.array_equal(forward[0], forward[-1]), name  # the clip is not its own reverse
    captions = [MOTIONS[m].en for m in MOTIONS] + [MOTIONS[m].zh for m in MOTIONS]
    assert len(set(captions)) == len(captions)


def test_reverse_caption_pairs_name_the_reversed_motion(samples):
    pairs = reverse_caption_pairs(samples.root)
    motions = load_motions(samples.root)
    assert {k for k, _, _ in pairs} == {k for k in motions if samples.expected[k] == "kept"}
    rows = _by_key(samples)
    for key, caption, reverse in pairs:
        m = motions[key]
        assert caption == rows[key]["caption"] != reverse
        assert reverse == VideoSpec(m["colour"], m["shape"], MOTIONS[m["motion"]].reverse).caption(
            m["lang"])


def test_captions_are_in_their_language_and_pass_the_caption_filters(samples):
    """Every row not meant to drop on its caption passes the real caption filters (in the language
    its ``lang`` says), so its expected outcome is decided by the video alone."""
    length, language = CaptionLengthFilter(), LanguageFilter()
    langs = []
    for r in _rows(samples):
        if r is None or samples.expected[r["key"]] in CAPTION_REASONS - {"file_not_found"}:
            continue
        item = CaptionItem(normalize_caption(r["caption"]))
        assert length.check(item) is None and language.check(item) is None, (r["key"], item)
        if "lang" in r:
            assert item.lang == r["lang"], r
            has_han = any("\u4e00" <= ch <= "\u9fff" for ch in r["caption"])
            assert has_han == (r["lang"] == "zh") and (r["lang"] == "zh" or r["caption"].isascii())
            langs.append(r["lang"])
    assert 0.3 < langs.count("zh") / len(langs) < 0.7
    short = CaptionItem(normalize_caption(_by_key(samples)["bad_short_caption"]["caption"]))
    assert length.check(short) == samples.expected["bad_short_caption"] == "caption_too_short"


def test_all_english_and_all_chinese_captions_pass_the_language_filter():
    """Any colour, shape and motion the generator can draw gets a caption in the language it claims."""
    from vlp.data.sample_vocabulary import VIDEO_COLOURS, VIDEO_SHAPES

    language = LanguageFilter()
    for colour in VIDEO_COLOURS:
        for shape in VIDEO_SHAPES:
            for motion in MOTIONS:
                for lang in ("en", "zh"):
                    item = CaptionItem(VideoSpec(colour, shape, motion).caption(lang))
                    assert language.check(item) is None and item.lang == lang, item


def test_bad_files_are_bad_in_the_promised_way(samples):
    rows = _by_key(samples)

    def path(key):
        return os.path.join(samples.root, rows[key]["path"])

    assert os.path.getsize(path("bad_empty")) == 0
    with pytest.raises(av.error.InvalidDataError):
        av.open(path("bad_random_bytes"))
    with open(path("bad_truncated"), "rb") as f:
        assert f.read(12)[4:8] == b"ftyp"  # an MP4 by its header, with no index
    with pytest.raises(av.error.InvalidDataError):
        av.open(path("bad_truncated"))
    with av.open(path("bad_audio_only")) as c:
        assert not c.streams.video and c.streams.audio[0].codec_context.name == "aac"
    with av.open(path("bad_too_large")) as c:
        stream = c.streams.video[0]
        assert stream.width * stream.height > 3840 * 2160 and stream.frames == 1
        assert c.duration / 1e6 >= 1.0  # too large, not also too short
    assert os.path.getsize(path("bad_too_large")) < 200_000

    def changes(frames):  # frame-to-frame changes beyond coding noise
        return [i for i in range(1, len(frames))
                if np.abs(frames[i].astype(int) - frames[i - 1]).mean() > 2]

    frames, times = _frames(path("bad_static"))
    assert len(frames) == 16 and changes(frames) == []
    frames, times = _frames(path("bad_slideshow"))
    assert len(changes(frames)) == 2 and times[-1] + 1 / FPS >= 2.0
    _, times = _frames(path("bad_too_short"))
    assert times[-1] + 1 / FPS == pytest.approx(0.5)


def test_duplicates_are_copies_of_a_kept_clip(samples):
    assert len(samples.duplicate_groups) == 1
    group = samples.duplicate_groups[0]
    original = (group - {"dup_exact", "dup_near"}).pop()
    assert {samples.expected[k] for k in group} == {"kept", "duplicate_exact", "duplicate_near"}
    rows = _by_key(samples)
    data = {k: open(os.path.join(samples.root, rows[k]["path"]), "rb").read() for k in group}
    assert data["dup_exact"] == data[original] != data["dup_near"]
    assert rows["dup_exact"]["caption"] == rows[original]["caption"]
    a, _ = _frames(os.path.join(samples.root, rows[original]["path"]))
    b, _ = _frames(os.path.join(samples.root, rows["dup_near"]["path"]))
    assert len(a) == len(b)
    assert np.mean([np.abs(x.astype(int) - y).mean() for x, y in zip(a, b)]) < 6


def test_only_the_duplicates_are_near_duplicates_by_perceptual_hash(samples):
    """Middle frames' pHashes (what near-dedup compares): distinct clean clips, and the two captioned
    halves of the long clip, are well beyond the default radius; the re-encoded copy is within it."""
    radius = DedupConfig().max_distance
    rows = _by_key(samples)

    def mid_hash(key, t=None):
        frames, times = _frames(os.path.join(samples.root, rows[key]["path"]))
        t = (times[-1] + 1 / FPS) / 2 if t is None else t
        return perceptual_hash(Image.fromarray(frames[max(i for i, s in enumerate(times) if s <= t)]))

    clean = sorted(k for k in samples.kept_keys if k.startswith("v"))
    hashes = {k: mid_hash(k) for k in clean}
    closest = min(hamming_distance(hashes[a], hashes[b])
                  for i, a in enumerate(clean) for b in clean[i + 1:])
    assert closest > radius + 2, closest
    original = (samples.duplicate_groups[0] - {"dup_exact", "dup_near"}).pop()
    assert hamming_distance(hashes[original], mid_hash("dup_near")) <= radius // 2
    # the halves' middles: the shape at about the same place, moving the other way
    assert hamming_distance(mid_hash("long_part1", 1.7), mid_hash("long_part2", 4.7)) > radius + 2


def test_same_seed_same_bytes_other_seed_other_clips(tmp_path):
    a = generate_video_text_samples(str(tmp_path / "a"), 10, seed=3)
    b = generate_video_text_samples(str(tmp_path / "b"), 10, seed=3)
    c = generate_video_text_samples(str(tmp_path / "c"), 10, seed=4, broken=False)
    def read(run, name):
        return (tmp_path / run / name).read_bytes()

    for name in ("manifest.jsonl", "expected.json", "expected_motion.json"):
        assert read("a", name) == read("b", name)
    files = sorted(os.listdir(tmp_path / "a" / "videos"))
    assert files == sorted(os.listdir(tmp_path / "b" / "videos"))
    for f in files:
        assert read("a", f"videos/{f}") == read("b", f"videos/{f}"), f
    assert a.expected == b.expected and a.duplicate_groups == b.duplicate_groups
    assert read("a", "manifest.jsonl") != read("c", "manifest.jsonl")
    assert set(c.expected.values()) == {"kept"} and len(c.expected) == 10
