"""Isolation for video decoding: ``process_video`` in child processes, with a time limit per file,
crash recovery and recycling.

decord is unmaintained: on broken files it can hang while holding the GIL (so no thread in the same
process can even time it out), crash the process, or leak memory file after file. Each decode therefore
runs in a child process that the parent can kill. A file that runs past ``VideoConfig.timeout_s`` has its
child killed (SIGKILL, by PID) and comes back as a ``decode_timeout`` drop; a child that dies on a file
comes back as ``decoder_crash``; either way a fresh child takes the next file. A child answers
``"taken"`` as it takes a file, so one that died before (idle, between files) costs no file: the file
goes to a fresh child. A child is also replaced after
``max_decodes_per_worker`` files or once its resident memory passes ``max_worker_memory_mb``, so a leak
stays bounded.

Children are started with ``spawn`` (a fresh interpreter): the parent may be a Ray actor with threads,
which ``fork`` must not copy. As with any ``spawn`` start, the parent's main module must be safe to
import (scripts keep their work under ``if __name__ == "__main__":``; Ray workers, pytest and the ``vlp``
entry point do). Children start lazily, on the first file that finds no idle child; multiprocessing's
own resource tracker process, started with the first child, lives until the parent exits.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

import psutil

from vlp.curation.filters import FilterSet
from vlp.curation.image import limit_native_threads
from vlp.curation.video import VideoConfig, VideoResult, dropped_video, file_sha256, process_video

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0  # a child imports NumPy, Pillow, PyAV and decord before it says it is ready
_STOP_GRACE_S = 2.0


def _child_main(conn, config: VideoConfig, filters: FilterSet) -> None:
    """A child's loop: ``(path, segment)`` in, ``VideoResult`` out, until ``None`` or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    limit_native_threads(1)  # one decoder child is one file at a time on one core
    if "decord" in (config.backend, config.fallback):
        import decord  # noqa: F401  (its import time must not count against the first file's limit)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        path, segment = task
        conn.send("taken")  # from here on, a death is this file's doing
        conn.send(process_video(path, config, filters, segment))


