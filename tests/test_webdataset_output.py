"""``output.format: webdataset``: tar shards that the ``webdataset`` library's standard pipeline reads
as OpenCLIP does, holding exactly what the Parquet output of the same input holds, with the same drop
ledger and stats, and the same exactly-once resume (a tar and its index count only through their part
record).

The image runs curate the shared sample set (every broken case, a duplicate group) with some keys
renamed to ones a tar member name cannot hold as they are (dots, slashes, Chinese, ``%``). With the
default ``input.rows_per_block`` the whole manifest is one block and one processor batch, so which copy
of the duplicate group survives is the same in both runs and the outputs can be compared row for row.
"""

import io
import json
import os
import shutil
import tarfile
import types
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from webdataset.tariterators import base_plus_ext
from PIL import Image

from pipelines.image_text import run_image_curation
from pipelines.shard_sink import KeptRows, write_webdataset_stream
from pipelines.video_text import run_video_curation
from tests.test_curate_images import assert_outcomes
from vlp.config import ConfigError, load_config
from vlp.curation.config import CurationConfig, OutputConfig, VideoCurationConfig
from vlp.data.schema import (IMAGE_TEXT_SCHEMA, VIDEO_TEXT_SCHEMA, shard_index_name,
                             webdataset_key, webdataset_member)
from vlp.data.shards import ShardFolder, ShardFolderError

# Keys a tar member name cannot hold as they are: WebDataset would cut them at the first dot or read
# the slash as a folder.
RENAMED = {
    "s000001": "photos/cat.v2.jpg",
    "s000002": "中文/图片.1",
    "s000003": "100%.done",
    "s000004": "__meta__",
    "s000005": "a b#c",
}


def _config(*overrides):
    return load_config(CurationConfig, None, ["execution.progress_interval_s=1", *overrides])


