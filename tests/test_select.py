"""``vlp select``: predicates over shard and score columns, top fractions per language, views that
every reader takes (training's shard plan, evaluation pairs, tokenizer captions), and materialised
shards. Checked against plain Python over the same rows."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlp.config import ConfigError
from vlp.data.schema import IMAGE_TEXT_SCHEMA, SCHEMA_VERSION
from vlp.data.shards import ShardFolder, ShardFolderError, read_shard
from vlp.data.storage import Storage
from vlp.eval.pairs import load_pairs
from vlp.scoring.select import Selection, materialize, parse_predicate, select_rows, write_view
from vlp.scoring.sidecar import MANIFEST, scores_folder, sidecar_schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(out, "JPEG")
    return out.getvalue()


def _rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        width = int(rng.integers(64, 512))
        rows.append({"key": f"s{seed}-{i}", "caption": f"caption {i}", "lang": ["en", "zh"][i % 2],
                     "image": _jpeg(i % 255), "image_format": "jpeg", "width": width,
                     "height": int(rng.integers(64, 512)), "orig_width": width, "orig_height": 600,
                     "sha256": f"{i:064d}", "phash": i, "source": f"src/{i}"})
    return rows


@pytest.fixture
def curated(tmp_path):
    """A complete 3-shard folder in the curated format, plus complete scores named ``clip`` (with a
    null where a row could not be scored), and the same rows in plain Python."""
    folder = tmp_path / "curated"
    folder.mkdir()
    shards, everything = [], []
    rng = np.random.default_rng(7)
    sidecars = {}
    for s, n in enumerate((40, 25, 35)):
        rows = _rows(n, s)
        name = f"shard-{s:06d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_TEXT_SCHEMA), folder / name)
        scores = rng.uniform(-0.2, 0.6, n).round(4).astype(np.float32)
        scores_list = [None if (s == 1 and i == 3) else float(v) for i, v in enumerate(scores)]
        sidecars[name] = pa.table({"key": [r["key"] for r in rows],
                                   "clip_score": pa.array(scores_list, pa.float32())},
                                  schema=sidecar_schema(False))
        for i, r in enumerate(rows):
            everything.append({**r, "shard": s, "row": i, "score": scores_list[i]})
        shards.append({"name": name, "rows": n, "bytes": 0})
    manifest = {"schema_version": SCHEMA_VERSION, "status": "complete", "kind": "image-text",
                "num_rows": 100, "shards": shards}
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    sha = ShardFolder.open(str(folder)).manifest_sha256
    out = scores_folder(str(folder), "clip")
    os.makedirs(out)
    for name, table in sidecars.items():
        pq.write_table(table, os.path.join(out, name))
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump({"status": "complete", "shards_manifest_sha256": sha, "embedding_dim": 8,
                   "settings": {"embeddings": False}}, f)
    return str(folder), everything


def _kept(chosen) -> set[tuple[int, int]]:
    return {(s, int(r)) for s, shard in enumerate(chosen) for r in shard.rows}


def test_predicates_over_shard_and_score_columns_match_plain_python(curated):
    folder, rows = curated
    f = ShardFolder.open(folder)
    cases = {
        ("scores.clip.clip_score >= 0.28",): lambda r: r["score"] is not None and r["score"] >= 0.28,
        ("lang == 'zh'", "width >= 224"): lambda r: r["lang"] == "zh" and r["width"] >= 224,
        ("lang in ['en'] and not (height < 200) or width > 500",):
            lambda r: (r["lang"] == "en" and not r["height"] < 200) or r["width"] > 500,
        ("scores.clip.clip_score < 0.1", "lang != 'en'"):
            lambda r: r["score"] is not None and r["score"] < 0.1 and r["lang"] != "en",
        ("0 <= scores.clip.clip_score < 0.3",): lambda r: r["score"] is not None and 0 <= r["score"] < 0.3,
    }
    for where, rule in cases.items():
        chosen = select_rows(f, Selection(where=where), Storage())
        assert _kept(chosen) == {(r["shard"], r["row"]) for r in rows if rule(r)}, where


def test_top_fraction_per_language_keeps_the_best_of_each_language(curated):
    folder, rows = curated
    f = ShardFolder.open(folder)
    chosen = select_rows(f, Selection(where=("width >= 100",), top_fraction=0.3,
                                      by="scores.clip.clip_score", per_lang=True), Storage())
    expected = set()
    for lang in ("en", "zh"):
        group = [r for r in rows if r["lang"] == lang and r["width"] >= 100]
        ranked = sorted((r for r in group if r["score"] is not None),
                        key=lambda r: (-r["score"], r["shard"], r["row"]))
        expected |= {(r["shard"], r["row"]) for r in ranked[:math.floor(0.3 * len(group) + 0.5)]}
    assert _kept(chosen) == expected
    overall = select_rows(f, Selection(top_fraction=0.5, by="scores.clip.clip_score"), Storage())
    assert len(_kept(overall)) == 50  # of 100 rows, the null score never among them


def test_a_view_is_read_like_a_folder_by_every_reader(curated, tmp_path):
    folder, rows = curated
    f = ShardFolder.open(folder)
    selection = Selection(where=("lang == 'zh'", "scores.clip.clip_score >= 0.2"))
    chosen = select_rows(f, selection, Storage())
    view = str(tmp_path / "view")
    stats = write_view(f, chosen, selection, view, Storage())
    expected = [r for r in rows if r["lang"] == "zh" and r["score"] is not None and r["score"] >= 0.2]
    assert stats["rows_kept"] == len(expected) and stats["rows_in"] == 100
    assert stats["by_language"]["zh"]["rows_kept"] == len(expected)
    assert stats["by_language"]["en"] == {"rows_in": sum(r["lang"] == "en" for r in rows), "rows_kept": 0}
    assert not any(name.endswith(".parquet") and name.startswith("shard") for name in os.listdir(view))

    opened = ShardFolder.open(view)
    assert opened.view is not None and opened.rows == len(expected) and opened.kind == "image-text"
    assert list(opened.read_column("key")) == [r["key"] for r in expected]  # tokenizer, significant words
    pairs = load_pairs(list(opened.shards), Storage(), max_rows=1000)  # evaluation
    assert pairs.captions == [r["caption"] for r in expected]
    from vlp.train.config import DataConfig
    from vlp.train.shard_plan import plan_shard_reads, split_shards

    split = split_shards(DataConfig(train=view), Storage())  # training
    assert split.train_rows == len(expected) and split.view["where"] == list(selection.where)
    keys = []
    for read in plan_shard_reads(split, 1, np.random.default_rng(0)):
        keys += [k for b in read_shard(read, Storage(), ["key"]) for k in b.column("key").to_pylist()]
    assert sorted(keys) == sorted(r["key"] for r in expected)


def test_materialized_shards_hold_exactly_the_selected_rows(curated, tmp_path):
    folder, rows = curated
    f = ShardFolder.open(folder)
    selection = Selection(where=("width < 300",))
    out = str(tmp_path / "real")
    stats = materialize(f, select_rows(f, selection, Storage()), selection, out, Storage())
    expected = [r for r in rows if r["width"] < 300]
    real = ShardFolder.open(out)
    assert real.view is None and real.rows == stats["rows_kept"] == len(expected)
    table = pa.concat_tables(pq.read_table(s.path) for s in real.shards)
    assert table.schema.equals(IMAGE_TEXT_SCHEMA, check_metadata=False)
    assert table.column("key").to_pylist() == [r["key"] for r in expected]
    assert table.column("image").to_pylist() == [r["image"] for r in expected]
    assert real.manifest["derived_from"]["where"] == ["width < 300"]


def test_bad_selections_fail_with_one_clear_line(curated, tmp_path):
    folder, _ = curated
    f = ShardFolder.open(folder)
    for where, message in [("width >= ", "not an expression"), ("__import__('os')", "only comparisons"),
                           ("image == 'x'", "holds pixels"), ("colour == 'red'", "no column 'colour'"),
                           ("scores.other.clip_score > 0", "no scores named 'other'"),
                           ("scores.clip.image_embedding > 0", "no column 'image_embedding'"),
                           ("lang in 'zh'", "takes a list")]:
        with pytest.raises(ConfigError, match=message):
            select_rows(f, Selection(where=(where,)), Storage())
    with pytest.raises(ConfigError, match="needs --by"):
        Selection(top_fraction=0.5)
    chosen = select_rows(f, Selection(where=("width > 0",)), Storage())
    view = str(tmp_path / "v")
    write_view(f, chosen, Selection(where=("width > 0",)), view, Storage())
    with pytest.raises(ConfigError, match="not empty"):
        write_view(f, chosen, Selection(where=("width > 0",)), view, Storage())
    with pytest.raises(ConfigError, match="is a view"):
        select_rows(ShardFolder.open(view), Selection(where=("width > 0",)), Storage())
    # the source curated again: the view refuses to be read
    manifest = json.load(open(os.path.join(folder, "_manifest.json")))
    manifest["num_rows"] = 101
    json.dump(manifest, open(os.path.join(folder, "_manifest.json"), "w"))
    with pytest.raises(ShardFolderError, match="before it changed"):
        ShardFolder.open(view)
    assert parse_predicate("a >= -1").columns == {"a"}


def test_select_command_prints_a_summary_and_fails_in_one_line(curated, tmp_path):
    folder, rows = curated
    ok = subprocess.run([sys.executable, "-m", "pipelines.cli", "select", "--shards", folder, "--output",
                         str(tmp_path / "v"), "--where", "lang == 'en'", "--top-fraction", "0.5",
                         "--by", "scores.clip.clip_score"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    english = sum(r["lang"] == "en" for r in rows)  # 51: half of them, rounded half up, is 26
    assert f"kept {math.floor(0.5 * english + 0.5)} of 100 rows" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "select", "--shards", folder, "--output",
                          str(tmp_path / "w"), "--where", "nope >= 1"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no column 'nope'" in bad.stderr
