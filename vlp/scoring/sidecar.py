"""Score sidecars: per-shard Parquet files beside the shards, aligned row for row with them.

Layout of one scoring run named NAME over the shard folder DIR::

    DIR/_scores/NAME/
      shard-000000.parquet ...     key, clip_score [, image_embedding, text_embedding]: row i of the
                                   sidecar is row i of the shard of the same name
      _manifest.json               the model (path, content hash, kind), preprocessing, settings, the
                                   shard folder's manifest hash, embedding size, status, shards
      _stats.json                  clip_score distribution per caption language, rows failed
      clip_score_hist.png          the same as a picture
      _parts/<shard stem>/part-*.parquet   what encoders committed, until the shard's sidecar is written
      _shard_stats/<shard stem>.json       each finished shard's histogram (so a resume keeps its stats)

``clip_score`` is the cosine of the pair's image and text embeddings (null where the image could not
be decoded: counted in the stats as ``failed``). Sidecars are written once, atomically; the shards are
never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from vlp.data.storage import Storage, join

SCORES_DIR = "_scores"
PARTS_DIR = "_parts"
SHARD_STATS_DIR = "_shard_stats"
MANIFEST = "_manifest.json"
STATS = "_stats.json"
HISTOGRAM_PNG = "clip_score_hist.png"

# Fixed bins over the cosine's range: per-shard histograms add up exactly, at any scale.
HIST_BINS = 200
HIST_EDGES = np.linspace(-1.0, 1.0, HIST_BINS + 1)
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def scores_folder(shards: str, name: str) -> str:
    return join(shards, SCORES_DIR, name)


def shard_stem(shard_name: str) -> str:
    return shard_name.rsplit(".", 1)[0]


def sidecar_schema(with_embeddings: bool) -> pa.Schema:
    fields = [pa.field("key", pa.string(), nullable=False), pa.field("clip_score", pa.float32())]
    if with_embeddings:
        fields += [pa.field("image_embedding", pa.list_(pa.float16())),
                   pa.field("text_embedding", pa.list_(pa.float16()))]
    return pa.schema(fields)


# What encoders commit: the sidecar's columns plus where each row sits, and its language (for stats).
PART_EXTRA = [pa.field("row", pa.int64(), nullable=False), pa.field("lang", pa.string())]


def part_schema(with_embeddings: bool) -> pa.Schema:
    return pa.schema(list(sidecar_schema(with_embeddings)) + PART_EXTRA)


def folder_digest(path: str) -> str:
    """Content hash of a local model folder (every file's relative name and bytes), 16 hex digits."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class ScoreHistogram:
    """Counts of ``clip_score`` in ``HIST_BINS`` bins, per caption language, plus exact sums."""

    counts: dict[str, list[int]] = field(default_factory=dict)
    sums: dict[str, list[float]] = field(default_factory=dict)  # [n, sum, sum of squares]
    failed: int = 0

    def add(self, scores: np.ndarray, langs: list[str], failed: int = 0) -> None:
        self.failed += failed
        langs = np.asarray(langs, dtype=object)
        for lang in sorted(set(langs.tolist())):
            s = scores[langs == lang].astype(np.float64)
            c, _ = np.histogram(np.clip(s, -1.0, 1.0), bins=HIST_EDGES)
            key = str(lang or "unknown")
            self.counts[key] = (np.asarray(self.counts.get(key, np.zeros(HIST_BINS, np.int64)))
                                + c).tolist()
            n, t, q = self.sums.get(key, [0, 0.0, 0.0])
            self.sums[key] = [n + len(s), t + float(s.sum()), q + float((s * s).sum())]

    def merge(self, other: "ScoreHistogram") -> None:
        self.failed += other.failed
        for key, c in other.counts.items():
            self.counts[key] = (np.asarray(self.counts.get(key, np.zeros(HIST_BINS, np.int64)))
                                + np.asarray(c)).tolist()
            n, t, q = self.sums.get(key, [0, 0.0, 0.0])
            self.sums[key] = [n + other.sums[key][0], t + other.sums[key][1], q + other.sums[key][2]]

    def to_json(self) -> dict:
        return {"counts": self.counts, "sums": self.sums, "failed": self.failed}

    @classmethod
    def from_json(cls, data: dict) -> "ScoreHistogram":
        return cls(counts=data["counts"], sums=data["sums"], failed=data["failed"])

    def summary(self) -> dict:
        """Per language (and ``all``): rows, mean, std and quantiles (to the bin width, 0.01)."""
        out = {}
        keys = sorted(self.counts)
        totals = np.sum([self.counts[k] for k in keys], axis=0) if keys else np.zeros(HIST_BINS)
        sums = np.sum([self.sums[k] for k in keys], axis=0) if keys else np.zeros(3)
        for key, counts, (n, t, q) in [*((k, self.counts[k], self.sums[k]) for k in keys),
                                       ("all", totals, sums)]:
            counts = np.asarray(counts)
            n = int(n)
            if not n:
                continue
            mean = t / n
            cdf = np.cumsum(counts) / n
            out[key] = {"rows": n, "mean": round(mean, 6),
                        "std": round(float(np.sqrt(max(q / n - mean * mean, 0.0))), 6),
                        "quantiles": {str(p): round(float(HIST_EDGES[1:][np.searchsorted(cdf, p)]), 4)
                                      for p in QUANTILES}}
        return out


def read_json(storage: Storage, uri: str) -> dict | None:
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def write_json(storage: Storage, uri: str, data: dict) -> None:
    storage.write_bytes_atomic(uri, json.dumps(data, indent=2, ensure_ascii=False).encode())


def plot_histogram(hist: ScoreHistogram, path: str, title: str) -> str:
    """The clip_score distribution per language as a PNG at the local ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    centres = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2
    for key in sorted(hist.counts):
        counts = np.asarray(hist.counts[key], dtype=np.float64)
        if counts.sum():
            ax.step(centres, counts / counts.sum(), where="mid", label=f"{key} ({int(counts.sum()):,})")
    ax.set_xlabel("clip_score (cosine of the pair's embeddings)")
    ax.set_ylabel("share of rows per bin")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
