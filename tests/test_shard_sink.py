"""The shard writer's pieces: shard planning, per-row pixel sizes, and the streamed Parquet output that
must equal the simple concatenate-filter-split reference it replaced (without holding a copy of every
kept row)."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.shard_sink import KeptRows, pixel_bytes, plan_shards, write_parquet_stream
from vlp.data.storage import Storage, StorageConfig

SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("image", pa.binary()),
                    pa.field("drop_reason", pa.string())])
OUT_SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("image", pa.binary())])


def _blocks(seed: int, n_blocks: int = 7):
    rng = np.random.default_rng(seed)
    blocks, k = [], 0
    for _ in range(n_blocks):
        rows = []
        for _ in range(int(rng.integers(0, 400))):
            drop = rng.random() < 0.25
            rows.append({"key": f"k{k}", "drop_reason": "duplicate_exact" if drop else None,
                         "image": None if drop else rng.bytes(int(rng.integers(1, 60)))})
            k += 1
        blocks.append(pa.Table.from_pylist(rows, schema=SCHEMA))
    return blocks


def _reference_split(sizes, max_rows, max_bytes):
    """The rule written out plainly: a new shard when the next row would pass either limit."""
    shards, current, acc = [], [], 0
    for i, size in enumerate(sizes):
        if current and (len(current) >= max_rows or acc + size > max_bytes):
            shards.append((current[0], current[-1] + 1))
            current, acc = [], 0
        current.append(i)
        acc += size
    if current:
        shards.append((current[0], current[-1] + 1))
    return shards


@pytest.mark.parametrize("max_rows,max_bytes", [(100, 10**9), (10**6, 2000), (37, 500), (1, 10**9)])
def test_plan_shards_follows_the_row_and_byte_limits(max_rows, max_bytes):
    sizes = np.random.default_rng(1).integers(1, 120, 600)
    ranges = plan_shards(sizes, max_rows, max_bytes)
    assert ranges == _reference_split(list(sizes), max_rows, max_bytes)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
    assert all(a == b_prev for (a, _), (_, b_prev) in zip(ranges[1:], ranges[:-1]))
    assert plan_shards(np.zeros(0, dtype=np.int64), 10, 10) == []


def test_pixel_bytes_counts_the_poster_and_every_frame_and_nulls_as_zero():
    frames = pa.array([[b"xx", b"yyy"], None, [], [b"z"], [b"abcd"]], pa.list_(pa.binary()))
    table = pa.table({"image": pa.array([b"ab", None, b"c", b"", b"12345"]), "frames": frames})
    expected = [2 + 5, 0, 1, 0 + 1, 5 + 4]
    assert pixel_bytes(table).tolist() == expected
    assert pixel_bytes(pa.concat_tables([table, table])).tolist() == expected * 2  # two chunks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_shards_equal_the_concatenate_filter_split_reference(seed, tmp_path):
    blocks = _blocks(seed)
    whole = pa.concat_tables(blocks)
    reference = whole.filter(pc.invert(whole.column("drop_reason").is_valid()))
    kept = KeptRows(blocks)
    assert kept.num_rows == reference.num_rows
    assert kept.pixel_bytes().tolist() == pixel_bytes(reference).tolist()
    assert kept.dropped().column("key").to_pylist() == whole.filter(
        whole.column("drop_reason").is_valid()).column("key").to_pylist()

    ranges = plan_shards(kept.pixel_bytes(), 300, 6000)
    assert len(ranges) > 2  # the limits cut shards in the middle of blocks
    storage = Storage(StorageConfig())
    for j, (a, b) in enumerate(ranges):
        path = str(tmp_path / f"shard-{j}.parquet")
        with storage.atomic_output(path) as f:
            write_parquet_stream(kept.slices(a, b), f, OUT_SCHEMA, "zstd", row_group_rows=128)
            size = f.tell()
        table = pq.read_table(path)
        assert table.equals(reference.slice(a, b - a).select(OUT_SCHEMA.names).cast(OUT_SCHEMA))
        groups = [pq.ParquetFile(path).metadata.row_group(i).num_rows
                  for i in range(pq.ParquetFile(path).metadata.num_row_groups)]
        assert all(g == 128 for g in groups[:-1]) and 0 < groups[-1] <= 128
        assert size == (tmp_path / f"shard-{j}.parquet").stat().st_size


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path):
    storage = Storage(StorageConfig())
    target = tmp_path / "out" / "shard.parquet"
    with pytest.raises(RuntimeError):
        with storage.atomic_output(str(target)) as f:
            f.write(b"half a shard")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
