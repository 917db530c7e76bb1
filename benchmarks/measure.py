"""Measuring benchmark runs: a subprocess tree's wall time, CPU and memory, timestamped progress lines,
and the state of the code measured. Shared by the curation benchmarks (images and videos)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_psutil():
    """psutil, or the copy Ray vendors (importing ray puts ``ray/thirdparty_files`` on ``sys.path``)."""
    try:
        import psutil
    except ImportError:
        import ray  # noqa: F401

        import psutil
    return psutil


def process_tree(pid: int) -> list:
    """The process ``pid`` and all its descendants (psutil processes); empty once it is gone."""
    psutil = load_psutil()
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def progress_events(lines: list[tuple[float, str]], label: str) -> list[tuple[float, int]]:
    """``(t, rows processed)`` from a job's timed ``[label] ... processed N`` progress lines."""
    events = []
    for t, line in lines:
        m = PROCESSED.search(line)
        if m and line.lstrip().startswith(f"[{label}]"):
            events.append((t, int(m.group(1).replace(",", ""))))
    return events


class TreeSampler:
    """Samples a process and its descendants: peak summed RSS, CPU seconds per process, process count."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss = 0
        self.peak_pss = 0  # proportional set size: shared pages split between the processes sharing them
        self.peak_procs = 0
        self.cpu: dict[tuple[int, float], float] = {}  # (pid, create_time) -> last seen CPU seconds
        self.samples = 0
        self.series: list[tuple[float, int]] = []  # (seconds since start, summed RSS)
        self.peak_top: list[tuple[str, float]] = []  # the largest processes at the peak, (name, MB)
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        psutil = load_psutil()
        procs = process_tree(self.pid)
        if not procs:
            return
        total = total_pss = 0
        each = []
        for p in procs:
            try:
                with p.oneshot():
                    mem = p.memory_full_info()  # smaps_rollup: cheap on Linux >= 4.14
                    t = p.cpu_times()
                    self.cpu[(p.pid, p.create_time())] = t.user + t.system
                    each.append((mem.rss, p))
                total += mem.rss
                total_pss += getattr(mem, "pss", mem.rss)
            except psutil.Error:
                pass
        self.peak_pss = max(self.peak_pss, total_pss)
        self.series.append((time.monotonic() - self._t0, total))
        if total > self.peak_rss:
            top = []
            for rss, p in sorted(each, key=lambda e: -e[0])[:6]:
                try:
                    name = " ".join(p.cmdline())[:60] or p.name()
                except psutil.Error:
                    name = "?"
                top.append((name, round(rss / 2**20)))
            self.peak_top = top
        self.peak_rss = max(self.peak_rss, total)
        self.peak_procs = max(self.peak_procs, len(procs))
        self.samples += 1

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


def run_measured(cmd: list[str], log_path: str, env=None, timeout_s: float = 1800) -> dict:
    """Run ``cmd`` with its output to ``log_path``; wall time, peak tree RSS and tree CPU seconds."""
    with open(log_path, "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        killer = threading.Timer(timeout_s, proc.kill)
        killer.start()
        with TreeSampler(proc.pid) as sampler:
            # wait4: the exact CPU time of the child and of the descendants it reaped (the sampler
            # misses up to one interval of each process's CPU; for a single process this is exact).
            _, status, usage = os.wait4(proc.pid, 0)
        killer.cancel()
        wall = time.monotonic() - t0
        rc = proc.returncode = os.waitstatus_to_exitcode(status)
    if rc != 0:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}; log {log_path}:\n{tail}")
    cpu = max(sampler.cpu_s, usage.ru_utime + usage.ru_stime)
    return {"wall_s": wall, "peak_rss_mb": sampler.peak_rss / 2**20, "peak_pss_mb": sampler.peak_pss / 2**20,
            "cpu_s": cpu,
            "peak_procs": sampler.peak_procs, "samples": sampler.samples, "peak_top": sampler.peak_top,
            "rss_series": [(round(t, 2), round(r / 2**20)) for t, r in sampler.series]}


PROCESSED = re.compile(r"processed ([\d,]+)")


class TimedStream:
    """A text stream that timestamps each line (the pipeline's progress lines) and passes it on."""

    def __init__(self, t0: float, sink):
        self.t0, self.sink, self.buf, self.lines = t0, sink, "", []

    def write(self, s: str) -> int:
        self.sink.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.lines.append((time.monotonic() - self.t0, line))
        return len(s)

    def flush(self):
        self.sink.flush()


def git_state() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "vlp", "pipelines").splitlines(),
            "diff_sha1": hashlib.sha1(git("diff", "HEAD", "--", "vlp", "pipelines").encode()).hexdigest()[:12]}


def note_code_change(res: dict, code_before: dict, say) -> None:
    """Record in ``res["code"]`` (and ``say``) that vlp/ or pipelines/ changed while the benchmark
    ran, since ``code_before`` (``git_state()`` at its start): its runs may mix code versions."""
    now = git_state()
    if now != code_before:
        res["code"]["changed_during_run"] = now
        say("WARNING: vlp/ or pipelines/ changed while the benchmark ran; the runs may mix code versions")