@pytest.fixture(scope="module")
def tricky(samples, tmp_path_factory):
    """The sample set's manifest with absolute paths, some keys renamed (``RENAMED``), and the copies
    of the duplicate group moved up beside their original. Every run here reads several blocks; with
    all copies in the first block (one processor batch, one write) the same copy survives in every
    run, and a resume that curates one of them again curates them all again (the case of copies
    committed before their survivor is ``test_resume_keeps_a_survivor_...`` below)."""
    root = tmp_path_factory.mktemp("tricky")
    copies = set().union(*samples.duplicate_groups)
    lines, moved, renamed = [], [], {}
    for index, line in enumerate(open(samples.manifest, "rb").read().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            lines.append((f"manifest-{index:09d}", line))  # named by its line number (below)
            continue
        if "path" in rec:
            rec["path"] = os.path.join(samples.root, rec["path"])
        key = renamed[rec["key"]] = RENAMED.get(rec["key"], rec["key"])
        rec["key"] = key
        (moved if key in copies and lines else lines).append(
            (key, json.dumps(rec, ensure_ascii=False).encode()))
    lines[1:1] = moved
    for index, (key, _) in enumerate(lines):  # an unparseable line is named by its new line number
        if key.startswith("manifest-"):
            renamed[key] = f"manifest-{index:09d}"
    manifest = root / "manifest.jsonl"  # the same file name: the same key prefix for such lines
    manifest.write_bytes(b"\n".join(line for _, line in lines) + b"\n")
    expected = {renamed.get(k, k): v for k, v in samples.expected.items()}
    groups = [{renamed.get(k, k) for k in g} for g in samples.duplicate_groups]
    assert {k for k, _ in lines[:len(groups[0])]} == groups[0]
    return types.SimpleNamespace(manifest=str(manifest), expected=expected, duplicate_groups=groups)


# Several blocks of 16 rows (several write groups), each cut into shards of at most 4 rows (parts).
SHARDED = ("output.shard_rows=4", "input.rows_per_block=16", "execution.batch_size=16")


@pytest.fixture(scope="module")
def both(ray_cluster, tricky, tmp_path_factory):
    """The same input curated to Parquet and to WebDataset."""
    root = tmp_path_factory.mktemp("both")
    out = {}
    for fmt in ("parquet", "webdataset"):
        out[fmt] = str(root / fmt)
        out[f"{fmt}_stats"] = run_image_curation(tricky.manifest, out[fmt],
                                                 _config(*SHARDED, f"output.format={fmt}"))
    return out


def _manifest(out):
    return json.load(open(os.path.join(out, "_manifest.json")))


def _parquet_rows(out) -> dict[str, dict]:
    rows = {}
    for shard in _manifest(out)["shards"]:
        for row in pq.read_table(os.path.join(out, shard["name"])).to_pylist():
            assert row["key"] not in rows
            rows[row["key"]] = row
    return rows


def _ledger(out) -> list[dict]:
    folder = os.path.join(out, "_drops")
    rows = [r for f in sorted(os.listdir(folder))
            for r in pq.read_table(os.path.join(folder, f)).to_pylist()]
    return sorted(rows, key=lambda r: r["key"])


def _tar_urls(out) -> list[str]:
    return [os.path.join(out, s["name"]) for s in _manifest(out)["shards"]]


def _read_webdataset(out, *fields, decode: str | None = None) -> list[tuple]:
    """Samples of every shard the manifest lists, through the library's standard pipeline."""
    ds = wds.WebDataset(_tar_urls(out), shardshuffle=False)
    if decode:
        ds = ds.decode(decode)
    return list(ds.to_tuple(*fields))


def _outcomes(out) -> dict[str, str]:
    """key -> "kept" (from the tars' json members) or its drop reason; each key at most once."""
    seen = {}
    for (meta,) in _read_webdataset(out, "json", decode="pil"):
        assert meta["key"] not in seen, f"{meta['key']} written twice"
        seen[meta["key"]] = "kept"
    for row in _ledger(out):
        assert row["key"] not in seen, f"{row['key']} accounted twice"
        seen[row["key"]] = row["reason"]
    return seen


def test_keys_become_member_stems_webdataset_splits_back_whole():
    """Percent-encoding leaves no dot or slash, keeps distinct keys distinct and decodes back."""
    keys = ["plain_key-1#0", *RENAMED.values(), "a.b", "a%2Eb", "a/b", "a%2Fb", ".", "%"]
    stems = [webdataset_key(k) for k in keys]
    assert len(set(stems)) == len(keys)
    for key, stem in zip(keys, stems):
        assert "." not in stem and "/" not in stem and stem.isascii()
        assert unquote(stem) == key
        # the library's own split of a member name into sample key and field
        assert base_plus_ext(webdataset_member(key, "frame012", "jpeg")) == (stem, "frame012.jpg")
    assert webdataset_key("plain_key-1#0") == "plain_key-1#0"
    assert webdataset_key("photos/cat.v2.jpg") == "photos%2Fcat%2Ev2%2Ejpg"
    assert webdataset_member("k.1", "image", "webp") == "k%2E1.webp"
    assert webdataset_member("k", "frame007", "jpeg") == "k.frame007.jpg"


def test_output_format_is_validated():
    with pytest.raises(ValueError, match="output.format"):
        OutputConfig(format="tar")
    with pytest.raises(ConfigError, match="output.format"):
        _config("output.format=tfrecord")


def test_tar_and_index_written_to_an_s3_style_buffer_in_one_pass(tmp_path):
    """S3's atomic output is an in-memory Arrow buffer (no seek): the writer needs only ``write``, and
    the index holds the tar's rows, pixels left out, in tar order."""
    rows = [{"key": f"k.{i}", "caption": f"caption {i}", "lang": "en", "image": bytes([i]) * (i + 1),
             "image_format": "jpeg", "width": 8, "height": 8, "orig_width": 9, "orig_height": 9,
             "sha256": f"{i:064x}", "phash": -i, "source": f"/src/{i}.jpg",
             "drop_reason": "duplicate_exact" if i % 3 == 0 else None} for i in range(10)]
    schema = IMAGE_TEXT_SCHEMA.append(pa.field("drop_reason", pa.string()))
    kept = KeptRows([pa.Table.from_pylist(rows[:4], schema=schema),
                     pa.Table.from_pylist(rows[4:], schema=schema)])
    tar_sink, index_sink = pa.BufferOutputStream(), pa.BufferOutputStream()
    write_webdataset_stream(kept.slices(0, kept.num_rows), tar_sink, index_sink, IMAGE_TEXT_SCHEMA,
                            "zstd")
    (tmp_path / "s.tar").write_bytes(tar_sink.getvalue().to_pybytes())
    samples = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False)
                   .to_tuple("__key__", "jpg", "txt", "json"))
    expected = [r for r in rows if r["drop_reason"] is None]
    assert [s[0] for s in samples] == [webdataset_key(r["key"]) for r in expected]
    for (_, image, text, meta), row in zip(samples, expected):
        assert image == row["image"] and text.decode() == row["caption"]
        assert json.loads(meta) == {k: v for k, v in row.items()
                                    if k not in ("image", "caption", "drop_reason")}
    with tarfile.open(tmp_path / "s.tar") as tar:  # plain members, no PAX record each
        members = tar.getmembers()
    assert len(members) == 3 * len(expected)
    assert all(m.isfile() and m.mode == 0o444 and not m.pax_headers for m in members)
    index = pq.read_table(pa.BufferReader(index_sink.getvalue()))
    assert index.schema.names == [n for n in IMAGE_TEXT_SCHEMA.names if n != "image"]
    assert index.column("key").to_pylist() == [r["key"] for r in expected]


