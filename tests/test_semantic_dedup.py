"""Semantic dedup (SemDeDup): the in-cluster rule against a brute-force reference, planted duplicates
among real photos, and the edge cases a dataset-wide run meets."""

import io

import numpy as np
import pytest

from vlp.curation.semantic_dedup import (
    DROP_REASON,
    SemanticDedupConfig,
    SemanticDedupResult,
    assign_clusters,
    auto_clusters,
    dedup_bounded_cluster,
    dedup_cluster,
    dedup_clusters,
    fit_centroids,
    fit_sample_size,
    resolve_clusters,
    semantic_dedup,
    unit_rows,
)

# --- the exact rule ----------------------------------------------------------------------------------


def _reference(embeddings, scores, keys, threshold):
    """SemDeDup keep-the-best, one pair at a time: rows by decreasing score (ties: smaller key, then
    index); a row is dropped iff its cosine to an already kept row is >= threshold, and points at the
    most similar such row (the earliest kept on ties). Returns {dropped: (kept, similarity)}, kept."""
    x = [np.asarray(e, dtype=np.float64) / np.linalg.norm(e) for e in embeddings]
    order = sorted(range(len(x)), key=lambda i: (-scores[i], str(keys[i]), i))
    kept, drops = [], {}
    for i in order:
        best = None
        for j in kept:
            s = sum(float(a) * float(b) for a, b in zip(x[i], x[j]))
            if s >= threshold and (best is None or s > best[1]):
                best = (j, s)
        if best is None:
            kept.append(i)
        else:
            drops[i] = best
    return drops, sorted(kept)


