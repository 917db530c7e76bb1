"""``vlp dedup semantic``: SemDeDup over a shard folder (or a view of one) on Ray Data, from the image
embeddings a scoring run stored (``vlp score --set embeddings=true``).

1. one task per shard reads the sidecar's ``image_embedding`` and ``clip_score`` (only a view's
   selected rows) and flags a seeded random sample;
2. k-means centroids are fitted on the sample (``vlp.curation.semantic_dedup.fit_centroids``);
3. every row is assigned its nearest centroid (batches, in parallel);
4. Ray Data groups the rows by cluster and each group is deduplicated as one task
   (``dedup_bounded_cluster``: within the cluster, a row whose cosine to a kept row is at least the
   threshold is dropped; the row with the best ``clip_score`` is kept);
5. the driver writes a view of the kept rows (``vlp.scoring.select.write_view``) and the drop ledger
   ``_drops/semantic.parquet``: each dropped row with reason ``duplicate_semantic``, the kept row it
   duplicates and their cosine.

Nothing is rewritten: the output is a view, which every reader of shard folders takes.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines.ray_runtime import ensure_ray
from vlp.config import ConfigError
from vlp.curation.semantic_dedup import (DROP_REASON, SemanticDedupConfig, SemanticDedupResult,
                                         assign_clusters, dedup_bounded_cluster, fit_centroids,
                                         fit_sample_size, resolve_clusters)
from vlp.data.schema import STATUS_COMPLETE
from vlp.data.shards import ShardFolder, load_selection, read_shard
from vlp.data.storage import Storage, join
from vlp.scoring.select import SelectedShard, check_empty_output, count_values, write_view
from vlp.scoring.sidecar import MANIFEST, read_json, scores_folder

LEDGER = "_drops/semantic.parquet"


def read_embeddings(reads: pa.Table, *, storage: Storage, sample_fraction: float, seed: int):
    """Ray Data task: one shard's sidecar rows (a view's selected ones) as
    ``shard, row, key, score, embedding, in_sample``."""
    for read in reads.to_pylist():
        with storage.open_input(read["sidecar"]) as f:
            table = pq.read_table(pa.BufferReader(f.read()),
                                  columns=["key", "clip_score", "image_embedding"])
        rows = (load_selection(read["selection"], storage) if read["selection"]
                else np.arange(table.num_rows, dtype=np.int64))
        table = table.take(pa.array(rows))
        embedding = np.asarray(table.column("image_embedding").to_pylist(), dtype=np.float32)
        scores = table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float32)
        rng = np.random.default_rng([seed, read["index"]])
        yield {"shard": np.full(len(rows), read["index"], dtype=np.int64), "row": rows,
               "key": np.asarray(table.column("key").to_pylist(), dtype=object),
               "score": np.nan_to_num(scores, nan=-np.inf).astype(np.float32),
               "embedding": embedding.reshape(len(rows), -1),
               "in_sample": rng.random(len(rows)) < sample_fraction}


def assign(batch: dict, *, centroids: np.ndarray) -> dict:
    cluster, _ = assign_clusters(batch["embedding"], centroids)
    return {**{k: v for k, v in batch.items() if k != "in_sample"}, "cluster": cluster}


def dedup_group(group: dict, *, config: SemanticDedupConfig) -> dict:
    """One cluster's rows -> each row's verdict: kept, or the key it duplicates and their cosine."""
    n = len(group["row"])
    keys = group["key"]
    kept = np.ones(n, dtype=bool)
    duplicate_of = np.full(n, None, dtype=object)
    similarity = np.full(n, np.nan, dtype=np.float32)
    if n and group["cluster"][0] >= 0:  # -1: no valid embedding, kept and never compared
        result: SemanticDedupResult = dedup_bounded_cluster(group["embedding"], group["score"],
                                                            keys, config)
        kept[result.dropped] = False
        duplicate_of[result.dropped] = keys[result.duplicate_of]
        similarity[result.dropped] = result.similarity
    return {"shard": group["shard"], "row": group["row"], "key": keys, "kept": kept,
            "duplicate_of": duplicate_of, "similarity": similarity}


def _scores_manifest(source: ShardFolder, name: str, storage: Storage) -> dict:
    manifest = read_json(storage, join(scores_folder(source.uri, name), MANIFEST))
    if manifest is None:
        raise ConfigError(f"no scores named {name!r} in {source.uri}: run `vlp score --shards "
                          f"{source.uri} --model M --name {name} --set embeddings=true` first")
    if manifest.get("status") != STATUS_COMPLETE:
        raise ConfigError(f"the scores {name!r} are not complete: finish them with --resume")
    if not manifest["settings"].get("embeddings"):
        raise ConfigError(f"the scores {name!r} hold no embeddings: score again with "
                          "`--set embeddings=true`")
    if manifest.get("shards_manifest_sha256") != source.manifest_sha256:
        raise ConfigError(f"the scores {name!r} were computed on {source.uri} before it changed: "
                          "score again")
    return manifest


def run_semantic_dedup(shards: str, scores: str, output: str, config: SemanticDedupConfig, *,
                       ray_address: str = "", stream=None) -> dict:
    """Deduplicate ``shards`` (a folder or a view) by the embeddings of the scores ``scores`` into the
    view ``output``; returns its statistics."""
    started = time.monotonic()
    stream = stream or sys.stderr  # looked up per call, not at import (captured streams close)
    storage = Storage()
    folder = ShardFolder.open(shards, storage).require_rows("to deduplicate")
    source = ShardFolder.open(folder.source_uri, storage) if folder.view is not None else folder
    manifest = _scores_manifest(source, scores, storage)
    check_empty_output(output, storage)
    names = [s.path.rsplit("/", 1)[-1] for s in folder.shards]
    clusters = resolve_clusters(config, folder.rows)
    sample_fraction = min(1.0, fit_sample_size(config, clusters, folder.rows) / folder.rows)
    reads = [{"index": i, "sidecar": join(scores_folder(source.uri, scores), name),
              "selection": shard.selection} for i, (name, shard) in enumerate(zip(names, folder.shards))]
    print(f"[dedup] {folder.rows:,} rows of {shards}: k-means into {clusters:,} clusters, then "
          f"cosine >= {config.threshold} within each", file=stream, flush=True)
    started_ray = ensure_ray(ray_address, dashboard=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        rows = ray.data.from_items(reads, override_num_blocks=len(reads)).map_batches(
            read_embeddings, batch_size=1, batch_format="pyarrow",
            fn_kwargs=dict(storage=storage, sample_fraction=sample_fraction, seed=config.seed)
        ).materialize()
        sample = np.concatenate([b["embedding"] for b in rows.filter(
            lambda r: r["in_sample"]).select_columns(["embedding"]).iter_batches(batch_format="numpy")]
                                or [np.zeros((0, 1), np.float32)])
        centroids = fit_centroids(sample, clusters, config)
        verdicts = rows.map_batches(assign, batch_format="numpy",
                                    fn_kwargs={"centroids": centroids}).groupby("cluster").map_groups(
            dedup_group, batch_format="numpy", fn_kwargs={"config": config})
        kept_rows: dict[int, list] = {}
        ledger = {"key": [], "shard": [], "row": [], "duplicate_of": [], "similarity": []}
        for batch in verdicts.iter_batches(batch_format="numpy", batch_size=65536):
            for shard, row, kept in zip(batch["shard"], batch["row"], batch["kept"]):
                if kept:
                    kept_rows.setdefault(int(shard), []).append(int(row))
            dropped = ~batch["kept"]
            ledger["key"] += batch["key"][dropped].tolist()
            ledger["shard"] += [names[i] for i in batch["shard"][dropped]]
            ledger["row"] += batch["row"][dropped].tolist()
            ledger["duplicate_of"] += batch["duplicate_of"][dropped].tolist()
            ledger["similarity"] += batch["similarity"][dropped].tolist()
    finally:
        if started_ray:
            ray.shutdown()
    by_name = dict(zip(names, range(len(names))))
    chosen = []
    for shard in source.shards:
        name = shard.path.rsplit("/", 1)[-1]
        rows_here = np.sort(np.asarray(kept_rows.get(by_name.get(name, -1), []), dtype=np.int64))
        langs = np.asarray([v for b in read_shard(shard, storage, ["lang"], batch_size=65536)
                            for v in b.column("lang").to_pylist()], dtype=object)
        considered = (load_selection(folder.shards[by_name[name]].selection, storage)
                      if name in by_name and folder.shards[by_name[name]].selection else
                      (np.arange(len(langs)) if name in by_name else np.zeros(0, np.int64)))
        chosen.append(SelectedShard(name=name, rows_in=len(considered), rows=rows_here,
                                    langs_in=count_values(langs[considered]),
                                    langs_kept=count_values(langs[rows_here])))
    how = {"dedup": {"method": "semantic", "input": shards, "scores": scores,
                     "model": manifest["model"], "threshold": config.threshold, "clusters": clusters,
                     "ledger": LEDGER}}
    order = np.lexsort((ledger["row"], ledger["shard"]))
    table = pa.table({"key": pa.array(ledger["key"], pa.string()),
                      "reason": pa.array([DROP_REASON] * len(order), pa.string()),
                      "detail": pa.array([f"cosine {s:.4f} to kept {k}" for s, k in
                                          zip(ledger["similarity"], ledger["duplicate_of"])], pa.string()),
                      "duplicate_of": pa.array(ledger["duplicate_of"], pa.string()),
                      "similarity": pa.array(ledger["similarity"], pa.float32()),
                      "shard": pa.array(ledger["shard"], pa.string()),
                      "row": pa.array(ledger["row"], pa.int64())}).take(pa.array(order, pa.int64()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes_atomic(join(output, LEDGER), sink.getvalue())
    stats = write_view(source, chosen, how, output, storage, check_empty=False)
    stats.update(dropped=table.num_rows, clusters=clusters,
                 elapsed_s=round(time.monotonic() - started, 3))
    storage.write_bytes_atomic(join(output, "_stats.json"), json.dumps(stats, indent=2).encode())
    print(f"[dedup] kept {stats['rows_kept']:,} of {stats['rows_in']:,} rows; "
          f"{stats['dropped']:,} semantic duplicates in {output}/{LEDGER}; view {output}",
          file=stream, flush=True)
    return stats
