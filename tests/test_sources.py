"""Input readers: manifests (JSONL, CSV, Parquet), folders, tars, and bad rows as counted drops."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sources import InputError, plan_inputs, read_unit
from vlp.curation.config import InputConfig
from vlp.curation.dedup import key_owner
from vlp.data.storage import Storage


def _rows(src, config=InputConfig(), done=None):
    storage = Storage()
    out = []
    for unit in plan_inputs(str(src), config, storage):
        for table in read_unit(unit, config, storage, done):
            out.extend(table.to_pylist())
    return out


def test_csv_with_quoted_newlines_bad_bytes_and_extra_fields(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes(
        b'key,url,caption\n'
        b'a,http://x/a.jpg,"a red\ncircle"\n'
        b'b,http://x/b.jpg,bad \xff bytes\n'
        b'c,http://x/c.jpg,ok caption,EXTRA\n'
        b'd,,no source\n'
        b'e,http://x/e.jpg,\n'
    )
    rows = {r["key"] or r["source"]: r for r in _rows(p)}
    assert rows["a"]["caption"] == "a red\ncircle" and rows["a"]["drop_reason"] is None
    assert rows["b"]["drop_reason"] == "invalid_utf8"
    assert [r["drop_reason"] for r in rows.values()].count("malformed_row") == 1
    assert rows["d"]["drop_reason"] == "missing_source"
    assert rows["e"]["drop_reason"] == "missing_caption"


def test_parquet_manifest_with_relative_paths_and_generated_keys(tmp_path):
    pq.write_table(pa.table({"path": ["img/1.jpg", "/abs/2.jpg"], "caption": ["one cat", None]}),
                   tmp_path / "part-0.parquet", row_group_size=1)
    rows = _rows(tmp_path)
    assert rows[0]["key"] == "part-0-000000000"
    assert rows[0]["source"] == str(tmp_path / "img" / "1.jpg")
    assert rows[1]["source"] == "/abs/2.jpg" and rows[1]["drop_reason"] == "missing_caption"


def test_jsonl_bad_lines_and_done_keys_are_skipped(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"key":"a","url":"http://x/a","caption":"one"}\n\n'
                  b'[1,2]\n{"key":"b","url":"http://x/b","caption":"two"}\n{broken\n')
    rows = _rows(p)
    assert [r["drop_reason"] for r in rows] == [None, "malformed_row", None, "malformed_row"]
    done = np.sort(key_owner(["a"]))
    assert [r["key"] for r in _rows(p, done=done)][0] != "a"


def test_blocks_are_bounded(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps({"url": f"http://x/{i}", "caption": "c"}) for i in range(50)))
    storage, cfg = Storage(), InputConfig(rows_per_block=8)
    (unit,) = plan_inputs(str(p), cfg, storage)
    sizes = [t.num_rows for t in read_unit(unit, cfg, storage)]
    assert sum(sizes) == 50 and max(sizes) <= 8


def test_unknown_or_missing_inputs_are_clear_errors(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(InputError, match="cannot tell the input format"):
        _rows(tmp_path)
    with pytest.raises(InputError, match="not found"):
        _rows(tmp_path / "missing")
    with pytest.raises(InputError, match="no csv manifest"):
        _rows(tmp_path, InputConfig(format="csv"))
