"""Benchmark: semantic dedup (``vlp.curation.semantic_dedup``) at 10^5 and 10^6 embeddings, and a
projection to 6 x 10^9.

    python benchmarks/bench_semantic_dedup.py [--rows 100000 1000000] [--cluster-rows N]
                                              [--threads 1] [--quick]

Each size runs in its own subprocess (so one size's peak memory does not hide the next one's) on
generated, clustered data: ``--centres`` (10^4) random unit directions in ``--dim`` (512) float32
dimensions; each row is a centre plus Gaussian noise of the same norm (rows of one centre are about
0.5 alike, far from any duplicate threshold); then ``--planted`` (10 %) of the rows are replaced by
near copies of other rows (noise 0.05-0.3 of their norm: cosine >= 0.98) and 1 % by exact copies.
Scores are uniform random, keys ``r%09d``.

The three steps are timed separately, as the Ray job runs them (wall and process CPU seconds, peak
RSS sampled every 10 ms and its rise over the RSS at the step's start):

- **fit**: ``fit_centroids`` on ``fit_sample_size`` sampled rows, K = ``auto_clusters(N)``;
- **assign**: ``assign_clusters`` over all rows (streaming batches);
- **dedup**: ``dedup_clusters`` (grouping by cluster and ``dedup_bounded_cluster`` per cluster).

BLAS and faiss run ``--threads`` threads (default 1: per-core rates, and the 2-core machine is shared).
Rates: fit and assign in GFLOP/s of their matrix products (2 x rows x K x dim per pass), dedup in
pairs per second where pairs = sum over clusters of n(n-1)/2 (the all-kept bound of the exact rule).
The quality lines say how many planted copies were caught and how many planted pairs k-means put in
different clusters (the only misses SemDeDup allows).

Results: a table on stdout and ``benchmarks/results/semantic_dedup.json`` (``--quick``:
``semantic_dedup_quick.json``, 2 x 10^4 rows only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.measure import load_psutil
from benchmarks.provenance import cpu_model, git_head

# The projection's target and the node it is sized for.
TARGET_ROWS = 6 * 10**9
NODE_CORES = 32
NODE_GIB = 128


class PhaseMemory:
    """Peak RSS of this process while a step runs (a 10 ms sampler thread)."""

    def __init__(self):
        self.proc = load_psutil().Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def timed(name, out, fn):
    with PhaseMemory() as mem:
        wall, cpu = time.perf_counter(), time.process_time()
        value = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                 "peak_rss_mb": round(mem.peak / 2**20),
                 "rise_mb": round((mem.peak - mem.start) / 2**20)}
    print(f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {mem.peak / 2**20:.0f} MB "
          f"(+{(mem.peak - mem.start) / 2**20:.0f})", flush=True)
    return value


def generate(rows, dim, centres, planted, seed):
    """(embeddings float32, scores, keys, planted copy -> source) with ``planted`` near copies."""
    import numpy as np

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = np.empty((rows, dim), dtype=np.float32)
    chunk = 1 << 16
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        x[s:s + n] = c[rng.integers(centres, size=n)]
        x[s:s + n] += rng.standard_normal((n, dim), dtype=np.float32) / np.float32(math.sqrt(dim))
    n_near, n_exact = int(rows * planted), int(rows * planted / 10)
    copies = rng.choice(rows, n_near + n_exact, replace=False)
    originals = np.setdiff1d(np.arange(rows), copies)
    sources = rng.choice(originals, len(copies))
    for s in range(0, len(copies), chunk):
        cp, src = copies[s:s + chunk], sources[s:s + chunk]
        eps = rng.uniform(0.05, 0.3, len(cp)).astype(np.float32)
        eps[np.arange(s, s + len(cp)) >= n_near] = 0  # the last n_exact copies are exact
        noise = rng.standard_normal((len(cp), dim), dtype=np.float32)
        noise *= (eps * np.linalg.norm(x[src], axis=1) / math.sqrt(dim))[:, None]
        x[cp] = x[src] + noise
    scores = rng.random(rows)
    keys = np.char.add("r", np.char.zfill(np.arange(rows).astype(str), 9))
    return x, scores, keys, copies, sources


def child(args) -> dict:
    """One size, in this process: generate, then fit, assign, dedup."""
    import faiss
    import numpy as np
    from threadpoolctl import threadpool_limits

    from vlp.curation.semantic_dedup import (
        SemanticDedupConfig,
        assign_clusters,
        auto_clusters,
        dedup_clusters,
        fit_centroids,
        fit_sample_size,
    )

    faiss.omp_set_num_threads(args.threads)
    threadpool_limits(args.threads)
    n, dim = args.rows[0], args.dim
    out: dict = {"rows": n, "dim": dim, "threads": args.threads}
    x, scores, keys, copies, sources = timed(
        "generate", out, lambda: generate(n, dim, args.centres, args.planted, args.seed))
    config = SemanticDedupConfig(seed=args.seed)
    k = auto_clusters(n)
    sample_rows = fit_sample_size(config, k, n)
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(n, sample_rows, replace=False))
    centroids = timed("fit", out, lambda: fit_centroids(x[sample], k, config))

    labels, _ = timed("assign", out, lambda: assign_clusters(x, centroids))
    result = timed("dedup", out, lambda: dedup_clusters(x, scores, keys, labels, config))
    sizes = np.bincount(labels[labels >= 0])
    sizes = sizes[sizes > 0]
    pairs = float((sizes.astype(np.float64) * (sizes - 1) / 2).sum())
    caught = np.isin(copies, result.dropped) | np.isin(sources, result.dropped)
    split = labels[copies] != labels[sources]
    planted = np.zeros(n, dtype=bool)
    planted[copies] = True
    out.update({
        "clusters_asked": k, "clusters": len(centroids), "fit_sample_rows": sample_rows,
        "kmeans_iterations": config.kmeans_iterations,
        "cluster_rows": {"mean": round(float(sizes.mean()), 1), "max": int(sizes.max()),
                         "p99": int(np.percentile(sizes, 99))},
        # sum n_c^2 against N^2 / K: how much k-means' uneven sizes cost the dedup step
        "imbalance": round(float((sizes.astype(np.float64) ** 2).sum() * len(sizes) / n**2), 3),
        "pairs": pairs,
        "dropped": len(result.dropped), "planted_copies": len(copies),
        "planted_caught": int(caught.sum()), "planted_split_across_clusters": int(split.sum()),
        # an original dropped for its own copy (the copy scored higher) is right; any other drop of a
        # row that is neither a copy nor a copy's source is a false positive
        "dropped_not_planted": int((~planted[result.dropped]).sum()),
        "dropped_unrelated": int((~planted[result.dropped] & ~np.isin(result.dropped, sources)).sum()),
    })
    fit_flops = 2.0 * config.kmeans_iterations * sample_rows * k * dim
    out["fit"]["gflops_per_cpu_s"] = round(fit_flops / out["fit"]["cpu_s"] / 1e9, 1)
    assign_flops = 2.0 * n * len(centroids) * dim
    out["assign"]["gflops_per_cpu_s"] = round(assign_flops / out["assign"]["cpu_s"] / 1e9, 1)
    out["assign"]["rows_per_cpu_s"] = round(n / out["assign"]["cpu_s"])
    out["dedup"]["pairs_per_cpu_s"] = round(pairs / out["dedup"]["cpu_s"])
    out["dedup"]["rows_per_cpu_s"] = round(n / out["dedup"]["cpu_s"])
    return out


def one_cluster(args) -> dict:
    """``dedup_cluster`` on one cluster of the size a 6 x 10^9 run has on average (about 77,000 rows):
    the pair rate of large matrix products, which the 10^6 run's ~1,000-row clusters understate."""
    from threadpoolctl import threadpool_limits

    from vlp.curation.semantic_dedup import SemanticDedupConfig, dedup_cluster

    threadpool_limits(args.threads)
    n, dim = args.rows[0], args.dim
    out: dict = {"rows": n, "dim": dim, "threads": args.threads}
    # a k-means cell holds a few hundred nearby modes: 100 centres, same noise and planted copies
    x, scores, keys, copies, _ = timed("generate", out, lambda: generate(n, dim, 100, args.planted,
                                                                        args.seed))
    config = SemanticDedupConfig()
    result = timed("dedup", out, lambda: dedup_cluster(x, scores, keys, config.threshold,
                                                       config.block_rows))
    pairs = n * (n - 1) / 2
    out.update({"pairs": pairs, "dropped": len(result.dropped),
                "planted_copies": len(copies)})
    out["dedup"]["pairs_per_cpu_s"] = round(pairs / out["dedup"]["cpu_s"])
    out["dedup"]["rows_per_cpu_s"] = round(n / out["dedup"]["cpu_s"])
    return out