def _planted(rng, rows=240, dim=24):
    """Random directions, a third of them with near copies at spread-out similarities, some copies of
    copies (chains: A ~ B and B ~ C without A ~ C, where greedy order matters), tied scores."""
    base = rng.standard_normal((rows // 2, dim))
    copies = []
    for _ in range(rows - len(base)):
        src = base[rng.integers(len(base) // 3)] if rng.random() < 0.7 or not copies else \
            copies[rng.integers(len(copies))]
        noise = rng.uniform(0.02, 0.6)
        copies.append(src + noise * np.linalg.norm(src) / np.sqrt(dim) * rng.standard_normal(dim))
    x = np.vstack([base, np.array(copies)])
    perm = rng.permutation(len(x))
    scores = np.round(rng.random(len(x)), 1)  # ten distinct values: many ties, settled by key
    keys = np.array([f"k{rng.integers(10**6):06d}" for _ in range(len(x))])
    return x[perm].astype(np.float32), scores, keys


def _check_margin(x, thresholds, margin=1e-5):
    """The float32 products and the float64 reference decide the same only away from the threshold."""
    u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    sims = (u @ u.T)[np.triu_indices(len(u), 1)]
    for t in thresholds:
        assert np.abs(sims - t).min() > margin, f"resample: a pair lies within {margin} of {t}"


def _assert_matches_reference(result, x, scores, keys, threshold):
    drops, kept = _reference(x, scores, keys, threshold)
    assert result.kept.tolist() == kept
    assert result.dropped.tolist() == sorted(drops)
    u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    for i, j, s in zip(result.dropped, result.duplicate_of, result.similarity):
        ref_j, ref_s = drops[i]
        assert s == pytest.approx(ref_s, abs=1e-5)
        # the pointed row is the most similar kept-before row (another one only on an exact-float tie)
        assert j == ref_j or abs(u[i] @ u[j] - ref_s) < 1e-6
        assert u[i] @ u[j] == pytest.approx(s, abs=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("block_rows", [1, 7, 64, 4096])
def test_dedup_cluster_equals_brute_force_greedy(threshold, block_rows):
    """The blockwise rule is the exact greedy rule, for every block size (1: every pair across
    blocks; 7: several kept tiles; 4096: the whole cluster in one block)."""
    rng = np.random.default_rng(7)
    x, scores, keys = _planted(rng)
    _check_margin(x, [threshold])
    result = dedup_cluster(x, scores, keys, threshold, block_rows=block_rows)
    assert len(result.dropped) > 10  # the set really has duplicates at this threshold
    _assert_matches_reference(result, x, scores, keys, threshold)


@pytest.mark.parametrize("threshold", [0.8, 0.95])
def test_dedup_clusters_is_the_reference_inside_each_cluster(threshold):
    """Over an assignment, each cluster is deduplicated on its own: a pair split across clusters
    stays, whatever its similarity."""
    rng = np.random.default_rng(11)
    x, scores, keys = _planted(rng, rows=300)
    _check_margin(x, [threshold])
    labels = rng.integers(0, 4, len(x))
    result = dedup_clusters(x, scores, keys, labels, SemanticDedupConfig(threshold=threshold,
                                                                        block_rows=16))
    expected_dropped, expected_kept = [], []
    for c in range(4):
        rows = np.flatnonzero(labels == c)
        drops, kept = _reference(x[rows], scores[rows], keys[rows], threshold)
        expected_dropped += [int(rows[i]) for i in drops]
        expected_kept += [int(rows[i]) for i in kept]
    assert result.dropped.tolist() == sorted(expected_dropped)
    assert result.kept.tolist() == sorted(expected_kept)
    assert (labels[result.dropped] == labels[result.duplicate_of]).all()


def test_semantic_dedup_is_fit_assign_and_dedup_composed():
    """The one-process run is the three separate steps the Ray job runs (same sample, same seed)."""
    rng = np.random.default_rng(3)
    x, scores, keys = _planted(rng, rows=400)
    config = SemanticDedupConfig(clusters=5, seed=4, threshold=0.9)
    whole = semantic_dedup(x, scores, keys, config)
    k = resolve_clusters(config, len(x))
    sample = np.sort(np.random.default_rng(4).choice(len(x), fit_sample_size(config, k, len(x)),
                                                     replace=False))
    labels, _ = assign_clusters(x, fit_centroids(x[sample], k, config), batch_rows=33)
    steps = dedup_clusters(x, scores, keys, labels, config)
    for field in ("kept", "dropped", "duplicate_of", "similarity", "invalid"):
        np.testing.assert_array_equal(getattr(whole, field), getattr(steps, field))
    assert len(whole.dropped) > 20


# --- k-means ----------------------------------------------------------------------------------------


def test_kmeans_keeps_separated_groups_apart_and_is_deterministic():
    """Spherical k-means never mixes rows of well-separated directions in one cluster (what dedup
    needs: near copies meet); the same seed gives the same centroids; assignment in batches equals
    assignment at once."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 32))
    truth = rng.integers(0, 6, 600)
    x = (centres[truth] + 0.1 * rng.standard_normal((600, 32))).astype(np.float32)
    config = SemanticDedupConfig(seed=1)
    a = fit_centroids(x, 12, config)
    b = fit_centroids(x, 12, config)
    np.testing.assert_array_equal(a, b)
    # near-identical centroids (a group split in two) are merged: between one and two per group
    assert 6 <= len(a) <= 12 and a.shape[1] == 32 and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    labels, sims = assign_clusters(x, a)
    batched, batched_sims = assign_clusters(x, a, batch_rows=7)
    np.testing.assert_array_equal(labels, batched)
    np.testing.assert_allclose(sims, batched_sims, atol=1e-6)
    # every cluster holds rows of one group only (a group may span several clusters)
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len({c for _, c in pairs}) == len(pairs)
    assert sims.min() > 0.9


def test_centroids_as_alike_as_duplicates_are_merged():
    """Copies of one image (same direction, different norms: their unit vectors differ by rounding)
    draw several k-means centroids; these are merged, so the copies all meet in one cluster."""
    rng = np.random.default_rng(9)
    mass = np.tile(rng.standard_normal(16), (200, 1)) * rng.uniform(0.5, 2, (200, 1))
    others = rng.standard_normal((20, 16))
    x = np.vstack([mass, others]).astype(np.float32)
    centroids = fit_centroids(x, 12, SemanticDedupConfig(seed=2))
    assert len(centroids) < 12
    sims = centroids @ centroids.T
    assert sims[np.triu_indices(len(sims), 1)].max() < 0.95
    labels, _ = assign_clusters(x, centroids)
    assert len(set(labels[:200].tolist())) == 1


def test_auto_clusters_is_about_the_square_root_and_never_above_the_rows():
    assert auto_clusters(10**6) == 1000
    assert auto_clusters(6 * 10**9) == 77460
    assert auto_clusters(0) == auto_clusters(1) == 1
    assert resolve_clusters(SemanticDedupConfig(clusters=50), 10) == 10
    assert resolve_clusters(SemanticDedupConfig(), 10_000) == 100
    assert fit_sample_size(SemanticDedupConfig(sample_per_cluster=256), 100, 10**6) == 25_600
    assert fit_sample_size(SemanticDedupConfig(), 100, 1000) == 1000


def test_oversized_cluster_is_split_and_deduplicated_inside_its_parts():
    """The size guard: a cluster above max_cluster_rows is split by k-means; duplicates inside a part
    are still found, and the parts are each deduplicated exactly."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((8, 16))
    x = np.repeat(centres, 20, axis=0) + rng.standard_normal((160, 16))  # members ~0.5 alike
    twins = x[::4] + 0.005 * rng.standard_normal((40, 16))  # a near copy of every fourth row
    x = np.vstack([x, twins]).astype(np.float32)
    scores = np.r_[np.ones(160), np.zeros(40)]  # the originals win
    keys = np.array([f"r{i:03d}" for i in range(len(x))])
    config = SemanticDedupConfig(max_cluster_rows=60, threshold=0.97)
    result = dedup_bounded_cluster(x, scores, keys, config)
    # every twin lands with its original (they are 0.999 alike) and is dropped for it
    assert result.dropped.tolist() == list(range(160, 200))
    assert result.duplicate_of.tolist() == list(range(0, 160, 4))
    assert len(result.kept) == 160


def test_identical_rows_above_the_size_guard_fall_back_to_one_cluster():
    """One image repeated cannot be split by k-means: all but the best copy are dropped anyway."""
    x = np.tile(np.arange(1, 9, dtype=np.float32), (50, 1))
    scores = np.linspace(0, 1, 50)
    keys = [f"k{i:02d}" for i in range(50)]
    result = dedup_bounded_cluster(x, scores, keys, SemanticDedupConfig(max_cluster_rows=10))
    assert result.kept.tolist() == [49]
    assert (result.duplicate_of == 49).all() and len(result.dropped) == 49


# --- real photos ------------------------------------------------------------------------------------

# Photos bundled with scikit-image (no download). "cat" is the same picture as "chelsea": left out.
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page", "text",
          "clock", "immunohistochemistry", "retina", "colorwheel", "cell", "microaneurysms"]
# Textures: a 3 % crop moves their 16 x 16 thumbnail too much to be near copies under it, so they
# only appear as distinct images, never with variants.
DISTINCT_ONLY = ["hubble_deep_field", "grass", "gravel", "brick"]


def _photo(name):
    from PIL import Image
    from skimage import data

    pixels = getattr(data, name)()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return Image.fromarray(pixels[..., :3].astype(np.uint8))


def _jpeg(image, quality):
    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(image, keep):
    w, h = image.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return image.crop((dx, dy, w - dx, h - dy))


def _variants(image):
    """Near copies a crawl really holds: re-encoded, cropped, colour-shifted, resized."""
    from PIL import Image, ImageEnhance

    return {
        "jpeg30": _jpeg(image, 30),
        "crop97": _crop(image, 0.97),
        "brighter": ImageEnhance.Brightness(image).enhance(1.15),
        "warmer": Image.fromarray(np.clip(np.asarray(image) * [1.06, 1.0, 0.92], 0, 255)
                                  .astype(np.uint8)),
        "crop98_jpeg50": _jpeg(_crop(image, 0.98), 50),
        "resized": image.resize((image.width * 2 // 3, image.height * 2 // 3), Image.BILINEAR),
    }


def _thumbnail_embedding(image):
    """A fixed embedding no one trained: the 16 x 16 colour thumbnail (box filter), each channel's
    mean removed (so a colour cast moves it little)."""
    from PIL import Image

    a = np.asarray(image.convert("RGB").resize((16, 16), Image.BOX), dtype=np.float32)
    return (a - a.mean(axis=(0, 1))).ravel()


@pytest.fixture(scope="module")
def photo_set():
    """(embeddings, keys, group per row, scores): each photo and its variants form a group; textures
    stand alone. The original scores highest in its group, except for "coffee", whose JPEG re-encode
    scores highest (so the original must be the one dropped there)."""
    rng = np.random.default_rng(0)
    embeddings, keys, groups, scores = [], [], [], []
    for name in PHOTOS + DISTINCT_ONLY:
        image = _photo(name)
        members = {"original": image} | ({} if name in DISTINCT_ONLY else _variants(image))
        for kind, member in members.items():
            if kind != "original":
                assert np.asarray(member).shape != np.asarray(image).shape or \
                    not np.array_equal(np.asarray(member), np.asarray(image))
            embeddings.append(_thumbnail_embedding(member))
            keys.append(f"{name}/{kind}")
            groups.append(name)
            scores.append(0.9 if kind == "original" else 0.3 + 0.5 * rng.random())
    scores[keys.index("coffee/jpeg30")] = 0.95
    order = rng.permutation(len(keys))  # nothing may depend on the input order
    take = lambda a: np.asarray(a)[order]
    return take(np.array(embeddings)), take(keys), take(groups), take(scores)


@pytest.mark.parametrize("clusters", [1, 0])
def test_planted_photo_variants_are_found_and_no_distinct_photo_is_dropped(photo_set, clusters):
    """Among real photos, every re-encoded, cropped, colour-shifted or resized copy is dropped for a
    member of its own group, exactly one image per group survives (the best-scored one), and no
    distinct photo is dropped; with one cluster and with the automatic K."""
    x, keys, groups, scores = photo_set
    result = semantic_dedup(x, scores, keys, SemanticDedupConfig(clusters=clusters))
    assert (groups[result.dropped] == groups[result.duplicate_of]).all()
    assert (result.similarity >= 0.95).all()
    kept_groups = groups[result.kept]
    assert sorted(kept_groups) == sorted(set(groups))  # one survivor per group, none lost
    for name in PHOTOS + DISTINCT_ONLY:
        rows = np.flatnonzero(groups == name)
        best = rows[np.argmax(scores[rows])]
        assert keys[result.kept[kept_groups == name][0]] == keys[best]
    assert "coffee/jpeg30" in keys[result.kept] and "coffee/original" in keys[result.dropped]
    assert len(result.dropped) == len(PHOTOS) * 6
    ledger = result.ledger(keys)
    assert set(ledger["reason"]) == {DROP_REASON}
    at = ledger["key"].index("coffee/original")
    assert ledger["duplicate_of"][at] == "coffee/jpeg30"
    assert ledger["detail"][at].startswith("cosine 0.9") and "coffee/jpeg30" in ledger["detail"][at]


# --- edge cases -------------------------------------------------------------------------------------


def test_empty_input_gives_an_empty_result():
    empty = np.zeros((0, 8), dtype=np.float32)
    for result in (semantic_dedup(empty, [], []), dedup_cluster(empty, [], [], 0.9)):
        assert all(len(getattr(result, f)) == 0 for f in ("kept", "dropped", "duplicate_of",
                                                           "similarity", "invalid"))
    labels, sims = assign_clusters(empty, np.eye(8, dtype=np.float32))
    assert labels.shape == sims.shape == (0,)
    assert SemanticDedupResult.empty().ledger([])["key"] == []


def test_one_row_is_kept():
    result = semantic_dedup(np.ones((1, 4)), [0.5], ["only"])
    assert result.kept.tolist() == [0] and len(result.dropped) == 0


def test_all_identical_rows_keep_the_best_scored_one_and_ties_go_to_the_smaller_key():
    x = np.tile(np.array([[0.3, -1.0, 2.0, 0.5]], dtype=np.float32), (30, 1)) * \
        np.linspace(1, 3, 30)[:, None].astype(np.float32)  # same direction, different norms
    scores = np.full(30, 0.5)
    keys = np.array([f"k{i:02d}" for i in range(30)])[::-1]  # row 29 has the smallest key
    result = semantic_dedup(x, scores, keys)
    assert result.kept.tolist() == [29]
    assert (result.duplicate_of == 29).all() and len(result.dropped) == 29
    np.testing.assert_allclose(result.similarity, 1.0, atol=1e-6)
    scores[3] = 0.9  # a better score beats the key
    assert semantic_dedup(x, scores, keys).kept.tolist() == [3]


def test_nan_inf_and_zero_embeddings_are_kept_counted_and_never_compared():
    """A row without a direction (NaN, inf or zero vector) is kept and reported as invalid, never
    dropped and never the reason another row is dropped; the valid rows are deduplicated as usual.
    A fit with no valid row at all is an error."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 6)).astype(np.float32)
    x[1] = x[0] * 1.01  # a duplicate of row 0
    x[2] = 0.0
    x[3, 4] = np.nan
    x[4, 0] = np.inf
    x[5] = x[0]
    x[5, 2] = np.nan  # a copy of row 0 with a NaN: invalid, not a duplicate
    scores = np.linspace(1, 0, 12)
    keys = [f"k{i}" for i in range(12)]
    for result in (semantic_dedup(x, scores, keys, SemanticDedupConfig(clusters=2)),
                   dedup_cluster(x, scores, keys, 0.95)):
        assert result.invalid.tolist() == [2, 3, 4, 5]
        assert result.dropped.tolist() == [1] and result.duplicate_of.tolist() == [0]
        assert set(result.kept.tolist()) == set(range(12)) - {1}
    unit, valid = unit_rows(x)
    assert valid.tolist() == [True, True] + [False] * 4 + [True] * 6
    assert np.isfinite(unit).all()
    labels, sims = assign_clusters(x, fit_centroids(x, 3))
    assert (labels[2:6] == -1).all() and np.isnan(sims[2:6]).all() and (labels[6:] >= 0).all()
    with pytest.raises(ValueError, match="no finite, non-zero embedding"):
        fit_centroids(x[2:6], 2)
    all_bad = semantic_dedup(x[2:6], scores[2:6], keys[2:6])
    assert all_bad.invalid.tolist() == all_bad.kept.tolist() == [0, 1, 2, 3]


def test_nan_score_is_kept_last():
    x = np.ones((3, 4), dtype=np.float32)
    result = dedup_cluster(x, [np.nan, 0.1, 0.2], ["a", "b", "c"], 0.9)
    assert result.kept.tolist() == [2]
    assert result.dropped.tolist() == [0, 1]


@pytest.mark.parametrize("bad", [{"threshold": 1.0}, {"threshold": 0.0}, {"clusters": -1},
                                 {"kmeans_iterations": 0}, {"max_cluster_rows": 2},
                                 {"block_rows": 0}, {"sample_per_cluster": 0}])
def test_config_rejects_values_that_cannot_work(bad):
    with pytest.raises(ValueError):
        SemanticDedupConfig(**bad)


def test_mismatched_inputs_are_refused():
    x = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="one entry per row"):
        dedup_cluster(x, [1.0, 2.0], ["a", "b", "c"], 0.9)
    with pytest.raises(ValueError, match=r"\(rows, dim\)"):
        dedup_cluster(np.ones(4), [1.0], ["a"], 0.9)
    with pytest.raises(ValueError, match="one entry per row"):
        dedup_clusters(x, [1, 2, 3], ["a", "b", "c"], [0, 0], SemanticDedupConfig())
