"""Video-text curation end to end on a real local Ray cluster, HTTP server and S3 server.

The generated sample set records what should happen to every source row (``expected.json``): kept, or
dropped with a given reason, and which motion each kept clip shows. These tests compare the shards and
ledgers, read back with plain pyarrow, with it.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.curation_job import CurationError
from pipelines.shard_sink import load_output_state
from pipelines.video_text import run_video_curation
from tests.conftest import ALLOW_LOCAL, kill_curation_mid_run
from tests.test_curate_images import assert_outcomes
from vlp.config import ConfigError, load_config
from vlp.curation.config import VideoCurationConfig
from vlp.data.schema import VIDEO_TEXT_SCHEMA, check_shard_schema, part_record_name, shard_name
from vlp.data.storage import Storage
from vlp.data.synthetic_video import generate_video_text_samples, load_motions

pytestmark = pytest.mark.ray


def _config(*overrides):
    return load_config(VideoCurationConfig, None, ["execution.progress_interval_s=1",
                                                   "video.frame.size=64", *overrides])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return generate_video_text_samples(str(tmp_path_factory.mktemp("videos")), 24, seed=3)


def _read(output, storage=None):
    """(clip rows of every shard, ledger rows), with plain pyarrow; each key at most once."""
    storage = storage or Storage()
    manifest = json.loads(storage.read_bytes(f"{output}/_manifest.json"))
    rows, drops, keys = [], [], set()
    for shard in manifest["shards"]:
        with storage.open_input(f"{output}/{shard['name']}") as f:
            table = pq.read_table(pa.BufferReader(f.read()))
        check_shard_schema(table.schema, VIDEO_TEXT_SCHEMA)
        assert table.num_rows == shard["rows"]
        rows += table.to_pylist()
    for f in storage.list_files(f"{output}/_drops"):
        with storage.open_input(f) as fh:
            drops += pq.read_table(pa.BufferReader(fh.read())).to_pylist()
    for key in [r["key"] for r in rows] + [d["key"] for d in drops]:
        assert key not in keys, f"{key} written twice"
        keys.add(key)
    return rows, drops, manifest


def _outcomes(rows, drops) -> dict[str, str]:
    """Source row key -> "kept" (at least one clip written) or the reason its video was dropped."""
    seen: dict[str, str] = {}
    for d in drops:
        seen.setdefault(d["video_id"], d["reason"])
    for r in rows:
        seen[r["video_id"]] = "kept"
    return seen


def test_manifest_input_every_row_has_its_expected_outcome(ray_cluster, videos, tmp_path):
    out = str(tmp_path / "out")
    stats = run_video_curation(videos.manifest, out, _config("output.shard_rows=8"))
    rows, drops, manifest = _read(out)
    assert_outcomes(_outcomes(rows, drops), videos)
    assert manifest["kind"] == "video-text" and manifest["status"] == "complete"
    assert manifest["columns"] == VIDEO_TEXT_SCHEMA.names and len(manifest["shards"]) >= 2
    assert stats["rows_written"] == len(rows) and stats["rows_dropped"] == len(drops)
    assert sum(stats["dropped_by_reason"].values()) == stats["rows_dropped"]
    motions = load_motions(videos.root)
    for r in rows:
        # segment mode: one clip per source row, 8 decodable 64 px frames in time order
        assert r["key"] == f"{r['video_id']}#0" and r["clip_index"] == 0
        assert r["num_frames"] == len(r["frames"]) == len(r["frame_times_s"]) == 8
        frames = [Image.open(io.BytesIO(f)) for f in r["frames"]]
        assert all(im.format == "JPEG" and im.size == (64, 64) == (r["width"], r["height"])
                   for im in frames)
        assert r["image"] == r["frames"][4]  # the poster is the middle frame
        times = np.array(r["frame_times_s"])
        assert np.all(np.diff(times) > 0)
        assert r["clip_start_s"] - 1e-3 <= times[0] and times[-1] <= r["clip_end_s"] + 1e-3
        assert r["motion"] > 0 and r["lang"] in ("en", "zh") and len(r["sha256"]) == 64
        assert r["caption"] and r["video_id"] in motions
    # the two captioned segments of one video: both kept, each cut at its own interval
    by_id = {r["video_id"]: r for r in rows}
    first, second = by_id["long_part1"], by_id["long_part2"]
    assert first["source"] == second["source"]
    assert (first["clip_start_s"], first["clip_end_s"]) == pytest.approx((0.0, 3.0), abs=0.15)
    assert (second["clip_start_s"], second["clip_end_s"]) == pytest.approx((3.0, 6.0), abs=0.15)
    assert first["duration_s"] == pytest.approx(6.0, abs=0.2)
    # where the shape is in the first and last frame follows the caption: left_to_right goes right
    for r in rows:
        spec = motions[r["video_id"]]
        if spec["motion"] in ("left_to_right", "right_to_left"):
            xs = [_shape_x(f) for f in (r["frames"][0], r["frames"][-1])]
            assert (xs[1] > xs[0]) == (spec["motion"] == "left_to_right"), (r["key"], xs)
    rejects = [json.loads(line) for line in open(os.path.join(out, "_rejects.jsonl"))]
    assert {r["reason"] for r in rejects} == set(stats["dropped_by_reason"])


def _clean_rows(samples, prefix: str, n: int) -> list[dict]:
    """The first ``n`` manifest rows whose key starts with ``prefix`` (the broken lines skipped)."""
    rows = []
    for line in open(samples.manifest, "rb"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if r.get("key", "").startswith(prefix)][:n]


def _shape_x(jpeg: bytes) -> float:
    """Column centroid of the pixels that differ most from the frame's median colour."""
    px = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)
    diff = np.abs(px - np.median(px.reshape(-1, 3), axis=0)).sum(axis=2)
    mask = diff > 0.5 * diff.max()
    return float(np.nonzero(mask)[1].mean())