@dataclass(eq=False)
class _Child:
    process: mp.process.BaseProcess
    conn: mp.connection.Connection
    decodes: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        try:
            return psutil.Process(self.pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0


def _stop(child: _Child, graceful: bool) -> None:
    """Stop a child: ask it to exit when it is idle, SIGKILL it by PID otherwise or if it lingers."""
    if graceful and child.process.is_alive():
        try:
            child.conn.send(None)
            child.process.join(_STOP_GRACE_S)
        except (OSError, ValueError):
            pass
    if child.process.is_alive():
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child.process.join(_STOP_GRACE_S)
    child.conn.close()


def _kill_all(children: set) -> None:
    """Finalizer: no child outlives its pool, whether closed or garbage-collected."""
    for child in list(children):
        _stop(child, graceful=False)
    children.clear()


class VideoDecodePool:
    """Up to ``workers`` child processes running ``process_video``; thread-safe.

    Each ``process`` call takes an idle child (starting one if fewer than ``workers`` exist, waiting
    otherwise), so as many threads as children decode at once.
    """

    def __init__(self, config: VideoConfig, filters: FilterSet, workers: int = 1,
                 tmp_dir: str | None = None):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.config = config
        self.filters = filters
        self.workers = workers
        self.tmp_dir = tmp_dir
        self._ctx = mp.get_context("spawn")
        self._cond = threading.Condition()
        self._idle: list[_Child] = []
        self._children: set[_Child] = set()  # every live child, idle or busy
        self._starting = 0
        self._closed = False
        self._finalizer = weakref.finalize(self, _kill_all, self._children)

    def pids(self) -> list[int]:
        """PIDs of the live children, idle or busy."""
        with self._cond:
            return sorted(c.pid for c in self._children)

    def busy_pids(self) -> list[int]:
        """PIDs of the children working on a file now."""
        with self._cond:
            return sorted(c.pid for c in self._children if c not in self._idle)

    def process(self, source: str | bytes, segment: tuple[float, float] | None = None,
                timeout_s: float | None = None) -> VideoResult:
        """Process a file path or a file's bytes in a child. Never raises for bad input.

        Args:
            segment: the captioned ``[start, end]`` in seconds, if the row gives one.
            timeout_s: this file's time limit; ``config.timeout_s`` if not given.

        Raises:
            RuntimeError: the pool is closed, or a child does not start.
        """
        limit = self.config.timeout_s if timeout_s is None else timeout_s
        tmp = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            fd, tmp = tempfile.mkstemp(prefix="vlp-video-", dir=self.tmp_dir)
            with os.fdopen(fd, "wb") as f:
                f.write(source)
        try:
            for _ in range(2):
                child = self._acquire()
                healthy = False
                try:
                    result, healthy = self._run(child, tmp or source, segment, limit)
                finally:
                    self._release(child, healthy)
                if result is not None:
                    return result
            # two children in a row died before they could take the file: not the file's doing
            return dropped_video(_sha256(tmp or source), "decoder_crash",
                                 "decoder processes die before taking files")
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def _run(self, child: _Child, path: str, segment,
             limit: float) -> tuple[VideoResult | None, bool]:
        """The child's result, or a drop; ``None`` when the child was dead before it took the file
        (it died idle, and the check in ``_acquire`` can miss that: try another child)."""
        started = time.monotonic()
        try:
            child.conn.send((path, segment))
            taken = child.conn.poll(limit) and child.conn.recv() == "taken"
        except (EOFError, OSError):  # nobody was reading: it died before it got the file
            return None, False
        try:
            if taken and child.conn.poll(max(0.0, limit - (time.monotonic() - started))):
                result = child.conn.recv()
                child.decodes += 1
                return result, True
        except (EOFError, OSError, pickle.UnpicklingError):  # the child died on this file
            child.process.join(_STOP_GRACE_S)
            self._raise_if_closed()
            how = _exit_cause(child.process.exitcode)
            logger.warning("video decoder pid %d died on %s (%s)", child.pid, path, how)
            return dropped_video(_sha256(path), "decoder_crash", f"worker {how}"), False
        os.kill(child.pid, signal.SIGKILL)
        logger.warning("video decoder pid %d killed after %gs on %s", child.pid, limit, path)
        return dropped_video(_sha256(path), "decode_timeout",
                             f"over {limit:g}s ({time.monotonic() - started:.2f}s)"), False

    def _acquire(self) -> _Child:
        with self._cond:
            while True:
                self._raise_if_closed()
                while self._idle:
                    child = self._idle.pop()
                    # An idle child never writes: a readable pipe is the EOF of a dead one.
                    if child.process.is_alive() and not child.conn.poll(0):
                        return child
                    self._children.discard(child)  # died while idle: replace it quietly
                    _stop(child, graceful=False)
                if len(self._children) + self._starting < self.workers:
                    self._starting += 1
                    break
                self._cond.wait()
        try:
            child = self._start()
        finally:
            with self._cond:
                self._starting -= 1
                self._cond.notify()
        with self._cond:
            if self._closed:
                _stop(child, graceful=False)
                self._raise_if_closed()
            self._children.add(child)
        return child

    def _start(self) -> _Child:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_child_main, args=(child_end, self.config, self.filters),
                                    name="vlp-video-decode", daemon=True)
        process.start()
        child_end.close()
        child = _Child(process, parent_end)
        try:
            if parent_end.poll(_START_TIMEOUT_S):
                parent_end.recv()
                return child
        except (EOFError, OSError):
            pass
        _stop(child, graceful=False)
        raise RuntimeError(f"video decoder process did not start (exit code {process.exitcode})")

    def _release(self, child: _Child, healthy: bool) -> None:
        retire = not healthy or child.decodes >= self.config.max_decodes_per_worker
        if not retire and child.rss_mb() > self.config.max_worker_memory_mb:
            logger.info("recycling video decoder pid %d at %.0f MB", child.pid, child.rss_mb())
            retire = True
        with self._cond:
            if retire or self._closed:
                self._children.discard(child)
            else:
                self._idle.append(child)
            self._cond.notify()
        if retire or self._closed:
            _stop(child, graceful=healthy)

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise RuntimeError("VideoDecodePool is closed")

    def close(self) -> None:
        """Stop every child: idle ones are asked to exit, busy ones are killed."""
        with self._cond:
            self._closed = True
            idle, busy = list(self._idle), [c for c in self._children if c not in self._idle]
            self._idle.clear()
            self._children.clear()
            self._cond.notify_all()
        for child in idle:
            _stop(child, graceful=True)
        for child in busy:
            _stop(child, graceful=False)
        self._finalizer.detach()

    def __enter__(self) -> VideoDecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _exit_cause(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _sha256(path: str) -> str:
    """The file's digest for a drop the child could not report ("" if the file is unreadable)."""
    try:
        return file_sha256(path)
    except OSError:
        return ""
