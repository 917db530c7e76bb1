"""Progress while a curation runs (rows per second, drops so far), the stall check, and the summary
table at the end.

Workers report each processed batch to a ``RunTracker`` actor (fire and forget); a thread in the
driver prints a line every few seconds. Lines go to stderr so that they read well in logs and in job
output, with or without a terminal.

A stuck run says so: each worker keeps a ``RowActivity`` (which stage each of its rows is in) and sends
it to the tracker every few seconds; the driver's ``StallWatchdog`` fails the run when no row has moved
on for ``execution.stall_timeout_s``, after printing the rows in flight.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable

import ray


@ray.remote(num_cpus=0)
class RunTracker:
    """The run's small shared state: progress counters, and the next part number to commit.

    One actor for both, since each extra actor is a process to start (seconds on a small machine).
    """

    def __init__(self, first_part: int = 0):
        self.next_part = first_part
        self.processed = 0
        self.kept = 0
        self.drops: Counter = Counter()
        self.rows_committed = 0
        self.bytes_committed = 0
        self.shards = 0
        self.workers: dict[str, tuple[int, dict]] = {}  # worker -> (row moves so far, rows in flight)

    def take_parts(self, n: int) -> int:
        """Reserve ``n`` consecutive part numbers; returns the first."""
        first = self.next_part
        self.next_part += n
        return first

    def processed_batch(self, n: int, kept: int, drops: dict) -> None:
        self.processed += n
        self.kept += kept
        self.drops.update(drops)

    def committed(self, rows: int, nbytes: int) -> None:
        self.rows_committed += rows
        self.bytes_committed += nbytes
        self.shards += 1 if rows else 0

    def activity(self, worker: str, moves: int, in_flight: dict) -> None:
        """A worker's ``RowActivity.report()``."""
        self.workers[worker] = (moves, in_flight)

    def progress_marker(self) -> tuple[tuple, int]:
        """Something that changes whenever a row moves on anywhere in the run, and the number of
        workers that reported so far."""
        moves = sum(m for m, _ in self.workers.values())
        return (moves, self.processed, self.rows_committed, self.shards), len(self.workers)

    def in_flight(self) -> dict:
        """Each worker's rows in flight, as its last report said."""
        return {worker: rows for worker, (_, rows) in self.workers.items()}

    def snapshot(self) -> dict:
        return {
            "processed": self.processed,
            "kept": self.kept,
            "drops": dict(self.drops),
            "rows_committed": self.rows_committed,
            "bytes_committed": self.bytes_committed,
            "shards": self.shards,
        }


def _top_drops(drops: dict, n: int = 4) -> str:
    items = sorted(drops.items(), key=lambda kv: -kv[1])[:n]
    more = len(drops) - len(items)
    text = ", ".join(f"{k} {v}" for k, v in items)
    return text + (f", +{more} more" if more > 0 else "")


class ProgressReporter:
    """Prints a progress line every ``interval_s`` until stopped."""

    def __init__(self, tracker, interval_s: float, stream=None, label: str = "curate"):
        self.tracker, self.interval_s, self.label = tracker, interval_s, label
        self.stream = stream or sys.stderr  # looked up now: a test may have swapped it since import
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self):
        last_n, last_t = 0, self.started
        while not self._stop.wait(self.interval_s):
            try:
                snap = ray.get(self.tracker.snapshot.remote(), timeout=10)
            except Exception:  # progress is best effort; never let it break the run
                continue
            now = time.monotonic()
            rate = (snap["processed"] - last_n) / max(1e-9, now - last_t)
            last_n, last_t = snap["processed"], now
            dropped = sum(snap["drops"].values())
            line = (
                f"[{self.label}] {now - self.started:6.0f}s  processed {snap['processed']:,} "
                f"({rate:,.0f} rows/s)  kept {snap['kept']:,}  dropped {dropped:,}"
            )
            if dropped:
                line += f" ({_top_drops(snap['drops'])})"
            line += f"  shards {snap['shards']}"
            print(line, file=self.stream, flush=True)


class RowActivity:
    """Where one worker's rows are: each row's stage (``queued``, ``fetch``, ``decode``, ...) and since
    when, plus a count of moves from one stage to the next, sent to the run's tracker every
    ``interval_s`` by a background thread (none without a tracker).

    Rows are named by the token ``enter`` returns (input keys need not be unique). Thread-safe.
    """

    EXAMPLES = 3  # rows per stage named in a report, the longest in their stage first

    def __init__(self, tracker=None, interval_s: float = 5.0, worker: str | None = None):
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self.interval_s = interval_s
        self._tracker = tracker
        self._rows: dict[int, list] = {}  # token -> [stage, key, source, since (wall clock)]
        self._tokens = itertools.count()
        self._moves = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if tracker is not None:
            threading.Thread(target=self._run, daemon=True, name="row-activity").start()

    def enter(self, rows: Iterable[tuple[str, str]], stage: str = "queued") -> list[int]:
        """Rows ``(key, source)`` that arrived in this worker; returns their tokens."""
        now = time.time()
        with self._lock:
            tokens = []
            for key, source in rows:
                token = next(self._tokens)
                self._rows[token] = [stage, key, source, now]
                tokens.append(token)
            return tokens

    def move(self, tokens: int | Iterable[int], stage: str) -> None:
        """Rows that went on to ``stage``."""
        now = time.time()
        with self._lock:
            for token in [tokens] if isinstance(tokens, int) else tokens:
                row = self._rows.get(token)
                if row is not None and row[0] != stage:
                    row[0], row[3] = stage, now
                    self._moves += 1

    def leave(self, tokens: Iterable[int]) -> None:
        """Rows that left the worker (done, kept or dropped)."""
        with self._lock:
            for token in tokens:
                if self._rows.pop(token, None) is not None:
                    self._moves += 1

    def report(self) -> tuple[int, dict]:
        """(moves so far, rows in flight: ``{stage: {"rows": n, "longest": [[key, source, since],
        ...]}}``)."""
        with self._lock:
            rows = list(self._rows.values())
            moves = self._moves
        by_stage: dict[str, list] = {}
        for stage, key, source, since in rows:
            by_stage.setdefault(stage, []).append((since, key, source))
        return moves, {stage: {"rows": len(items), "longest": [
            [key, source, since] for since, key, source in heapq.nsmallest(self.EXAMPLES, items)]}
            for stage, items in by_stage.items()}

    def close(self) -> None:
        self._stop.set()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            try:
                self._tracker.activity.remote(self.worker, *self.report())
            except Exception:  # the tracker is gone (the run ended); nothing left to report to
                return