def test_windows_cut_each_video_into_clips(ray_cluster, tmp_path):
    samples = generate_video_text_samples(str(tmp_path / "gen"), 4, seed=11, broken=False,
                                          varied_formats=False, seconds=3.0)
    out = str(tmp_path / "out")
    run_video_curation(samples.manifest, out, _config(
        "video.clips=window", "video.window_s=1.0", "video.stride_s=1.0", "video.num_frames=4",
        "dedup.near=false"))
    rows, drops, _ = _read(out)
    assert not drops
    per_video: dict[str, list] = {}
    for r in rows:
        per_video.setdefault(r["video_id"], []).append(r)
    assert set(per_video) == set(samples.expected)
    for vid, clips in per_video.items():
        clips.sort(key=lambda r: r["clip_index"])
        assert [r["clip_index"] for r in clips] == [0, 1, 2]
        assert [r["key"] for r in clips] == [f"{vid}#{i}" for i in range(3)]
        for i, r in enumerate(clips):
            assert (r["clip_start_s"], r["clip_end_s"]) == pytest.approx((i, i + 1.0), abs=0.15)
            assert r["num_frames"] == 4
        assert len({r["sha256"] for r in clips}) == 3  # clips of one file are not exact duplicates


def test_url_and_s3_inputs(ray_cluster, videos, http_server, s3_server, tmp_path):
    dest = os.path.join(http_server.root, "videos")
    if not os.path.exists(dest):
        shutil.copytree(videos.root, dest)
    kept = _clean_rows(videos, "v0000", 4)
    lines = [{"key": r["key"], "url": f"{http_server.url}/files/videos/{r['path']}",
              "caption": r["caption"]} for r in kept]
    lines.append({"key": "u404", "url": f"{http_server.url}/status/404/x.mp4",
                  "caption": "a red circle moves from left to right"})
    storage = s3_server.storage()
    storage.write_bytes_atomic("s3://vlp-test/videos-in/urls.jsonl",
                               "\n".join(json.dumps(r) for r in lines).encode())
    out = "s3://vlp-test/videos-out"
    run_video_curation("s3://vlp-test/videos-in/urls.jsonl", out,
                       _config(f"storage.s3_endpoint_url={s3_server.endpoint}", "fetch.retries=0",
                               ALLOW_LOCAL))
    rows, drops, manifest = _read(out, storage)
    seen = _outcomes(rows, drops)
    assert seen == {**{r["key"]: "kept" for r in kept}, "u404": "http_4xx"}
    assert storage.exists(f"{out}/_stats.json") and manifest["kind"] == "video-text"


