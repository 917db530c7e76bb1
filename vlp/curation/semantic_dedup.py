"""Semantic deduplication (SemDeDup, Abbas et al. 2023): drop images whose embedding is nearly the same
direction as a better-scored image's.

Responsible for the maths, as pure NumPy (and faiss for k-means) over arrays, in the steps a
distributed job runs separately:

1. ``fit_centroids``: spherical k-means on a sample of the L2-normalised embeddings (faiss);
   ``resolve_clusters`` and ``fit_sample_size`` say how many clusters and how large a sample.
2. ``assign_clusters``: each row's nearest centroid, batch by batch (streaming; exact argmax of the
   cosine, a plain matrix product).
3. ``dedup_bounded_cluster``: one cluster, as one independent task: within the cluster, rows are taken
   in decreasing ``score`` (ties: smaller key) and a row is dropped iff its cosine to some row already
   kept is >= ``threshold`` (``dedup_cluster``, exact and blockwise). A cluster larger than
   ``max_cluster_rows`` is first split by k-means into parts (see ``SemanticDedupConfig``).

``dedup_clusters`` runs step 3 over every cluster of an assignment and ``semantic_dedup`` chains the
three steps in one process (tests, small runs). Nothing here starts Ray: the job that wires the steps
to Ray Data lives in ``pipelines/``.

Rows whose embedding is not finite or has zero norm have no direction: they are never compared,
never dropped, and reported in ``SemanticDedupResult.invalid`` so the job counts them (a bad
embedding is evidence of nothing, and a dedup stage only drops on evidence).

Where variants go: a different keep rule (SemDeDup's default keeps the row farthest from its
centroid) is a different ``scores`` array (higher is kept first), not new code; an approximate
assignment (an ANN index over the centroids, which would let K grow, see ``auto_clusters``) is a new
function beside ``assign_clusters`` returning the same arrays; a GPU k-means is a new ``fit_*``
returning unit-norm float32 centroids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlp.config import ConfigError

DROP_REASON = "duplicate_semantic"

# Cosine scores held at once when assigning rows to centroids (64 MiB of float32).
_ASSIGN_SCORES = 1 << 24
# Kept rows compared per matrix product in ``dedup_cluster``: a (block, 4 x block) similarity tile,
# 64 MiB at the default block of 2,048 rows.
_TILE_BLOCKS = 4


@dataclass(frozen=True)
class SemanticDedupConfig:
    """Semantic deduplication of a whole run.

    Attributes:
        threshold: a row is a duplicate of a kept row when their cosine similarity is at least this
            (0 < threshold < 1; 0.95 keeps crops and re-encodes together, about SemDeDup's eps 0.05).
        clusters: k-means clusters; 0 picks ``auto_clusters(rows)``.
        kmeans_iterations: Lloyd iterations of the k-means fit.
        sample_per_cluster: rows sampled per cluster to fit the centroids (faiss's default cap is
            256; fewer than about 40 gives noisy centroids).
        seed: the k-means initialisation and the fit sample.
        max_cluster_rows: a cluster larger than this is split by k-means into parts of about half of
            it before dedup (pairs across two parts are then missed, as across two clusters); it
            bounds one task's time (at most rows^2 x dim multiply-adds, ~4 core-minutes at 200,000
            rows of 512 dims) and memory (about 2 x rows x dim x 4 bytes). 0: no bound.
        block_rows: rows compared per matrix product in a cluster; the scratch memory is about
            7 x block_rows^2 x 4 bytes (112 MiB at 2,048) besides the cluster itself.
    """

    threshold: float = 0.95
    clusters: int = 0
    kmeans_iterations: int = 20
    sample_per_cluster: int = 256
    seed: int = 0
    max_cluster_rows: int = 200_000
    block_rows: int = 2048

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("semantic_dedup.threshold must be in (0, 1)")
        if self.clusters < 0:
            raise ConfigError("semantic_dedup.clusters must be >= 0 (0: automatic)")
        if self.kmeans_iterations < 1:
            raise ConfigError("semantic_dedup.kmeans_iterations must be >= 1")
        if self.sample_per_cluster < 1:
            raise ConfigError("semantic_dedup.sample_per_cluster must be >= 1")
        if self.max_cluster_rows < 0 or 0 < self.max_cluster_rows < 4:
            raise ConfigError("semantic_dedup.max_cluster_rows must be 0 (no bound) or >= 4")
        if self.block_rows < 1:
            raise ConfigError("semantic_dedup.block_rows must be >= 1")


@dataclass(frozen=True)
class SemanticDedupResult:
    """What dedup decided, as row indices into the arrays it was given (ascending, no Python object
    per row).

    Attributes:
        kept: rows that stay, including the ``invalid`` ones.
        dropped: rows dropped as semantic duplicates.
        duplicate_of: per dropped row, the kept row it duplicates: the most similar of the rows kept
            before it (ties: the earliest kept).
        similarity: per dropped row, its cosine similarity to ``duplicate_of`` (float32).
        invalid: rows whose embedding is not finite or has zero norm: kept, never compared.
    """

    kept: np.ndarray
    dropped: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    invalid: np.ndarray

    @classmethod
    def empty(cls) -> SemanticDedupResult:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, none, np.zeros(0, dtype=np.float32), none)

    @classmethod
    def merge(cls, parts: list[tuple[SemanticDedupResult, np.ndarray]]) -> SemanticDedupResult:
        """One result from results over subsets of the rows: ``(result, rows)`` pairs, where ``rows``
        maps the part's indices to the whole's."""
        if not parts:
            return cls.empty()
        dropped = np.concatenate([rows[r.dropped] for r, rows in parts])
        order = np.argsort(dropped, kind="stable")
        return cls(
            kept=np.sort(np.concatenate([rows[r.kept] for r, rows in parts])),
            dropped=dropped[order],
            duplicate_of=np.concatenate([rows[r.duplicate_of] for r, rows in parts])[order],
            similarity=np.concatenate([r.similarity for r, _ in parts])[order],
            invalid=np.sort(np.concatenate([rows[r.invalid] for r, rows in parts])),
        )

    def ledger(self, keys) -> dict[str, list]:
        """The drop-ledger columns of the dropped rows: ``key``, ``reason``, ``detail`` (what a person
        reads), and ``duplicate_of`` (a key) and ``similarity`` for machines."""
        keys = np.asarray(keys)
        dup_keys = keys[self.duplicate_of].tolist()
        sims = self.similarity.tolist()
        return {
            "key": keys[self.dropped].tolist(),
            "reason": [DROP_REASON] * len(self.dropped),
            "detail": [f"cosine {s:.4f} to kept {k}" for s, k in zip(sims, dup_keys)],
            "duplicate_of": dup_keys,
            "similarity": sims,
        }


def auto_clusters(rows: int) -> int:
    """About sqrt(rows) clusters, the K that minimises the run's work when assignment is exact.

    Assigning N rows to K centroids costs N x K dot products; dedup inside clusters of about N / K
    rows costs at most N x (N / K) / 2 (each row against the rows kept before it), times the
    imbalance sum(n_c^2) x K / N^2 of k-means' uneven clusters. The sum is smallest at
    K = sqrt(N x imbalance / 2); with an imbalance of 2 (1.03 on the benchmark's even synthetic
    clusters; real data is more uneven) that is sqrt(N): 1,000 clusters of ~1,000 rows at 10^6 rows,
    ~77,000 of ~77,000 at 6 x 10^9 (about 160 MB per cluster at 512 float32 dims: one task's
    memory). Both dot products run at the same BLAS rate (benchmarks/README.md). With an approximate
    assignment whose cost does not grow with K, smaller clusters (SemDeDup used ~9,000 rows each)
    would be cheaper.
    """
    return max(1, round(math.sqrt(max(rows, 0))))


def resolve_clusters(config: SemanticDedupConfig, rows: int) -> int:
    """The K a run over ``rows`` rows uses: the configured one, or ``auto_clusters``; never above
    ``rows``."""
    return max(1, min(config.clusters or auto_clusters(rows), max(rows, 1)))


def fit_sample_size(config: SemanticDedupConfig, clusters: int, rows: int) -> int:
    """How many rows to sample to fit ``clusters`` centroids."""
    return min(rows, clusters * config.sample_per_cluster)


def unit_rows(embeddings) -> tuple[np.ndarray, np.ndarray]:
    """(float32 L2-normalised copy, valid) of a (rows, dim) array; rows that are not finite or have
    zero norm are not ``valid`` and come back as zeros."""
    x = np.array(embeddings, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) array, not of shape {x.shape}")
    valid = _normalise_in_place(x)
    return x, valid


def _normalise_in_place(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # no (rows, dim) temporary
    valid = np.isfinite(norms) & (norms > 0)  # a NaN or inf anywhere makes the norm non-finite
    x /= np.where(valid, norms, 1)[:, None]  # in place: x[valid] /= ... would copy the rows
    if not valid.all():
        x[~valid] = 0.0
    return valid


def fit_centroids(sample, clusters: int, config: SemanticDedupConfig = SemanticDedupConfig()
                  ) -> np.ndarray:
    """Spherical k-means centroids (at most ``clusters``, dim), unit-norm float32, fitted on every
    valid row of ``sample`` (the caller samples: see ``fit_sample_size``). Fewer valid rows than
    ``clusters`` gives at most one centroid per row; centroids whose cosine reaches
    ``config.threshold`` are merged into one.

    Raises:
        ValueError: no row of the sample has a finite, non-zero embedding.
    """
    import faiss  # here, not at the top: assignment and dedup work without loading it

    x, valid = unit_rows(sample)
    if not valid.all():
        x = x[valid]
    if len(x) == 0:
        raise ValueError("no finite, non-zero embedding to fit the k-means centroids on")
    k = max(1, min(clusters, len(x)))
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=config.kmeans_iterations, seed=config.seed, spherical=True,
        # The caller chose the sample: faiss must neither subsample it again nor warn that it is small.
        min_points_per_centroid=1, max_points_per_centroid=len(x) // k + 1, verbose=False,
    )
    kmeans.train(x)
    centroids = np.array(kmeans.centroids, dtype=np.float32)
    _normalise_in_place(centroids)
    # k-means spends several centroids on one heavy mass (thousands of copies of one placeholder
    # image): its rows, which differ only by rounding, would scatter over near-identical centroids
    # and never meet. Centroids as alike as duplicates are merged; the most populated one stays.
    labels, _ = assign_clusters(x, centroids)
    population = np.bincount(labels, minlength=k)
    order_keys = np.char.zfill(np.arange(k).astype(str), 12)  # ties: the lower index
    merged = dedup_cluster(centroids, population, order_keys, config.threshold, config.block_rows)
    return centroids[merged.kept]


def assign_clusters(embeddings, centroids: np.ndarray, batch_rows: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine to its centroid) per row: int32 cluster ids (-1 for an invalid row) and
    float32 similarities (NaN for an invalid row). ``batch_rows`` (0: automatic) bounds the
    (batch, clusters) scores held at once."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) array, not of shape {emb.shape}")
    centroids = np.asarray(centroids, dtype=np.float32)
    batch = batch_rows or max(1, _ASSIGN_SCORES // max(len(centroids), 1))
    labels = np.full(len(emb), -1, dtype=np.int32)
    sims = np.full(len(emb), np.nan, dtype=np.float32)
    for start in range(0, len(emb), batch):
        x, valid = unit_rows(emb[start:start + batch])
        scores = x @ centroids.T  # unit vectors: the largest dot product is the nearest centroid
        best = scores.argmax(axis=1)
        sim = scores[np.arange(len(x)), best]
        labels[start:start + len(x)] = np.where(valid, best, -1)
        sims[start:start + len(x)] = np.where(valid, sim, np.nan)
    return labels, sims


def _priority_order(scores, keys, rows: int) -> np.ndarray:
    """Row indices by decreasing score (NaN last), then increasing key (as strings), then index."""
    s = np.asarray(scores, dtype=np.float64)
    k = np.asarray(keys).astype(str)
    if s.shape != (rows,) or k.shape != (rows,):
        raise ValueError(f"scores {s.shape} and keys {k.shape} must have one entry per row ({rows})")
    s = np.where(np.isnan(s), -np.inf, s)
    return np.lexsort((k, -s))  # lexsort is stable: equal (score, key) stay in index order


def dedup_cluster(embeddings, scores, keys, threshold: float, block_rows: int = 2048
                  ) -> SemanticDedupResult:
    """Exact greedy dedup of one cluster.

    Rows are taken by decreasing ``scores`` (ties: smaller key, then smaller index); a row is dropped
    iff its cosine similarity to a row kept before it is >= ``threshold``. The answer is the same for
    every ``block_rows``; memory is the cluster (one float32 copy) plus a few block-sized matrices,
    never rows x rows.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) array, not of shape {emb.shape}")
    order = _priority_order(scores, keys, len(emb))
    x = emb[order].astype(np.float32, copy=False)  # the one copy, in processing order
    valid = _normalise_in_place(x)
    invalid = np.sort(order[~valid])
    if not valid.all():
        order, x = order[valid], x[valid]
    rows = len(order)
    keep = np.zeros(rows, dtype=bool)
    dup_pos = np.full(rows, -1, dtype=np.int64)
    dup_sim = np.zeros(rows, dtype=np.float32)
    # The kept rows are moved to the front of x as they are decided (x[:n_kept]), so each block is
    # compared to them with contiguous matrix products and no second copy of the cluster.
    kept_pos = np.empty(rows, dtype=np.int64)
    n_kept = 0
    tile = block_rows * _TILE_BLOCKS
    for start in range(0, rows, block_rows):
        block = x[start:start + block_rows].copy()  # x[start:...] is overwritten by kept rows below
        b = len(block)
        at = np.arange(b)
        # Against the rows kept in earlier blocks: best similarity and which (earliest on ties).
        best = np.full(b, -np.inf, dtype=np.float32)
        best_at = np.zeros(b, dtype=np.int64)
        for t in range(0, n_kept, tile):
            sims = block @ x[t:min(t + tile, n_kept)].T
            j = sims.argmax(axis=1)
            v = sims[at, j]
            better = v > best
            best[better] = v[better]
            best_at[better] = t + j[better]
        seen = best >= threshold
        # Within the block, in order: only rows close to an earlier row of the block need the
        # sequential pass; every other row not ``seen`` is kept whatever happens before it.
        gram = block @ block.T
        earlier = np.tri(b, k=-1, dtype=bool)  # [i, j]: j comes before i
        close = (gram >= threshold) & earlier
        close[:, seen] = False
        block_keep = ~seen
        for i in np.flatnonzero(block_keep & close.any(axis=1)):
            if (close[i, :i] & block_keep[:i]).any():  # block_keep[:i] is final: i increases
                block_keep[i] = False
        # Each dropped row points at the most similar row kept before it; the earlier blocks come
        # first in the order, so they win ties.
        within = np.where(earlier & block_keep[None, :], gram, -np.inf)
        wj = within.argmax(axis=1)
        wv = within[at, wj]
        from_block = wv > best
        drop = np.flatnonzero(~block_keep)
        in_block = drop[from_block[drop]]
        dup_pos[start + in_block] = start + wj[in_block]
        dup_sim[start + in_block] = wv[in_block]
        earlier_blocks = drop[~from_block[drop]]
        dup_pos[start + earlier_blocks] = kept_pos[best_at[earlier_blocks]]
        dup_sim[start + earlier_blocks] = best[earlier_blocks]
        kept_now = np.flatnonzero(block_keep)
        keep[start + kept_now] = True
        x[n_kept:n_kept + len(kept_now)] = block[kept_now]
        kept_pos[n_kept:n_kept + len(kept_now)] = start + kept_now
        n_kept += len(kept_now)
    dropped = np.flatnonzero(~keep)
    by_row = np.argsort(order[dropped], kind="stable")
    return SemanticDedupResult(
        kept=np.sort(np.concatenate([order[keep], invalid])),
        dropped=order[dropped][by_row],
        duplicate_of=order[dup_pos[dropped]][by_row],
        similarity=dup_sim[dropped][by_row],
        invalid=invalid,
    )