@pytest.mark.ray
def test_webdataset_shards_hold_what_the_parquet_output_holds(both, tricky):
    """Read with ``WebDataset(urls).decode("pil").to_tuple("jpg", "txt", "json")``: every kept row
    once, with the caption, metadata and image bytes of the Parquet run's row."""
    out = both["webdataset"]
    reference = _parquet_rows(both["parquet"])
    manifest = _manifest(out)
    assert manifest["format"] == "webdataset" and _manifest(both["parquet"])["format"] == "parquet"
    assert manifest["status"] == "complete" and len(manifest["shards"]) >= 3

    decoded = _read_webdataset(out, "__key__", "jpg", "txt", "json", decode="pil")
    raw = _read_webdataset(out, "__key__", "jpg")
    assert [k for k, *_ in decoded] == [k for k, _ in raw]
    seen = set()
    for (stem, image, caption, meta), (_, jpeg) in zip(decoded, raw):
        row = reference[meta["key"]]
        assert meta["key"] not in seen
        seen.add(meta["key"])
        assert stem == webdataset_key(meta["key"])
        assert caption == row["caption"]
        assert meta == {k: v for k, v in row.items() if k not in ("image", "caption")}
        assert jpeg == row["image"]
        assert image.size == (row["width"], row["height"])
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(row["image"]))))
    assert seen == set(reference)
    assert set(RENAMED.values()) <= seen
    assert_outcomes(_outcomes(out), tricky)

    # Each listed shard: its rows and bytes, and an index with the tar's keys in tar order.
    for shard in manifest["shards"]:
        tar = os.path.join(out, shard["name"])
        keys = [m["key"] for (m,) in wds.WebDataset(tar, shardshuffle=False).decode().to_tuple("json")]
        assert shard["name"].endswith(".tar") and len(keys) == shard["rows"]
        assert os.path.getsize(tar) == shard["bytes"]
        assert shard["index"] == shard_index_name(int(shard["name"][6:12]))
        assert pq.read_table(os.path.join(out, shard["index"])).column("key").to_pylist() == keys
    listed = {n for s in manifest["shards"] for n in (s["name"], s["index"])}
    assert {f for f in os.listdir(out) if f.startswith("shard-")} == listed


@pytest.mark.ray
def test_drop_ledger_stats_and_rejects_equal_the_parquet_runs(both):
    pq_out, wds_out = both["parquet"], both["webdataset"]
    assert _ledger(wds_out) == _ledger(pq_out) and _ledger(pq_out)
    volatile = ("elapsed_s", "bytes_written")  # bytes: tar members against Parquet pages
    stats = [{k: v for k, v in json.load(open(os.path.join(o, "_stats.json"))).items()
              if k not in volatile} for o in (pq_out, wds_out)]
    assert stats[0] == stats[1] and stats[0]["rows_dropped"] > 0
    # parts commit in the order their writes finish: compare without the order
    assert sorted(s["rows"] for s in _manifest(wds_out)["shards"]) == \
        sorted(s["rows"] for s in _manifest(pq_out)["shards"])
    assert sorted(open(os.path.join(wds_out, "_rejects.jsonl"))) == \
        sorted(open(os.path.join(pq_out, "_rejects.jsonl")))


@pytest.mark.ray
def test_training_readers_refuse_a_webdataset_folder_in_one_line(both):
    with pytest.raises(ShardFolderError) as refused:
        ShardFolder.open(both["webdataset"])
    message = str(refused.value)
    assert "output.format=parquet" in message and "\n" not in message
    assert ShardFolder.open(both["parquet"]).rows == both["parquet_stats"]["rows_written"]