def test_folder_with_sidecar_captions(ray_cluster, videos, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    picked = _clean_rows(videos, "v00000", 3)
    for r in picked:
        shutil.copy(os.path.join(videos.root, r["path"]), folder / os.path.basename(r["path"]))
        stem = os.path.basename(r["path"]).rsplit(".", 1)[0]
        (folder / f"{stem}.txt").write_text(r["caption"], encoding="utf-8")
    os.remove(folder / f"{os.path.basename(picked[0]['path']).rsplit('.', 1)[0]}.txt")
    out = str(tmp_path / "out")
    run_video_curation(str(folder), out, _config())
    rows, drops, _ = _read(out)
    stems = [os.path.basename(r["path"]).rsplit(".", 1)[0] for r in picked]
    assert _outcomes(rows, drops) == {stems[0]: "missing_caption", stems[1]: "kept",
                                      stems[2]: "kept"}


def test_webdataset_tar_of_videos(ray_cluster, videos, tmp_path):
    import tarfile

    picked = _clean_rows(videos, "v00001", 2)
    tar_path = tmp_path / "tars" / "videos.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        members = []
        for r in picked:
            ext = r["path"].rsplit(".", 1)[1]
            members += [(f"{r['key']}.{ext}", open(os.path.join(videos.root, r["path"]), "rb").read()),
                        (f"{r['key']}.txt", r["caption"].encode())]
        members.append(("captionless.txt", b"a red circle moves from the left to the right"))
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = str(tmp_path / "out")
    run_video_curation(str(tar_path.parent), out, _config())
    rows, drops, _ = _read(out)
    assert _outcomes(rows, drops) == {**{f"videos/{r['key']}": "kept" for r in picked},
                                      "videos/captionless": "missing_video"}


def test_bad_config_and_output(ray_cluster, videos, tmp_path):
    with pytest.raises(ConfigError, match="min_side"):
        _config("filters.min_side={}")  # an image filter has nothing to look at in a video run
    out = str(tmp_path / "out")
    run_video_curation(videos.manifest, out, _config())
    with pytest.raises(CurationError, match="--resume"):
        run_video_curation(videos.manifest, out, _config())
    with pytest.raises(CurationError, match="config"):
        run_video_curation(videos.manifest, out, _config("video.num_frames=4"), resume=True)


def test_a_half_committed_write_does_not_count(tmp_path):
    """Parts of one write form a group: with one record missing, none counts and resume cleans up."""
    out = str(tmp_path)
    storage = Storage()
    for part in (0, 1, 2):
        (tmp_path / shard_name(part)).write_bytes(b"x")
    os.makedirs(tmp_path / "_parts")
    records = [{"part": 0, "group": [0, 0], "shard": shard_name(0), "rows": 1, "bytes": 1,
                "drops_file": None, "dropped": 0, "drops_by_reason": {}},
               {"part": 1, "group": [1, 2], "shard": shard_name(1), "rows": 1, "bytes": 1,
                "drops_file": None, "dropped": 0, "drops_by_reason": {}}]
    for r in records:
        (tmp_path / part_record_name(r["part"])).write_text(json.dumps(r))
    state = load_output_state(out, storage, clean=True)
    assert [r["part"] for r in state.records] == [0] and state.next_part == 1
    assert sorted(os.listdir(tmp_path / "_parts")) == ["part-000000.json"]
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("shard-")) == [shard_name(0)]


def test_killed_run_resumes_and_writes_each_clip_once(tmp_path, cli_env):
    """SIGKILL the whole CLI process group mid-run, then --resume: the same outcome as one clean run."""
    big = generate_video_text_samples(str(tmp_path / "big"), 60, seed=7, broken=True)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "pipelines.cli", "curate", "videos", "--input", big.manifest,
           "--output", out, "--set", "output.shard_rows=4", "--set", "execution.batch_size=2",
           "--set", "input.rows_per_block=4", "--set", "execution.progress_interval_s=1",
           "--set", "video.frame.size=64"]
    committed = kill_curation_mid_run(cmd, cli_env, out)
    parts = os.path.join(out, "_parts")
    assert json.load(open(os.path.join(out, "_manifest.json")))["status"] == "in_progress"
    r = subprocess.run(cmd + ["--resume"], env=cli_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    rows, drops, manifest = _read(out)
    assert_outcomes(_outcomes(rows, drops), big)
    assert manifest["status"] == "complete" and len(os.listdir(parts)) > committed
    assert json.load(open(os.path.join(out, "_stats.json")))["rows_read"] == len(rows) + len(drops)
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]
