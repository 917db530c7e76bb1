"""Progress while a curation runs (rows per second, drops so far) and the summary table at the end.

Workers report each processed batch to a ``RunTracker`` actor (fire and forget); a thread in the
driver prints a line every few seconds. Lines go to stderr so that they read well in logs and in job
output, with or without a terminal.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

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

    def __init__(self, tracker, interval_s: float, stream=sys.stderr, label: str = "curate"):
        self.tracker, self.interval_s, self.stream, self.label = tracker, interval_s, stream, label
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
