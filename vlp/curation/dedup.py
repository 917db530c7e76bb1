"""Dataset-wide deduplication: exact (content hash) and near (perceptual hash within a Hamming radius).

The index sees every row of the run, not one block at a time, so a duplicate is caught wherever in
the dataset its twin was. Design, for billions of rows:

- Entries are ``(bucket, value, owner)`` uint64 triples kept in sorted numpy segments merged like an
  LSM tree: 24 bytes an entry, vectorised ``searchsorted`` look-ups, no Python object per row.
- Exact: bucket and value are the first and second 8 bytes of the SHA-256; a match is equality.
- Near: multi-index hashing. Split the 64-bit pHash into ``max_distance + 1`` bands; by pigeonhole two
  hashes within ``max_distance`` bits agree exactly on at least one band, so each band is a bucket
  and only hashes sharing a bucket are compared (popcount of the XOR).
- ``owner`` is a hash of the row's key: a row never matches itself, so a retried Ray task that sends the
  same rows again does not drop them as duplicates of their first attempt.
- Buckets are spread over shards (``shard_of``); each shard serialises its own check-and-insert, so two
  near-duplicates processed at the same moment on different workers still meet in one shard (they
  share a band, hence a bucket, hence a shard) and exactly one of them survives.

The first row seen wins; rows that are dropped as duplicates stay in the index (dropping a later
near-copy of a dropped row is intended).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

_U64 = np.uint64


@dataclass(frozen=True)
class DedupConfig:
    """Deduplication across the whole run.

    Attributes:
        exact: drop rows whose source bytes have the SHA-256 of an earlier row.
        near: drop rows whose pHash is within ``max_distance`` bits of an earlier row's.
        max_distance: Hamming radius of a near duplicate (0-15; 4 catches re-encodes and small resizes).
        shards: index shards (Ray actors); raise with the dataset's size (about 24 bytes per row for
            exact, 24 x (max_distance + 1) for near).
    """

    exact: bool = True
    near: bool = True
    max_distance: int = 4
    shards: int = 1

    def __post_init__(self):
        if not 0 <= self.max_distance <= 15:
            raise ValueError("dedup.max_distance must be in 0..15")
        if self.shards < 1:
            raise ValueError("dedup.shards must be >= 1")


def key_owner(keys: list[str]) -> np.ndarray:
    """A 64-bit id per row key."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys],
        dtype=_U64,
    )