def dedup_bounded_cluster(embeddings, scores, keys, config: SemanticDedupConfig
                          ) -> SemanticDedupResult:
    """Dedup of one cluster as one task: ``dedup_cluster``, after splitting a cluster larger than
    ``config.max_cluster_rows`` into k-means parts of about half that (parts are deduplicated
    independently)."""
    emb = np.asarray(embeddings)
    rows = len(emb)
    if not config.max_cluster_rows or rows <= config.max_cluster_rows:
        return dedup_cluster(emb, scores, keys, config.threshold, config.block_rows)
    parts = -(-2 * rows // config.max_cluster_rows)  # aim at half the bound: parts come out uneven
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(rows, fit_sample_size(config, parts, rows), replace=False))
    try:
        labels, _ = assign_clusters(emb, fit_centroids(emb[sample], parts, config))
    except ValueError:  # no valid row in the sample: nothing to split on
        labels = None
    if labels is None or np.bincount(labels[labels >= 0]).max(initial=0) >= rows:
        # k-means cannot split it (e.g. one image repeated): such a cluster is cheap, each row
        # meets few kept rows.
        return dedup_cluster(emb, scores, keys, config.threshold, config.block_rows)
    return dedup_clusters(emb, scores, keys, labels, config)


def dedup_clusters(embeddings, scores, keys, clusters, config: SemanticDedupConfig
                   ) -> SemanticDedupResult:
    """``dedup_bounded_cluster`` over every cluster of an assignment (``clusters``: one id per row,
    -1 for a row without a valid embedding, which is kept)."""
    emb = np.asarray(embeddings)
    scores = np.asarray(scores)
    keys = np.asarray(keys)
    clusters = np.asarray(clusters)
    if clusters.shape != (len(emb),):
        raise ValueError(f"clusters {clusters.shape} must have one entry per row ({len(emb)})")
    order = np.argsort(clusters, kind="stable")
    cuts = np.flatnonzero(np.diff(clusters[order])) + 1
    parts = []
    for rows in np.split(order, cuts):
        if len(rows) == 0:
            continue
        if clusters[rows[0]] < 0:
            none = np.zeros(0, dtype=np.int64)
            every = np.arange(len(rows))
            parts.append((SemanticDedupResult(every, none, none, np.zeros(0, np.float32), every),
                          rows))
            continue
        parts.append((dedup_bounded_cluster(emb[rows], scores[rows], keys[rows], config), rows))
    return SemanticDedupResult.merge(parts)


