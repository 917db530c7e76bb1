"""Fetching source bytes: HTTP(S) URLs with retries and limits, local paths and ``s3://`` objects.

``Fetcher.fetch(source)`` returns bytes or raises ``DropError`` with a drop reason. HTTP policy:

- time-outs (connect and read) and 5xx answers are retried with exponential backoff;
- 4xx answers are final (the resource is gone or forbidden; asking again wastes the server's time);
- redirects are followed up to a limit;
- bodies are read up to a size cap, announced (Content-Length) or not.
"""

from __future__ import annotations

import os
import random
import stat
import time
from dataclasses import dataclass
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import (
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ConnectTimeoutError,
)

from vlp.curation.drops import DropError
from vlp.data.storage import Storage


@dataclass(frozen=True)
class FetchConfig:
    """How sources are fetched.

    Attributes:
        timeout_s: connect and read time-out of one HTTP attempt.
        retries: further attempts after a time-out, connection error or 5xx answer.
        backoff_s: first backoff; doubles on each retry (with jitter).
        max_redirects: redirects followed before giving up.
        max_bytes: bodies larger than this are dropped as ``too_large``.
        threads: concurrent fetches (and decodes) per curation worker.
        user_agent: sent with every request.
    """

    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_redirects: int = 5
    max_bytes: int = 32 * 1024 * 1024
    threads: int = 16
    user_agent: str = "vlp-curate/0.1 (+https://github.com/vlp)"

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError("fetch.timeout_s must be positive")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError("fetch.retries and fetch.max_redirects must be >= 0")
        if self.threads < 1:
            raise ValueError("fetch.threads must be >= 1")



_RETRYABLE = (ReadTimeoutError, ConnectTimeoutError, NewConnectionError, ProtocolError)


# Sources read over the network (or an object store): fetched into memory before decoding.
REMOTE_SCHEMES = ("http://", "https://", "s3://")


class Fetcher:
    """Thread-safe fetcher; one per worker process, shared by its threads (one connection pool)."""

    def __init__(self, config: FetchConfig, storage: Storage, *, sleep=time.sleep):
        self.config = config
        self.storage = storage
        self._sleep = sleep
        self._http = urllib3.PoolManager(
            num_pools=64,
            maxsize=max(4, config.threads),
            headers={"User-Agent": config.user_agent},
            timeout=urllib3.Timeout(connect=config.timeout_s, read=config.timeout_s),
            retries=False,
        )

    def fetch(self, source: str) -> bytes:
        if source.startswith(("http://", "https://")):
            return self._fetch_http(source)
        try:
            return self.storage.read_bytes(source, max_bytes=self.config.max_bytes)
        except FileNotFoundError:
            raise DropError("file_not_found", source) from None
        except ValueError as e:
            raise DropError("too_large", str(e)) from None
        except OSError as e:
            raise DropError("read_error", str(e)[:200]) from None

    def local_file(self, path: str) -> str:
        """``path`` after the checks ``fetch`` makes, without reading it: for readers that open files
        themselves (a video need not be in memory to be decoded)."""
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise DropError("file_not_found", path) from None
        except OSError as e:
            raise DropError("read_error", str(e)[:200]) from None
        if not stat.S_ISREG(info.st_mode):
            raise DropError("file_not_found", f"{path} is not a file")
        if info.st_size > self.config.max_bytes:
            raise DropError("too_large", f"file larger than {self.config.max_bytes} bytes")
        return path

    def _fetch_http(self, url: str) -> bytes:
        cfg = self.config
        attempt = 0
        while True:
            try:
                return self._get_following_redirects(url)
            except DropError as e:
                retryable = e.reason in ("http_5xx", "http_timeout", "connection_error")
                if not retryable or attempt >= cfg.retries:
                    raise
            attempt += 1
            delay = cfg.backoff_s * (2 ** (attempt - 1))
            self._sleep(delay * (0.5 + random.random()))

    def _get_following_redirects(self, url: str) -> bytes:
        cfg = self.config
        for _ in range(cfg.max_redirects + 1):
            try:
                resp = self._http.request("GET", url, preload_content=False, redirect=False)
            except NewConnectionError as e:  # before ConnectTimeoutError: urllib3 subclasses it
                raise DropError("connection_error", str(e)[:200]) from None
            except (ReadTimeoutError, ConnectTimeoutError) as e:
                raise DropError("http_timeout", str(e)[:200]) from None
            except (MaxRetryError, ProtocolError) as e:
                if isinstance(getattr(e, "reason", None), (ReadTimeoutError, ConnectTimeoutError)):
                    raise DropError("http_timeout", str(e)[:200]) from None
                raise DropError("connection_error", str(e)[:200]) from None
            except (HTTPError, ValueError) as e:  # ValueError: malformed URL
                raise DropError("invalid_url", str(e)[:200]) from None
            complete = False
            try:
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.headers.get("Location")
                    if not location:
                        raise DropError("http_error", f"redirect {resp.status} without Location")
                    url = urljoin(url, location)
                    continue
                if 400 <= resp.status < 500:
                    raise DropError("http_4xx", f"HTTP {resp.status}")
                if resp.status >= 500:
                    raise DropError("http_5xx", f"HTTP {resp.status}")
                if resp.status != 200:
                    raise DropError("http_error", f"HTTP {resp.status}")
                body = self._read_body(resp)
                complete = True
                return body
            finally:
                if not complete:
                    # An unread body (error page, oversized file) would poison the pooled connection
                    # for the next request: close it instead of reusing it.
                    resp.close()
                resp.release_conn()
        raise DropError("too_many_redirects", f"more than {cfg.max_redirects}")

    def _read_body(self, resp) -> bytes:
        cap = self.config.max_bytes
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > cap:
            raise DropError("too_large", f"Content-Length {length} > {cap}")
        chunks, total = [], 0
        try:
            for chunk in resp.stream(1 << 16):
                total += len(chunk)
                if total > cap:
                    raise DropError("too_large", f"body over {cap} bytes")
                chunks.append(chunk)
        except ReadTimeoutError as e:
            raise DropError("http_timeout", str(e)[:200]) from None
        except _RETRYABLE as e:
            raise DropError("connection_error", str(e)[:200]) from None
        return b"".join(chunks)