def activity_interval(execution) -> float:
    """How often workers report their rows in flight: the progress interval, and often enough that a
    stall is seen within about a quarter of ``stall_timeout_s`` of its limit."""
    interval = execution.progress_interval_s
    if execution.stall_timeout_s:
        interval = min(interval, execution.stall_timeout_s / 4)
    return max(0.1, interval)


class StallWatchdog:
    """Watches a run's tracker from the driver; when no row has moved on for ``timeout_s`` (counted
    from the first worker's first report: starting workers, which an autoscaler may take minutes to
    provide, is not a stall), prints the rows in flight to ``stream``, then sets ``stalled`` with a
    one-line ``message``. The job turns that into a failure (``pipelines.curation_job``)."""

    def __init__(self, tracker, timeout_s: float, stream=None, label: str = "curate"):
        self.tracker, self.timeout_s, self.label = tracker, timeout_s, label
        self.stream = stream or sys.stderr
        self.stalled = threading.Event()
        self.message = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stall-watchdog")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self):
        poll_s = max(0.1, min(5.0, self.timeout_s / 5))
        marker, since = None, None
        while not self._stop.wait(poll_s):
            try:
                current, workers = ray.get(self.tracker.progress_marker.remote(), timeout=10)
            except Exception:  # no answer is no news: the clock keeps running
                current, workers = marker, (1 if since is not None else 0)
            now = time.monotonic()
            if since is None:
                if workers:
                    marker, since = current, now
                continue
            if current != marker:
                marker, since = current, now
            elif now - since >= self.timeout_s:
                self._report(now - since)
                return

    def _report(self, idle_s: float) -> None:
        try:
            in_flight = ray.get(self.tracker.in_flight.remote(), timeout=10)
        except Exception as e:
            in_flight, unreachable = {}, f"{type(e).__name__}"
        else:
            unreachable = None
        lines, summary = format_in_flight(in_flight)
        print(f"[{self.label}] stalled: no row has moved on for {idle_s:.0f} s; in flight:",
              file=self.stream, flush=True)
        for line in lines or ["(no rows in the workers: waiting for input or for shard writes)"]:
            print(f"[{self.label}]   {line}", file=self.stream, flush=True)
        if unreachable:
            print(f"[{self.label}]   (the run's tracker did not answer: {unreachable})",
                  file=self.stream, flush=True)
        self.message = (
            f"curation stalled: no row moved on for {self.timeout_s:g} s (execution.stall_timeout_s)"
            f"; in flight: {summary or 'nothing'}. The rows are listed above; rerun with --resume "
            "to go on")
        self.stalled.set()


def format_in_flight(in_flight: dict, now: float | None = None) -> tuple[list[str], str]:
    """Lines for a person (one per stage: rows, the longest waiting) and a one-line summary, from
    ``RunTracker.in_flight()``."""
    now = time.time() if now is None else now
    rows: Counter = Counter()
    longest: dict[str, list] = {}
    for stages in in_flight.values():
        for stage, info in stages.items():
            rows[stage] += info["rows"]
            longest.setdefault(stage, []).extend(info["longest"])
    lines, parts = [], []
    for stage, n in rows.most_common():
        oldest = sorted(longest[stage], key=lambda r: r[2])[:RowActivity.EXAMPLES]
        named = ", ".join(f"{key} {source} ({now - since:.0f} s)" for key, source, since in oldest)
        lines.append(f"{stage}: {n:,} row(s); longest: {named}")
        parts.append(f"{stage} {n:,}")
    return lines, ", ".join(parts)


def format_summary(stats: dict, elapsed_s: float, output: str) -> str:
    """A short table for a person: what was read, written, dropped and why."""
    rows = [
        ("rows read", f"{stats['rows_read']:,}"),
        ("rows written", f"{stats['rows_written']:,}"),
        ("rows dropped", f"{stats['rows_dropped']:,}"),
    ]
    for reason, n in stats["dropped_by_reason"].items():
        rows.append((f"  {reason}", f"{n:,}"))
    rows += [
        ("shards", f"{stats['shards']:,}"),
        ("bytes written", f"{stats['bytes_written'] / 1e6:,.1f} MB"),
        ("elapsed", f"{elapsed_s:,.1f} s"),
    ]
    if stats.get("rows_read_this_run") is not None and elapsed_s > 0:
        rows.append(("rows/s (this run)", f"{stats['rows_read_this_run'] / elapsed_s:,.1f}"))
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    body = "\n".join(f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows)
    return f"{line}\n{body}\n{line}\noutput: {output}"