def semantic_dedup(embeddings, scores, keys, config: SemanticDedupConfig = SemanticDedupConfig()
                   ) -> SemanticDedupResult:
    """The three steps in one process: fit centroids on a sample of the valid rows, assign every row,
    dedup every cluster."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) array, not of shape {emb.shape}")
    rows = len(emb)
    if rows == 0:
        _priority_order(scores, keys, 0)  # still check that scores and keys are empty too
        return SemanticDedupResult.empty()
    clusters = resolve_clusters(config, rows)
    candidates = np.flatnonzero(_valid_rows(emb))
    if len(candidates) == 0:
        return dedup_clusters(emb, scores, keys, np.full(rows, -1), config)
    rng = np.random.default_rng(config.seed)
    size = fit_sample_size(config, clusters, len(candidates))
    sample = np.sort(rng.choice(candidates, size, replace=False))
    labels, _ = assign_clusters(emb, fit_centroids(emb[sample], clusters, config))
    return dedup_clusters(emb, scores, keys, labels, config)


def _valid_rows(emb: np.ndarray, batch_rows: int = 1 << 16) -> np.ndarray:
    valid = np.zeros(len(emb), dtype=bool)
    for start in range(0, len(emb), batch_rows):
        x = emb[start:start + batch_rows].astype(np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        valid[start:start + len(x)] = np.isfinite(norms) & (norms > 0)
    return valid
