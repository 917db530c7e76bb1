"""Where the CPU of ``vlp curate images`` goes: per-process CPU over the steady state, per image.

    python benchmarks/profile_curate.py [--corpus web|synthetic] [--rows 10000] [--set KEY=VALUE ...]
                                        [--no-loop] [--py-spy DIR] [--decode]

Runs our job exactly as ``bench_curate_images.py`` does (URL input from the same local HTTP server,
the same inputs, cached under ``.bench/data/``), samples every process of its tree every 0.5 s, and
reports, over the steady state (from 3 s after the first rows to the last progress line), the CPU
milliseconds per image that each kind of process spends: the processor actors, Ray Data's
read/write tasks, the dedup actor, the driver, Ray's daemons. Next to it, the CPU per image of the
bare loop of our per-row code (fetch, decode, resize, hashes, encode; no Ray) on the same URLs: the
difference is what orchestration costs. ``--py-spy DIR`` also records every process with py-spy
(collapsed stacks, ``ours.folded.txt``: a flame graph's input), to see which Python lines the
difference is. ``--decode`` only measures what decoding the corpus's JPEGs costs, by decoder,
baseline and progressive JPEGs apart.

Not a target and not in the README's tables by itself: it tells where to look.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_curate_images as bench
from measure import PROCESSED, TreeSampler, load_psutil, process_tree


def _kind(cmdline: str) -> str:
    """A process's role from its title (Ray renames workers ``ray::<task or actor>``)."""
    if cmdline.startswith("ray::"):
        title = cmdline.split()[0][5:]
        title = re.sub(r"\(.*", "", title)
        return f"ray::{title.split('.')[0]}"
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py",
                   "runtime_env/agent", "ray_client_server", "plasma_store"):
        if daemon in cmdline:
            return daemon
    if "bench_curate_images.py _worker ours" in cmdline:
        return "driver"
    return cmdline[:50] or "?"