def sha256_parts(hex_digests: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(first 8 bytes, next 8 bytes) of hex SHA-256 digests as uint64 arrays."""
    raw = b"".join(bytes.fromhex(h)[:16] for h in hex_digests)
    both = np.frombuffer(raw, dtype=">u8").astype(_U64).reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


def band_buckets(phashes: np.ndarray, bands: int) -> np.ndarray:
    """(n, bands) bucket ids: band index in the high bits, the band's bits below."""
    u = np.asarray(phashes, dtype=np.int64).view(_U64)
    widths = [64 // bands + (1 if i < 64 % bands else 0) for i in range(bands)]
    out = np.empty((len(u), bands), dtype=_U64)
    shift = 64
    for b, w in enumerate(widths):
        shift -= w
        out[:, b] = ((u >> _U64(shift)) & _U64((1 << w) - 1)) | (_U64(b) << _U64(48))
    return out


def shard_of(buckets: np.ndarray, shards: int) -> np.ndarray:
    """Spread buckets over shards (a multiplicative hash, so band ids and low bits both mix)."""
    mixed = (np.asarray(buckets, dtype=_U64) * _U64(0x9E3779B97F4A7C15)) >> _U64(40)
    return (mixed % _U64(shards)).astype(np.int64)


def _distance(a: np.ndarray, b) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


class HashIndex:
    """A multiset of (bucket, value, owner) entries answering: is there an earlier matching entry?"""

    def __init__(self, max_distance: int = 0):
        self.max_distance = max_distance
        self._segments: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(s[0]) for s in self._segments)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes + c.nbytes for a, b, c in self._segments)

    def _matches(self, values, owners, value, owner) -> bool:
        if self.max_distance == 0:
            hit = values == value
        else:
            hit = _distance(values, value) <= self.max_distance
        return bool(np.any(hit & (owners != owner)))

    def _match_segment(self, segment, buckets, values, owners, dup, chunk: int = 1 << 22) -> None:
        """Flag queries that match an entry of one sorted segment, without a Python loop per row:
        every (query, candidate) pair sharing a bucket is expanded into index arrays."""
        seg_b, seg_v, seg_o = segment
        lo = np.searchsorted(seg_b, buckets, "left")
        counts = np.searchsorted(seg_b, buckets, "right") - lo
        queries = np.flatnonzero(counts)
        start = 0
        while start < len(queries):
            # Bound the pairs held at once (a bucket of millions of blank images must not blow up).
            csum = np.cumsum(counts[queries[start:]])
            stop = start + max(1, int(np.searchsorted(csum, chunk, "right")))
            q = queries[start:stop]
            n = counts[q]
            qi = np.repeat(q, n)
            first = np.repeat(lo[q] - (np.cumsum(n) - n), n)
            si = first + np.arange(len(qi))
            if self.max_distance == 0:
                hit = seg_v[si] == values[qi]
            else:
                hit = _distance(seg_v[si], values[qi]) <= self.max_distance
            dup[qi[hit & (seg_o[si] != owners[qi])]] = True
            start = stop

    def check_and_insert(self, buckets, values, owners) -> np.ndarray:
        """Flags, per entry in order, whether an earlier entry (indexed or earlier in this call)
        matches it; then indexes all of them."""
        buckets = np.asarray(buckets, dtype=_U64)
        values = np.asarray(values, dtype=_U64)
        owners = np.asarray(owners, dtype=_U64)
        dup = np.zeros(len(buckets), dtype=bool)
        for segment in self._segments:
            self._match_segment(segment, buckets, values, owners, dup)
        # Within the call: compare each entry with the earlier ones that share its bucket.
        order = np.argsort(buckets, kind="stable")
        sorted_b = buckets[order]
        starts = np.flatnonzero(np.r_[True, sorted_b[1:] != sorted_b[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            group = order[s:e]  # original indices, ascending thanks to the stable sort
            for k in range(1, len(group)):
                i, earlier = group[k], group[:k]
                if not dup[i]:
                    dup[i] = self._matches(values[earlier], owners[earlier], values[i], owners[i])
        self.insert(buckets, values, owners)
        return dup

    def insert(self, buckets, values, owners) -> None:
        if len(buckets) == 0:
            return
        buckets = np.asarray(buckets, dtype=_U64)
        order = np.argsort(buckets, kind="stable")
        self._segments.append(
            (
                buckets[order],
                np.asarray(values, dtype=_U64)[order],
                np.asarray(owners, dtype=_U64)[order],
            )
        )
        # Merge like a binary counter: segment sizes stay geometric, so a look-up touches O(log n)
        # segments and each entry is re-sorted O(log n) times in all.
        while len(self._segments) >= 2 and len(self._segments[-1][0]) * 2 >= len(
            self._segments[-2][0]
        ):
            b2, v2, o2 = self._segments.pop()
            b1, v1, o1 = self._segments.pop()
            b, v, o = np.concatenate([b1, b2]), np.concatenate([v1, v2]), np.concatenate([o1, o2])
            order = np.argsort(b, kind="stable")
            self._segments.append((b[order], v[order], o[order]))


@dataclass
class DedupEntries:
    """The index entries of a batch of rows, with the row each entry belongs to."""

    exact_buckets: np.ndarray
    exact_values: np.ndarray
    exact_owners: np.ndarray
    exact_rows: np.ndarray
    near_buckets: np.ndarray
    near_values: np.ndarray
    near_owners: np.ndarray
    near_rows: np.ndarray

    def select(self, exact_mask: np.ndarray, near_mask: np.ndarray) -> "DedupEntries":
        return DedupEntries(
            self.exact_buckets[exact_mask],
            self.exact_values[exact_mask],
            self.exact_owners[exact_mask],
            self.exact_rows[exact_mask],
            self.near_buckets[near_mask],
            self.near_values[near_mask],
            self.near_owners[near_mask],
            self.near_rows[near_mask],
        )


def make_entries(
    keys: list[str], sha256: list[str], phash: np.ndarray, config: DedupConfig
) -> DedupEntries:
    n = len(keys)
    owners = key_owner(keys)
    rows = np.arange(n, dtype=np.int64)
    empty = np.zeros(0, dtype=_U64)
    if config.exact and n:
        eb, ev = sha256_parts(sha256)
        exact = (eb, ev, owners, rows)
    else:
        exact = (empty, empty, empty, np.zeros(0, dtype=np.int64))
    if config.near and n:
        bands = config.max_distance + 1
        nb = band_buckets(np.asarray(phash, dtype=np.int64), bands).reshape(-1)
        nv = np.repeat(np.asarray(phash, dtype=np.int64).view(_U64), bands)
        near = (nb, nv, np.repeat(owners, bands), np.repeat(rows, bands))
    else:
        near = (empty, empty, empty, np.zeros(0, dtype=np.int64))
    return DedupEntries(*exact, *near)


class DedupIndex:
    """One shard of the dataset-wide index (the state of one Ray actor, or the whole index in tests)."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.exact = HashIndex(0)
        self.near = HashIndex(config.max_distance)

    def check_and_insert(self, entries: DedupEntries) -> tuple[np.ndarray, np.ndarray]:
        """Per-entry duplicate flags (exact, near)."""
        return (
            self.exact.check_and_insert(
                entries.exact_buckets, entries.exact_values, entries.exact_owners
            ),
            self.near.check_and_insert(
                entries.near_buckets, entries.near_values, entries.near_owners
            ),
        )

    def insert(self, entries: DedupEntries) -> None:
        self.exact.insert(entries.exact_buckets, entries.exact_values, entries.exact_owners)
        self.near.insert(entries.near_buckets, entries.near_values, entries.near_owners)

    def size(self) -> dict:
        return {"exact_entries": len(self.exact), "near_entries": len(self.near),
                "bytes": self.exact.nbytes + self.near.nbytes}


def split_by_shard(entries: DedupEntries, shards: int) -> list[DedupEntries]:
    if shards == 1:
        return [entries]
    es, ns = shard_of(entries.exact_buckets, shards), shard_of(entries.near_buckets, shards)
    return [entries.select(es == s, ns == s) for s in range(shards)]


def combine_flags(
    n_rows: int, parts: list[DedupEntries], flags: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (exact duplicate, near duplicate) from the per-entry flags of every shard."""
    exact = np.zeros(n_rows, dtype=bool)
    near = np.zeros(n_rows, dtype=bool)
    for part, (ef, nf) in zip(parts, flags):
        np.logical_or.at(exact, part.exact_rows[ef], True)
        np.logical_or.at(near, part.near_rows[nf], True)
    return exact, near