@pytest.mark.ray
def test_resume_after_crashes_around_the_tar_and_index_commits(ray_cluster, both, tricky, tmp_path):
    """Take a finished run apart as kills at each step of a commit would leave it, then --resume:
    every key exactly once, the untouched parts not rewritten, nothing uncommitted left behind.

    The crash states: a tar renamed into place but not its index (killed between the two), a tar,
    index and ledger without their part record (killed before the commit point), one record of a
    multi-part write missing (killed between the records of one group), a temporary file."""
    out = tmp_path / "out"
    shutil.copytree(both["webdataset"], out, copy_function=shutil.copy2)  # copy2: keeps mtimes
    records = [json.load(open(out / "_parts" / f)) for f in sorted(os.listdir(out / "_parts"))]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r["group"]), []).append(r)
    with_shards = [g for g, rs in groups.items() if any(r["shard"] for r in rs)]
    multi = [g for g in with_shards if len(groups[g]) > 1]
    assert len(with_shards) >= 3 and multi  # the cases below need these

    torn, first, second = multi[0], *[g for g in with_shards if g != multi[0]][:2]
    undone = [torn, first, second]  # groups whose rows resume must curate again
    for group in (first, second):  # killed before the commit point
        for r in groups[group]:
            os.remove(out / "_parts" / f"part-{r['part']:06d}.json")
            if r["shard"] and group == first:  # ... and before the index followed the tar
                os.remove(out / r["index"])
    # one record of a multi-part group missing: the others, their tars and indexes must not count
    os.remove(out / "_parts" / f"part-{groups[torn][-1]['part']:06d}.json")
    (out / ".tmp-0123-shard-000999.tar").write_bytes(b"half a tar")
    kept_files = {r["shard"]: os.path.getmtime(out / r["shard"]) for g in with_shards
                  if g not in undone for r in groups[g] if r["shard"]}
    # the run is unfinished again
    manifest = _manifest(out)
    manifest["status"] = "in_progress"
    (out / "_manifest.json").write_text(json.dumps(manifest))

    stats = run_image_curation(tricky.manifest, str(out),
                               _config(*SHARDED, "output.format=webdataset"), resume=True)
    redone = sum(r["rows"] + r["dropped"] for g in undone for r in groups[g])
    assert stats["rows_read_this_run"] == redone > 0
    assert stats["rows_read"] == len(tricky.expected)
    seen = _outcomes(str(out))
    assert_outcomes(seen, tricky)
    assert seen == {**{k: "kept" for k in _parquet_rows(both["parquet"])},
                    **{r["key"]: r["reason"] for r in _ledger(both["parquet"])}}
    for name, mtime in kept_files.items():  # committed shards stay as they were
        assert os.path.getmtime(out / name) == mtime
    manifest = _manifest(out)
    assert manifest["status"] == "complete"
    listed = {n for s in manifest["shards"] for n in (s["name"], s["index"])}
    assert {f for f in os.listdir(out) if f.startswith(("shard-", ".tmp-"))} == listed
    for shard in manifest["shards"]:
        keys = [m["key"] for (m,) in wds.WebDataset(str(out / shard["name"]), shardshuffle=False)
                .decode().to_tuple("json")]
        assert pq.read_table(out / shard["index"]).column("key").to_pylist() == keys


