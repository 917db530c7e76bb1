"""Image-text curation end to end on a real local Ray cluster, HTTP server and S3 server.

The sample set records what should happen to every key (``expected.json``): kept, or dropped with a
given reason. These tests compare the run's shards and ledgers with it.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.image_text import CurationError, run_image_curation
from pipelines.sources import InputError
from vlp.config import load_config
from vlp.curation.config import CurationConfig
from vlp.data.schema import IMAGE_TEXT_SCHEMA, check_shard_schema
from tests.conftest import ALLOW_LOCAL, kill_curation_mid_run

pytestmark = pytest.mark.ray


def _config(*overrides):
    return load_config(CurationConfig, None, ["execution.progress_interval_s=1", *overrides])


def _outcomes(output, storage=None):
    """key -> "kept" or drop reason, from the shards and ledgers with plain pyarrow."""
    from vlp.data.storage import Storage

    storage = storage or Storage()
    manifest = json.loads(storage.read_bytes(f"{output}/_manifest.json"))
    seen = {}
    for shard in manifest["shards"]:
        with storage.open_input(f"{output}/{shard['name']}") as f:
            table = pq.read_table(pa.BufferReader(f.read()))
        check_shard_schema(table.schema)
        assert table.num_rows == shard["rows"]
        for key in table.column("key").to_pylist():
            assert key not in seen, f"{key} written twice"
            seen[key] = "kept"
    for f in storage.list_files(f"{output}/_drops"):
        with storage.open_input(f) as fh:
            ledger = pq.read_table(pa.BufferReader(fh.read()))
        for key, reason in zip(ledger.column("key").to_pylist(), ledger.column("reason").to_pylist()):
            assert key not in seen, f"{key} accounted twice"
            seen[key] = reason
    return seen, manifest


def assert_outcomes(seen: dict, samples) -> None:
    """Every key as expected.json says; in each group of copies exactly one survives."""
    grouped = set().union(*samples.duplicate_groups) if samples.duplicate_groups else set()
    assert set(seen) == set(samples.expected)
    assert {k: v for k, v in seen.items() if k not in grouped} == \
        {k: v for k, v in samples.expected.items() if k not in grouped}
    for group in samples.duplicate_groups:
        outcomes = sorted(seen[k] for k in group)
        assert outcomes.count("kept") == 1, outcomes
        assert set(outcomes) - {"kept"} <= {"duplicate_exact", "duplicate_near"}, outcomes


def test_manifest_input_every_key_has_its_expected_outcome(ray_cluster, samples, tmp_path):
    out = str(tmp_path / "out")
    stats = run_image_curation(samples.manifest, out, _config("output.shard_rows=16"))
    seen, manifest = _outcomes(out)
    assert_outcomes(seen, samples)
    on_disk = json.load(open(os.path.join(out, "_stats.json")))
    assert on_disk["rows_read"] == len(samples.expected) == stats["rows_read"]
    assert on_disk["rows_written"] == len(samples.kept_keys)
    assert sum(on_disk["dropped_by_reason"].values()) == on_disk["rows_dropped"]
    assert manifest["status"] == "complete" and manifest["schema_version"]
    assert len(manifest["shards"]) >= 3  # shard_rows=16 split the kept rows
    # shards are plain Parquet with decodable 256x256 JPEGs and sensible metadata
    table = pq.read_table(os.path.join(out, manifest["shards"][0]["name"]))
    assert table.schema.names == IMAGE_TEXT_SCHEMA.names
    row = table.slice(0, 1).to_pylist()[0]
    im = Image.open(io.BytesIO(row["image"]))
    assert im.format == "JPEG" and im.size == (256, 256) == (row["width"], row["height"])
    assert row["lang"] in ("zh", "en") and row["orig_width"] >= 160 and len(row["sha256"]) == 64
    rejects = [json.loads(line) for line in open(os.path.join(out, "_rejects.jsonl"))]
    assert {r["reason"] for r in rejects} == set(on_disk["dropped_by_reason"])
    # no temporaries left behind
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]


def test_caption_normalisation_reaches_the_shards(ray_cluster, samples, tmp_path):
    out = str(tmp_path / "out")
    run_image_curation(samples.manifest, out, _config())
    captions = {}
    for f in os.listdir(out):
        if f.startswith("shard-"):
            t = pq.read_table(os.path.join(out, f), columns=["key", "caption"])
            captions.update(zip(t.column("key").to_pylist(), t.column("caption").to_pylist()))
    assert captions["html_caption"] == "a small black star & a line in the centre"


def test_duplicates_are_found_across_blocks_and_workers(ray_cluster, samples, tmp_path):
    """Tiny blocks and batches: the duplicates land in other blocks than their originals."""
    out = str(tmp_path / "out")
    run_image_curation(samples.manifest, out,
                       _config("input.rows_per_block=4", "execution.batch_size=2", "dedup.shards=3"))
    seen, _ = _outcomes(out)
    assert_outcomes(seen, samples)
    assert sum(seen[k] == "kept" for k in ("dup_exact", "dup_near", "s000000")) == 1


def test_url_inputs_through_http_with_failures(ray_cluster, samples, http_server, tmp_path):
    dest = os.path.join(http_server.root, "samples")
    if not os.path.exists(dest):
        shutil.copytree(samples.root, dest)
    lines, expected = [], {}
    for line in open(samples.manifest, "rb"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if samples.expected[rec["key"]] != "kept" or "caption" not in rec:
            continue
        rec["url"] = f"{http_server.url}/files/samples/{rec.pop('path')}"
        lines.append(rec)
        expected[rec["key"]] = "kept"
    cap = "a large red circle in the centre"
    first = lines[0]["url"].split("/files/")[1]
    for key, url, reason in [
        ("u404", f"{http_server.url}/status/404/x.jpg", "http_4xx"),
        ("u500", f"{http_server.url}/status/500/x.jpg", "http_5xx"),
        ("uslow", f"{http_server.url}/slow/3/{first}", "http_timeout"),
        ("uredirect", f"{http_server.url}/redirect/2/{first}", "duplicate_exact"),
    ]:
        lines.append({"key": key, "url": url, "caption": cap})
        expected[key] = reason
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in lines))
    out = str(tmp_path / "out")
    run_image_curation(str(manifest), out, _config("fetch.timeout_s=1", "fetch.retries=1",
                                                   "fetch.backoff_s=0.05", ALLOW_LOCAL))
    seen, _ = _outcomes(out)
    first_key = lines[0]["key"]
    pair = sorted([seen.pop(first_key), seen.pop("uredirect")])
    assert pair == ["duplicate_exact", "kept"]
    del expected[first_key], expected["uredirect"]
    assert seen == expected


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_tars_including_a_truncated_one(ray_cluster, samples, tmp_path):
    kept = sorted(samples.kept_keys)[:12]
    images = {}
    for name in os.listdir(os.path.join(samples.root, "images")):
        images[name.rsplit(".", 1)[0]] = open(os.path.join(samples.root, "images", name), "rb").read()
    caps = {}
    for line in open(samples.manifest, "rb"):
        try:
            r = json.loads(line)
            caps[r["key"]] = r.get("caption")
        except ValueError:
            pass
    src = tmp_path / "tars"
    src.mkdir()
    good = [(f"{k}.jpg", images[k]) for k in kept[:6]] + [(f"{k}.txt", caps[k].encode()) for k in kept[:6]]
    good.sort()
    good += [("nocap.jpg", images[kept[0]])]
    _write_tar(src / "a.tar", good)
    second = []
    for k in kept[6:]:
        second += [(f"{k}.jpg", images[k]), (f"{k}.json", json.dumps({"caption": caps[k]}).encode())]
    _write_tar(tmp_path / "b_full.tar", second)
    data = open(tmp_path / "b_full.tar", "rb").read()
    (src / "b.tar").write_bytes(data[: len(data) // 2])  # cut inside a member, mid-archive
    out = str(tmp_path / "out")
    run_image_curation(str(src), out, _config())
    seen, _ = _outcomes(out)
    assert all(seen[f"a/{k}"] == "kept" for k in kept[:6])
    assert seen["a/nocap"] == "missing_caption"
    b_kept = [k for k in kept[6:] if seen.get(f"b/{k}") == "kept"]
    assert 2 <= len(b_kept) < 6  # the complete samples before the damage survive
    assert "corrupt_archive" in seen.values()


def test_folder_with_sidecar_captions(ray_cluster, tmp_path):
    from vlp.data.synthetic import generate_image_text_samples

    s = generate_image_text_samples(str(tmp_path / "gen"), 8, seed=5, broken=False, varied_formats=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    for line in open(s.manifest):
        r = json.loads(line)
        shutil.copy(os.path.join(s.root, r["path"]), folder / os.path.basename(r["path"]))
        (folder / (r["key"] + ".txt")).write_text(r["caption"], encoding="utf-8")
    os.remove(folder / "s000003.txt")
    (folder / "s000004.txt").write_bytes(b"\xff\xfe bad")
    out = str(tmp_path / "out")
    run_image_curation(str(folder), out, _config())
    seen, _ = _outcomes(out)
    assert seen["s000003"] == "missing_caption" and seen["s000004"] == "invalid_utf8"
    assert sum(v == "kept" for v in seen.values()) == 6


def test_s3_input_and_output(ray_cluster, samples, s3_server, tmp_path):
    storage = s3_server.storage()
    for root, _, files in os.walk(samples.root):
        for name in files:
            local = os.path.join(root, name)
            rel = os.path.relpath(local, samples.root)
            storage.write_bytes_atomic(f"s3://vlp-test/raw/{rel}", open(local, "rb").read())
    out = "s3://vlp-test/curated"
    run_image_curation("s3://vlp-test/raw/manifest.jsonl", out,
                       _config(f"storage.s3_endpoint_url={s3_server.endpoint}"))
    seen, manifest = _outcomes(out, storage)
    assert_outcomes(seen, samples)
    assert storage.exists(f"{out}/_stats.json")


def test_output_must_be_empty_unless_resuming(ray_cluster, samples, tmp_path):
    out = str(tmp_path / "out")
    run_image_curation(samples.manifest, out, _config())
    with pytest.raises(CurationError, match="--resume"):
        run_image_curation(samples.manifest, out, _config())
    with pytest.raises(CurationError, match="config"):
        run_image_curation(samples.manifest, out, _config("image.size=128"), resume=True)
    with pytest.raises(InputError, match="not found"):
        run_image_curation(str(tmp_path / "nope.jsonl"), str(tmp_path / "o2"), _config())


def test_cli_reports_bad_config_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "curate", "images", "--input", "x",
                        "--output", str(tmp_path / "o"), "--set", "image.sise=3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown config key 'image.sise'" in r.stderr and "Traceback" not in r.stderr


def test_killed_run_resumes_and_writes_each_key_once(samples, tmp_path, cli_env):
    """SIGKILL the whole CLI process group mid-run, then --resume: same outcome as one clean run."""
    from vlp.data.synthetic import generate_image_text_samples

    big = generate_image_text_samples(str(tmp_path / "big"), 400, seed=7, broken=True)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "pipelines.cli", "curate", "images", "--input", big.manifest,
           "--output", out, "--set", "output.shard_rows=8", "--set", "execution.batch_size=4",
           "--set", "input.rows_per_block=8", "--set", "execution.progress_interval_s=1"]
    env = cli_env
    committed = kill_curation_mid_run(cmd, env, out)
    parts = os.path.join(out, "_parts")
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["status"] == "in_progress"
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    seen, manifest = _outcomes(out)
    assert_outcomes(seen, big)
    assert manifest["status"] == "complete" and len(os.listdir(parts)) > committed
    stats = json.load(open(os.path.join(out, "_stats.json")))
    assert stats["rows_read"] == len(big.expected)
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp-")]