def projection(largest: dict, cluster: dict | None) -> dict:
    """6 x 10^9 rows at the per-core rates measured: fit and assign from the largest run, dedup from
    the one-cluster run at the projected cluster size (or the largest run's when there is none)."""
    from vlp.curation.semantic_dedup import SemanticDedupConfig, auto_clusters

    config = SemanticDedupConfig()
    n, dim = TARGET_ROWS, largest["dim"]
    k = auto_clusters(n)
    sample = k * config.sample_per_cluster
    fit_flops = 2.0 * config.kmeans_iterations * sample * k * dim
    assign_flops = 2.0 * n * k * dim
    pairs = n * n / k / 2 * largest["imbalance"]
    fit_core_h = fit_flops / (largest["fit"]["gflops_per_cpu_s"] * 1e9) / 3600
    assign_core_h = assign_flops / (largest["assign"]["gflops_per_cpu_s"] * 1e9) / 3600
    pair_rate = (cluster or largest)["dedup"]["pairs_per_cpu_s"]
    dedup_core_h = pairs / pair_rate / 3600
    mean_cluster = n / k
    row_bytes = dim * 4
    nodes = 100
    return {
        "rows": n, "dim": dim, "clusters": k, "mean_cluster_rows": round(mean_cluster),
        "imbalance": largest["imbalance"], "pairs": pairs, "pairs_per_cpu_s": pair_rate,
        "fit_sample_rows": sample, "fit_sample_gb": round(sample * row_bytes / 1e9, 1),
        "fit_core_hours": round(fit_core_h), "fit_hours_one_node": round(fit_core_h / NODE_CORES, 1),
        "assign_core_hours": round(assign_core_h), "dedup_core_hours": round(dedup_core_h),
        "assign_task_mb": round((k * row_bytes + (1 << 24) * 4) / 2**20),
        "dedup_task_mb_mean": round(2 * mean_cluster * row_bytes / 2**20 + 7 * 2048**2 * 4 / 2**20),
        "dedup_task_mb_max": round(2 * config.max_cluster_rows * row_bytes / 2**20
                                   + 7 * 2048**2 * 4 / 2**20),
        "shuffle_tb": round(n * (row_bytes + 32) / 1e12, 1),
        "nodes": nodes, "node_cores": NODE_CORES, "node_gib": NODE_GIB,
        "assign_plus_dedup_hours": round((assign_core_h + dedup_core_h) / (nodes * NODE_CORES), 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--centres", type=int, default=10_000)
    ap.add_argument("--planted", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 x 10^4 rows only (smoke test)")
    ap.add_argument("--output", default=None)
    ap.add_argument("--cluster-rows", type=int, default=None,
                    help="rows of the one-cluster run (default: the projection's mean cluster; "
                         "0: none)")
    ap.add_argument("--child", choices=["run", "cluster"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(args) if args.child == "run" else one_cluster(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.quick:
        args.rows = [20_000]
        args.cluster_rows = 5_000 if args.cluster_rows is None else args.cluster_rows
    if args.cluster_rows is None:
        from vlp.curation.semantic_dedup import auto_clusters

        args.cluster_rows = round(TARGET_ROWS / auto_clusters(TARGET_ROWS))
    output = args.output or os.path.join(
        REPO, "benchmarks", "results",
        "semantic_dedup_quick.json" if args.quick else "semantic_dedup.json")

    def run_child(mode, rows):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--rows", str(rows),
               "--dim", str(args.dim), "--centres", str(args.centres), "--planted", str(args.planted),
               "--threads", str(args.threads), "--seed", str(args.seed)]
        done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
        lines = done.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith("RESULT ")), flush=True)
        return json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])

    runs = []
    for rows in args.rows:
        print(f"N = {rows:,}", flush=True)
        runs.append(run_child("run", rows))
    cluster = None
    if args.cluster_rows:
        print(f"one cluster of {args.cluster_rows:,} rows", flush=True)
        cluster = run_child("cluster", args.cluster_rows)
    report = {
        "date": _dt.date.today().isoformat(), "commit": git_head(), "cpu": cpu_model(),
        "cores": os.cpu_count(), "load_average": os.getloadavg(), "runs": runs,
        "one_cluster": cluster, "projection": projection(runs[-1], cluster),
    }
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=1)
    print()
    print("| N | K | fit s (CPU) | fit GF/s | assign s | assign GF/s | dedup s | dedup Mpairs/s | "
          "peak RSS fit / assign / dedup MB | dropped | planted caught / split |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in runs:
        print(f"| {r['rows']:,} | {r['clusters']:,} | {r['fit']['cpu_s']:.1f} | "
              f"{r['fit']['gflops_per_cpu_s']} | {r['assign']['cpu_s']:.1f} | "
              f"{r['assign']['gflops_per_cpu_s']} | {r['dedup']['cpu_s']:.1f} | "
              f"{r['dedup']['pairs_per_cpu_s'] / 1e6:.0f} | {r['fit']['peak_rss_mb']} / "
              f"{r['assign']['peak_rss_mb']} / {r['dedup']['peak_rss_mb']} | {r['dropped']:,} | "
              f"{r['planted_caught']:,} of {r['planted_copies']:,} / "
              f"{r['planted_split_across_clusters']:,} |")
    if cluster:
        print(f"\none cluster of {cluster['rows']:,} rows: {cluster['dedup']['cpu_s']:.1f} s CPU, "
              f"{cluster['dedup']['pairs_per_cpu_s'] / 1e6:.0f} Mpairs/s, peak RSS "
              f"{cluster['dedup']['peak_rss_mb']} MB (+{cluster['dedup']['rise_mb']}), "
              f"{cluster['dropped']:,} dropped")
    print()
    print("projection:", json.dumps(report["projection"], indent=1))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