@pytest.mark.ray
def test_video_clips_as_frame_members_written_to_s3(ray_cluster, s3_server, tmp_path):
    """Clips: ``<key>.jpg`` (the middle frame), ``<key>.frameNNN.jpg`` per frame in time order, the
    caption and the metadata, equal to the Parquet run's clips; the tars and indexes written to S3
    (one PUT each) and nothing else beside the run's files."""
    from vlp.data.synthetic_video import generate_video_text_samples

    samples = generate_video_text_samples(str(tmp_path / "gen"), 2, seed=11, broken=False,
                                          varied_formats=False, seconds=3.0)
    outs = {"parquet": str(tmp_path / "parquet"), "webdataset": "s3://vlp-test/wds-videos"}
    for fmt, out in outs.items():
        run_video_curation(samples.manifest, out, load_config(VideoCurationConfig, None, [
            "execution.progress_interval_s=1", "video.frame.size=64", "video.clips=window",
            "video.window_s=1.0", "video.stride_s=1.0", "video.num_frames=4", "dedup.near=false",
            "execution.workers=1", "execution.decode_threads=1", f"output.format={fmt}",
            f"storage.s3_endpoint_url={s3_server.endpoint}"]))
    storage, local = s3_server.storage(), tmp_path / "from-s3"
    for uri in storage.list_files(outs["webdataset"]):
        path = local / uri[len(outs["webdataset"]) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.read_bytes(uri))
    manifest = _manifest(str(local))
    assert manifest["kind"] == "video-text" and manifest["format"] == "webdataset"
    listed = {n for s in manifest["shards"] for n in (s["name"], s["index"])}
    assert {f for f in os.listdir(local) if not f.startswith("_")} == listed

    reference = _parquet_rows(outs["parquet"])
    assert len(reference) == 6  # 2 videos x 3 one-second windows
    raw = list(wds.WebDataset(_tar_urls(str(local)), shardshuffle=False))
    decoded = list(wds.WebDataset(_tar_urls(str(local)), shardshuffle=False).decode("pil"))
    assert len(raw) == len(decoded) == len(reference)
    for sample, pictures in zip(raw, decoded):
        meta = pictures["json"]
        row = reference[meta["key"]]
        assert sample["__key__"] == webdataset_key(row["key"]) and "#" in row["key"]
        frames = sorted(k for k in sample if k.startswith("frame"))
        assert frames == [f"frame{i:03d}.jpg" for i in range(row["num_frames"])] and len(frames) == 4
        assert [sample[name] for name in frames] == row["frames"] and sample["jpg"] == row["image"]
        assert pictures["frame000.jpg"].size == (row["width"], row["height"]) == (64, 64)
        assert pictures["txt"] == row["caption"]
        assert meta == {k: v for k, v in row.items() if k not in ("image", "frames", "caption")}
    index = pq.read_table(local / manifest["shards"][0]["index"])
    assert index.schema.names == [n for n in VIDEO_TEXT_SCHEMA.names if n not in ("image", "frames")]


@pytest.mark.ray
def test_resume_keeps_a_survivor_whose_copies_were_committed_before_it(ray_cluster, samples, tmp_path):
    """The survivor of a duplicate group sits in one write, its dropped copies in the ledgers of
    others. Killed before the survivor's write committed, a resumed run curates the survivor again:
    it must be kept, not dropped as a duplicate of its own committed copies (Parquet output; the
    dedup rebuild is the same for both formats)."""
    out = tmp_path / "out"
    run_image_curation(samples.manifest, str(out), _config(*SHARDED, "execution.workers=1"))
    kept = _parquet_rows(str(out))
    records = [json.load(open(out / "_parts" / f)) for f in sorted(os.listdir(out / "_parts"))]
    ledger_keys = {}
    for r in records:
        if r.get("drops_file"):
            for key in pq.read_table(out / r["drops_file"], columns=["key"]).column("key").to_pylist():
                ledger_keys[key] = tuple(r["group"])
    shard_keys = {}
    for r in records:
        if r["shard"]:
            for key in pq.read_table(out / r["shard"], columns=["key"]).column("key").to_pylist():
                shard_keys[key] = tuple(r["group"])
    group = next(g for g in samples.duplicate_groups
                 if any(shard_keys.get(k) != ledger_keys.get(c) for k in g if k in kept
                        for c in g if c != k))
    survivor = next(k for k in group if k in kept)
    assert any(ledger_keys.get(c) not in (None, shard_keys[survivor]) for c in group if c != survivor)
    for r in records:  # the survivor's write: killed before its commit point
        if tuple(r["group"]) == shard_keys[survivor]:
            os.remove(out / "_parts" / f"part-{r['part']:06d}.json")
    manifest = _manifest(out)
    manifest["status"] = "in_progress"
    (out / "_manifest.json").write_text(json.dumps(manifest))

    run_image_curation(samples.manifest, str(out), _config(*SHARDED, "execution.workers=1"), resume=True)
    assert survivor in _parquet_rows(str(out))
    assert set(_parquet_rows(str(out))) == set(kept)
    reasons = {r["key"]: r["reason"] for r in _ledger(str(out))}
    assert all(reasons[c].startswith("duplicate") for c in group if c != survivor)
