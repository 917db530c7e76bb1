"""The dataset-wide dedup index against a brute-force reference."""

import numpy as np
import pytest

from vlp.curation.dedup import (
    DedupConfig,
    DedupIndex,
    HashIndex,
    band_buckets,
    combine_flags,
    make_entries,
    split_by_shard,
)


def _reference(phashes, shas, keys, d):
    """First seen wins: row i is a duplicate if an earlier row (other key) matches it."""
    u = np.asarray(phashes, dtype=np.int64).view(np.uint64)
    exact, near = [], []
    for i in range(len(u)):
        e = n = False
        for j in range(i):
            if keys[j] == keys[i]:
                continue
            e |= shas[j] == shas[i]
            n |= bin(int(u[i] ^ u[j])).count("1") <= d
        exact.append(e)
        near.append(n)
    return np.array(exact), np.array(near)


def _dataset(rng, n=600, d=4):
    base = rng.integers(-(2**63), 2**63 - 1, size=n // 2, dtype=np.int64)
    # plant near copies: flip up to d bits (and some just beyond d)
    copies = []
    for h in base[: n // 4]:
        flips = rng.choice(64, size=rng.integers(0, d + 3), replace=False)
        v = int(h) & (2**64 - 1)
        for f in flips:
            v ^= 1 << int(f)
        copies.append(np.int64(np.uint64(v).view(np.int64)))
    ph = np.concatenate([base, np.array(copies, dtype=np.int64),
                         rng.integers(-(2**63), 2**63 - 1, size=n - len(base) - len(copies), dtype=np.int64)])
    order = rng.permutation(len(ph))
    ph = ph[order]
    pool = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(50)]
    shas = [pool[i] for i in rng.integers(0, 50, len(ph))]  # many exact collisions
    keys = [f"k{i}" for i in range(len(ph))]
    return ph, shas, keys


@pytest.mark.parametrize("shards,batch", [(1, 600), (1, 37), (3, 50), (4, 1)])
def test_index_matches_brute_force_whatever_the_batching_and_sharding(shards, batch):
    rng = np.random.default_rng(shards * 100 + batch)
    cfg = DedupConfig(max_distance=4, shards=shards)
    ph, shas, keys = _dataset(rng)
    ref_exact, ref_near = _reference(ph, shas, keys, 4)
    assert ref_near.sum() > 50 and ref_exact.sum() > 50  # the data really has duplicates
    indexes = [DedupIndex(cfg) for _ in range(shards)]
    got_exact, got_near = [], []
    for s in range(0, len(ph), batch):
        entries = make_entries(keys[s:s + batch], shas[s:s + batch], ph[s:s + batch], cfg)
        parts = split_by_shard(entries, shards)
        flags = [ix.check_and_insert(p) for ix, p in zip(indexes, parts)]
        e, n = combine_flags(len(keys[s:s + batch]), parts, flags)
        got_exact.append(e)
        got_near.append(n)
    np.testing.assert_array_equal(np.concatenate(got_exact), ref_exact)
    np.testing.assert_array_equal(np.concatenate(got_near), ref_near)


def test_a_row_never_matches_itself_so_retries_are_idempotent():
    cfg = DedupConfig()
    index = DedupIndex(cfg)
    entries = make_entries(["a", "b"], ["00" * 32, "11" * 32], np.array([0, -1], dtype=np.int64), cfg)  # hashes 64 bits apart
    first = index.check_and_insert(entries)
    again = index.check_and_insert(entries)  # the same rows, as a retried task would send them
    assert not first[0].any() and not first[1].any()
    assert not again[0].any() and not again[1].any()


def test_bands_cover_the_whole_hash():
    ph = np.array([-1, 0, 12345], dtype=np.int64)
    assert [int(x) for x in band_buckets(ph, 1)[:, 0].view(np.int64)] == [-1, 0, 12345]
    for bands in (2, 5, 16):
        b = band_buckets(ph, bands)
        widths = [64 // bands + (1 if i < 64 % bands else 0) for i in range(bands)]
        assert sum(widths) == 64
        # all-ones hash: every band holds all ones of its width
        low = b[0] & np.uint64((1 << 48) - 1)
        assert [int(x) for x in low] == [(1 << w) - 1 for w in widths]


def test_segments_merge_and_keep_everything():
    index = HashIndex(0)
    for i in range(100):
        index.insert(np.array([i], dtype=np.uint64), np.array([i], dtype=np.uint64), np.array([i], dtype=np.uint64))
    assert len(index) == 100 and len(index._segments) <= 8
    dup = index.check_and_insert(np.arange(100, dtype=np.uint64), np.arange(100, dtype=np.uint64),
                                 np.full(100, 999, dtype=np.uint64))
    assert dup.all()


def test_huge_buckets_are_matched_in_bounded_chunks_with_the_same_result():
    """Thousands of blank images share one bucket; chunking the candidate pairs changes nothing."""
    rng = np.random.default_rng(1)
    index = HashIndex(max_distance=3)
    n = 3000
    buckets = np.zeros(n, dtype=np.uint64)  # all in one bucket
    values = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64)
    index.insert(buckets, values, np.arange(n, dtype=np.uint64))
    q_values = values[:200] ^ np.uint64(0b101)  # 2 bits away from the first 200 entries
    q_values[100:] = rng.integers(0, 2**63, 100, dtype=np.int64).view(np.uint64)
    q_owners = np.full(200, 10**9, dtype=np.uint64)
    segment = index._segments[0]
    whole = np.zeros(200, dtype=bool)
    index._match_segment(segment, np.zeros(200, dtype=np.uint64), q_values, q_owners, whole)
    chunked = np.zeros(200, dtype=bool)
    index._match_segment(segment, np.zeros(200, dtype=np.uint64), q_values, q_owners, chunked, chunk=7)
    np.testing.assert_array_equal(whole, chunked)
    assert whole[:100].all()
    reference = [min(bin(int(v ^ e)).count("1") for e in values) <= 3 for v in q_values[100:]]
    np.testing.assert_array_equal(whole[100:], reference)