class CpuSampler(TreeSampler):
    """Cumulative CPU per process of a tree, kept per sample; each process keyed by (pid, create
    time), with the title it carried most often."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        super().__init__(pid, interval_s)
        self.snapshots: list[tuple[float, dict]] = []  # (t, {key: cpu_s})
        self.titles: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)

    def _sample(self):
        psutil = load_psutil()
        now, cpu = time.monotonic(), {}
        for p in process_tree(self.pid):
            try:
                with p.oneshot():
                    key = (p.pid, p.create_time())
                    t = p.cpu_times()
                    cpu[key] = t.user + t.system
                    self.titles[key][_kind(" ".join(p.cmdline()))] += 1
            except psutil.Error:
                pass
        self.snapshots.append((now, cpu))

    def at(self, t: float | None) -> dict:
        """Each process's CPU seconds as last sampled at or before ``t`` (None: the end); a process
        that exited keeps its last value, one not born yet is absent."""
        seen: dict = {}
        for when, cpu in self.snapshots:
            if t is not None and when > t:
                break
            seen.update(cpu)
        return seen

    def between(self, t0: float | None, t1: float | None) -> dict[str, float]:
        """CPU seconds by kind of process between ``t0`` and ``t1`` (None: the start, the end)."""
        first = {} if t0 is None else self.at(t0)
        last = self.at(t1)
        out: dict[str, float] = collections.defaultdict(float)
        for key, cpu in last.items():
            out[self.titles[key].most_common(1)[0][0]] += cpu - first.get(key, 0.0)
        return dict(out)


def decode_costs(root: str, manifest: str, count: int = 400, size: int = bench.SIZE) -> list[str]:
    """CPU per JPEG of the corpus's first ``count`` files, baseline and progressive apart: our
    decoder (simplejpeg at Pillow's draft scale for ``size``), simplejpeg at full size and OpenCV's
    ``imdecode`` (what img2dataset does), each single-threaded. Markdown rows."""
    import io

    import cv2
    import numpy as np
    import simplejpeg
    from PIL import Image

    cv2.setNumThreads(1)
    with open(manifest, encoding="utf-8") as f:
        paths = [json.loads(line)["path"] for line in f][:count]
    blobs = []
    for path in paths:
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
        info = Image.open(io.BytesIO(data)).info
        blobs.append((data, bool(info.get("progressive") or info.get("progression"))))

    def draft(data):
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        k = next(k for k in (8, 4, 2, 1) if min(w, h) // k >= size)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=k, min_width=-(-w // k),
                                      min_height=-(-h // k))

    decoders = {"simplejpeg at draft scale (ours)": draft,
                "simplejpeg, full size": lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"),
                "OpenCV imdecode, full size (img2dataset)":
                    lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)}
    rows = ["| decoder | baseline ms | progressive ms | corpus mean ms |", "|---|---:|---:|---:|"]
    for name, decode in decoders.items():
        cost = {}
        for progressive in (False, True):
            chosen = [d for d, p in blobs if p == progressive]
            c0 = time.process_time()
            for data in chosen:
                decode(data)
            cost[progressive] = 1e3 * (time.process_time() - c0) / max(1, len(chosen))
        share = sum(p for _, p in blobs) / len(blobs)
        rows.append(f"| {name} | {cost[False]:.2f} | {cost[True]:.2f} | "
                    f"{(1 - share) * cost[False] + share * cost[True]:.2f} |")
    rows.append(f"\n{len(blobs)} files, {sum(p for _, p in blobs)} progressive")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=("synthetic", "web"), default="web")
    ap.add_argument("--rows", type=int, default=10_000, help="images in the run (default 10,000)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a curation config override for our run (repeatable)")
    ap.add_argument("--no-loop", dest="loop", action="store_false",
                    help="skip the bare loop of our per-row code")
    ap.add_argument("--decode", action="store_true",
                    help="only measure what decoding the corpus's JPEGs costs, by decoder")
    ap.add_argument("--py-spy", default="", metavar="DIR",
                    help="also record every process with py-spy (collapsed stacks in DIR)")
    args = ap.parse_args(argv)
    base = min(2000, args.rows)
    data = bench.prepare_data(base, max(1, args.rows // base), args.corpus)
    if args.decode:
        print("\n".join(decode_costs(data["root"], data["small"])))
        return 0
    work = os.path.join(bench.BENCH_DIR, "work", "profile_curate")
    os.makedirs(work, exist_ok=True)
    psutil = load_psutil()
    with bench.HttpServer(data["root"]) as server:
        manifest = bench.write_url_manifest(data, server.port, os.path.join(work, "urls.jsonl"), "large")
        loop = bench.run_loop(manifest, "our_core", work, "loop_our_core") if args.loop else None
        loop_ms = 1e3 * loop["loop_cpu_s"] / loop["images"] if loop else float("nan")
        out_dir, out_json = os.path.join(work, "out"), os.path.join(work, "ours.json")
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, bench.__file__, "_worker", "ours", manifest, out_dir, out_json,
               *bench._ours_overrides(args.workers, 0.5), *args.overrides]
        if args.py_spy:
            os.makedirs(args.py_spy, exist_ok=True)
            # collapsed stacks, one line per stack with its process at the root: grep-able
            cmd = ["py-spy", "record", "--subprocesses", "--rate", "50", "--format", "raw",
                   "--output", os.path.join(args.py_spy, "ours.folded.txt"), "--", *cmd]
        lines: list[tuple[float, str]] = []
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                cwd=bench.REPO)
        server_before = server.cpu_s()
        with CpuSampler(proc.pid) as sampler:
            for line in proc.stderr:
                lines.append((time.monotonic(), line.rstrip()))
            proc.wait()
        server_cpu = server.cpu_s() - server_before
    if proc.returncode != 0:
        print("\n".join(text for _, text in lines[-40:]), file=sys.stderr)
        return 1
    events = [(t, int(m.group(1).replace(",", ""))) for t, text in lines
              if text.lstrip().startswith("[curate]") and (m := PROCESSED.search(text))]
    events = [(t, n) for t, n in events if n > 0]
    t0 = events[0][0] + 3.0
    start = min(events, key=lambda e: abs(e[0] - t0))
    # the last line before the run's tail (its last 2 s: final writes, manifest, Ray's shutdown)
    end = max((e for e in events if e[0] <= sampler.snapshots[-1][0] - 2.0), default=events[-1])
    rows = end[1] - start[1]
    by_kind = sampler.between(start[0], end[0])
    whole = sampler.between(None, None)
    total = sum(by_kind.values())
    print(f"steady state: {rows:,} images in {end[0] - start[0]:.1f} s "
          f"({rows / (end[0] - start[0]):.0f} img/s); machine {psutil.cpu_count()} CPUs")
    t_start = sampler.snapshots[0][0]
    print(f"first rows at {events[0][0] - t_start:.1f} s, last progress at {end[0] - t_start:.1f} s, "
          f"exit at {sampler.snapshots[-1][0] - t_start:.1f} s; {end[1]:,} images in all")
    print("\n| process | steady CPU s | steady ms per image | share | whole run CPU s |\n"
          "|---|---:|---:|---:|---:|")
    for kind, cpu in sorted(whole.items(), key=lambda kv: -kv[1]):
        steady = by_kind.get(kind, 0.0)
        print(f"| {kind} | {steady:.1f} | {1e3 * steady / rows:.2f} | {100 * steady / total:.0f}% "
              f"| {cpu:.1f} |")
    print(f"| **all of our job** | {total:.1f} | **{1e3 * total / rows:.2f}** | 100% "
          f"| {sum(whole.values()):.1f} |")
    if loop:
        print(f"\nbare loop of our per-row code: {loop_ms:.2f} ms per image "
              f"({loop['images']:,} images); job / loop: {1e3 * total / rows / loop_ms:.2f}")
    print(f"HTTP server (not in the job's CPU): {1e3 * server_cpu / max(1, end[1]):.2f} ms per image")
    with open(os.path.join(work, "profile.json"), "w") as f:
        json.dump({"rows": rows, "seconds": end[0] - start[0], "cpu_by_kind": by_kind,
                   "whole_run_cpu_by_kind": whole, "images": end[1],
                   "timeline": [(round(t - t_start, 2), round(sum(cpu.values()), 2), len(cpu))
                                for t, cpu in sampler.snapshots],
                   "progress": [(round(t - t_start, 2), n) for t, n in events],
                   "loop_ms_per_image": loop_ms, "overrides": args.overrides}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
