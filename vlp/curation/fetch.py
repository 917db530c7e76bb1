"""Fetching source bytes: HTTP(S) URLs, politely and safely, local paths and ``s3://`` objects.

``Fetcher.fetch(source)`` returns bytes or raises ``DropError`` with a drop reason. HTTP policy (the
rules themselves are ``vlp.curation.fetch_policy``):

- **safety**: every connection, redirect hops included, goes to an address the fetcher looked up
  itself and checked with the SSRF guard (``fetch.allow_networks``); the request keeps the URL's own
  host name (``Host`` header, TLS SNI and certificate check). Refused: ``blocked_address``, no request
  sent. Schemes other than ``http``, ``https`` and ``s3`` (``file``, ``ftp``, ``gopher``, ...):
  ``unsupported_scheme``. ``s3://`` sources go to the configured S3 endpoint (an operator's choice,
  not the input's), so the guard does not apply to them;
- **politeness**: a user-agent that names us (``fetch.user_agent_token``), a per-host concurrency
  limit and request rate inside a worker, ``429``/``503`` with ``Retry-After`` honoured (the whole
  host waits; beyond ``fetch.max_retry_after_s`` the row is dropped at once), one DNS lookup per host
  per ``fetch.dns_cache_ttl_s``;
- **compliance**: ``X-Robots-Tag`` opt-outs (``fetch.opt_out_directives``) drop the row before its
  body is read;
- time-outs (connect and read), connection errors, 5xx and 429 answers are retried with exponential
  backoff; other 4xx answers are final (asking again wastes the server's time); redirects are
  followed up to a limit; bodies are read up to a size cap, announced (Content-Length) or not.

Drop reasons: ``invalid_url``, ``unsupported_scheme``, ``dns_error``, ``blocked_address``,
``connection_error``, ``tls_error``, ``http_timeout``, ``http_4xx``, ``http_5xx``, ``http_error``,
``rate_limited`` (429 on every attempt), ``retry_after_too_long``, ``too_many_redirects``,
``opted_out``, ``too_large``, ``file_not_found``, ``read_error``.
"""

from __future__ import annotations

import importlib.metadata
import os
import random
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import parse_url
from urllib3.util.connection import create_connection

from vlp.curation.drops import DropError
from vlp.curation.fetch_policy import (
    AddressGuard,
    DnsCache,
    HostLimiter,
    RobotsTag,
    parse_networks,
    parse_retry_after,
)
from vlp.data.storage import Storage

# The X-Robots-Tag directives that opt content out of AI training (noai, noimageai: the proposal
# img2dataset honours) or out of indexing at all (noindex, noimageindex): a site saying either has not
# agreed to its images being collected.
DEFAULT_OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")

_TOKEN = re.compile(r"^[A-Za-z0-9._~-]+$")


@dataclass(frozen=True)
class FetchConfig:
    """How sources are fetched.

    Attributes:
        timeout_s: connect and read time-out of one HTTP attempt.
        retries: further attempts after a time-out, connection error, 5xx or 429 answer.
        backoff_s: first backoff; doubles on each retry (with jitter). A ``Retry-After`` replaces it.
        max_redirects: redirects followed before giving up.
        max_bytes: bodies larger than this are dropped as ``too_large``.
        threads: concurrent fetches (and decodes) per curation worker.
        user_agent_token: the name sites use for this crawler (in ``X-Robots-Tag: <name>: noai``);
            a product token, no spaces or slashes.
        user_agent: the whole ``User-Agent`` header; empty sends ``<user_agent_token>/<vlp version>``.
            Set it to name a real page about your crawl, e.g. ``vlp-curate/0.1 (+https://...)``; it
            must contain ``user_agent_token``.
        opt_out_directives: ``X-Robots-Tag`` directives that drop a row as ``opted_out`` (for every
            crawler, or addressed to ``user_agent_token``). Empty honours none.
        per_host_concurrency: requests to one host in flight at once, per worker.
        per_host_rate: request starts per second to one host, per worker; 0 is unlimited.
        max_retry_after_s: the longest ``Retry-After`` (429, 503) waited for; a longer one drops the
            row as ``retry_after_too_long``.
        dns_cache_ttl_s: how long a worker keeps a host's addresses; 0 looks up every request.
        allow_networks: CIDR networks the SSRF guard lets the fetcher connect to although they are
            loopback, private, link-local, ... (e.g. ``[127.0.0.0/8]`` for a server on this machine,
            ``[10.0.0.0/8]`` for an internal mirror). Cloud metadata endpoints (169.254.169.254 and
            others) stay refused unless their own address is listed as a /32 (or /128).
    """

    timeout_s: float = 10.0
    retries: int = 2
    backoff_s: float = 0.5
    max_redirects: int = 5
    max_bytes: int = 32 * 1024 * 1024
    threads: int = 16
    user_agent_token: str = "vlp-curate"
    user_agent: str = ""
    opt_out_directives: tuple[str, ...] = DEFAULT_OPT_OUT_DIRECTIVES
    per_host_concurrency: int = 4
    per_host_rate: float = 0.0
    max_retry_after_s: float = 60.0
    dns_cache_ttl_s: float = 300.0
    allow_networks: tuple[str, ...] = ()

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError("fetch.timeout_s must be positive")
        if self.retries < 0 or self.max_redirects < 0:
            raise ValueError("fetch.retries and fetch.max_redirects must be >= 0")
        if self.threads < 1:
            raise ValueError("fetch.threads must be >= 1")
        if not _TOKEN.match(self.user_agent_token):
            raise ValueError(f"fetch.user_agent_token must be one word of letters, digits, '.', '_', "
                             f"'~' or '-' (sites name it in X-Robots-Tag), got {self.user_agent_token!r}")
        if self.user_agent:
            if not self.user_agent.isprintable() or not self.user_agent.isascii():
                raise ValueError("fetch.user_agent must be printable ASCII on one line")
            if self.user_agent_token.lower() not in self.user_agent.lower():
                raise ValueError(f"fetch.user_agent must contain fetch.user_agent_token "
                                 f"({self.user_agent_token!r}), the name sites address their "
                                 "opt-outs to")
        directives = tuple(str(d).strip().lower() for d in self.opt_out_directives)
        if not all(_TOKEN.match(d) for d in directives):
            raise ValueError(f"fetch.opt_out_directives must be directive names such as noai, got "
                             f"{list(self.opt_out_directives)}")
        object.__setattr__(self, "opt_out_directives", directives)
        if self.per_host_concurrency < 1:
            raise ValueError("fetch.per_host_concurrency must be >= 1")
        if self.per_host_rate < 0:
            raise ValueError("fetch.per_host_rate must be >= 0 (0: unlimited)")
        if self.max_retry_after_s < 0:
            raise ValueError("fetch.max_retry_after_s must be >= 0")
        if self.dns_cache_ttl_s < 0:
            raise ValueError("fetch.dns_cache_ttl_s must be >= 0 (0: no cache)")
        parse_networks(self.allow_networks)  # fails here, naming the entry, not in a worker
        object.__setattr__(self, "allow_networks", tuple(str(n) for n in self.allow_networks))


def default_user_agent(token: str) -> str:
    """``<token>/<installed vlp version>``: names the crawler and its version, and nothing it is not."""
    try:
        version = importlib.metadata.version("vlp")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"{token}/{version}"


# Sources read over the network (or an object store): fetched into memory before decoding.
REMOTE_SCHEMES = ("http://", "https://", "s3://")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HTTP_SCHEMES = ("http", "https")


def source_scheme(source: str) -> str | None:
    """The lower-cased URL scheme of ``source``, or None for a plain path."""
    m = _SCHEME.match(source)
    return m.group(1).lower() if m else None


_RETRYABLE = (ReadTimeoutError, ConnectTimeoutError, NewConnectionError, ProtocolError)
_RETRYABLE_REASONS = ("http_5xx", "http_timeout", "connection_error", "rate_limited")


class _RetryLater(DropError):
    """A 429 or 503 answer, with the host that gave it and its ``Retry-After`` in seconds (or None)."""

    def __init__(self, reason: str, detail: str, host: str, retry_after: float | None):
        super().__init__(reason, detail)
        self.host, self.retry_after = host, retry_after


def _guarded_pool_classes(resolve: Callable[[str, int], tuple[str, ...]]) -> dict:
    """urllib3 pool classes whose connections connect only to the addresses ``resolve`` returns for
    their host (looked up and checked by the fetcher), keeping the host name for the ``Host`` header,
    TLS SNI and the certificate check (urllib3 takes all three from ``conn.host``)."""

    def new_conn(conn):
        host = conn.host.strip("[]")
        error: Exception | None = None
        for address in resolve(host, conn.port):  # DropError: dns_error, blocked_address
            try:
                return create_connection((address, conn.port), conn.timeout,
                                         source_address=conn.source_address,
                                         socket_options=conn.socket_options)
            except TimeoutError:  # socket.timeout
                error = ConnectTimeoutError(
                    conn, f"Connection to {conn.host} ({address}) timed out. "
                          f"(connect timeout={conn.timeout})")
            except OSError as e:
                error = NewConnectionError(conn, f"Failed to establish a new connection to "
                                                 f"{address}: {e}")
        raise error

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self):
            return new_conn(self)

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self):
            return new_conn(self)

    class GuardedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}


class Fetcher:
    """Thread-safe fetcher; one per worker process, shared by its threads (one connection pool, one
    DNS cache, one per-host limiter)."""

    def __init__(self, config: FetchConfig, storage: Storage, *,
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.storage = storage
        self._sleep = sleep
        self.user_agent = config.user_agent or default_user_agent(config.user_agent_token)
        self.guard = AddressGuard(config.allow_networks)
        self.dns = DnsCache(config.dns_cache_ttl_s)
        self.hosts = HostLimiter(config.per_host_concurrency, config.per_host_rate, sleep=sleep)
        self.robots = RobotsTag(config.opt_out_directives, config.user_agent_token)
        self._http = urllib3.PoolManager(
            num_pools=64,
            maxsize=max(4, config.threads),
            headers={"User-Agent": self.user_agent},
            timeout=urllib3.Timeout(connect=config.timeout_s, read=config.timeout_s),
            retries=False,
        )
        self._http.pool_classes_by_scheme = _guarded_pool_classes(self.resolve_checked)

    def resolve_checked(self, host: str, port: int = 80) -> tuple[str, ...]:
        """The addresses of ``host`` the fetcher may connect to (looked up through the worker's DNS
        cache, then filtered by the SSRF guard), in the resolver's order.

        Raises:
            DropError: ``dns_error`` when the name does not resolve, ``blocked_address`` when none of
                its addresses may be connected to.
        """
        addresses = self.dns.resolve(host, port)
        allowed = tuple(a for a in addresses if self.guard.refusal(a) is None)
        if not allowed:
            why = self.guard.refusal(addresses[0])
            shown = host if host == addresses[0] else f"{host} ({addresses[0]})"
            raise DropError("blocked_address", f"{shown} is {why}; fetch.allow_networks opens a "
                                               "network on purpose")
        return allowed

    def fetch(self, source: str) -> bytes:
        scheme = source_scheme(source)
        if scheme in _HTTP_SCHEMES:
            return self._fetch_http(source)
        self._check_scheme(scheme, source)
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
        self._check_scheme(source_scheme(path), path)
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

    @staticmethod
    def _check_scheme(scheme: str | None, source: str) -> None:
        if scheme not in (None, "s3"):
            raise DropError("unsupported_scheme", f"{scheme}:// in {source[:200]}; sources are "
                                                  "http(s):// or s3:// URLs or local paths")

    def _fetch_http(self, url: str) -> bytes:
        cfg = self.config
        attempt = 0
        while True:
            try:
                return self._get_following_redirects(url)
            except DropError as e:
                retry_after, host = getattr(e, "retry_after", None), getattr(e, "host", "")
                if retry_after is not None and retry_after > cfg.max_retry_after_s:
                    raise DropError("retry_after_too_long",
                                    f"{e.detail} with Retry-After {retry_after:.0f} s > "
                                    f"fetch.max_retry_after_s {cfg.max_retry_after_s:g}") from None
                if e.reason not in _RETRYABLE_REASONS or attempt >= cfg.retries:
                    raise
            attempt += 1
            if retry_after is not None:
                # The host said when: every request to it from this worker (this retry too) waits.
                self.hosts.defer(host, retry_after)
            else:
                delay = cfg.backoff_s * (2 ** (attempt - 1))
                self._sleep(delay * (0.5 + random.random()))

    def _get_following_redirects(self, url: str) -> bytes:
        cfg = self.config
        for _ in range(cfg.max_redirects + 1):
            try:
                host = parse_url(url).host or ""
            except (HTTPError, ValueError) as e:  # LocationParseError: malformed URL
                raise DropError("invalid_url", str(e)[:200]) from None
            with self.hosts.slot(host):
                resp = self._request(url)
                complete = False
                try:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location")
                        if not location:
                            raise DropError("http_error", f"redirect {resp.status} without Location")
                        url = urljoin(url, location)
                        if source_scheme(url) not in _HTTP_SCHEMES:
                            raise DropError("unsupported_scheme", f"redirect to {url[:200]}")
                        continue
                    self._check_status(resp, host)
                    directive = self.robots.opt_out(resp.headers.getlist("X-Robots-Tag"))
                    if directive:  # decided on the headers: the body is never read
                        raise DropError("opted_out", f"X-Robots-Tag: {directive}")
                    body = self._read_body(resp)
                    complete = True
                    return body
                finally:
                    if not complete:
                        # An unread body (error page, oversized file) would poison the pooled
                        # connection for the next request: close it instead of reusing it.
                        resp.close()
                    resp.release_conn()
        raise DropError("too_many_redirects", f"more than {cfg.max_redirects}")

    def _request(self, url: str):
        try:
            return self._http.request("GET", url, preload_content=False, redirect=False)
        except NameResolutionError as e:  # our resolver raises DropError; kept for safety
            raise DropError("dns_error", str(e)[:200]) from None
        except NewConnectionError as e:  # before ConnectTimeoutError: urllib3 subclasses it
            raise DropError("connection_error", str(e)[:200]) from None
        except (ReadTimeoutError, ConnectTimeoutError) as e:
            raise DropError("http_timeout", str(e)[:200]) from None
        except SSLError as e:
            raise DropError("tls_error", str(e)[:200]) from None
        except (MaxRetryError, ProtocolError) as e:
            reason = getattr(e, "reason", None)
            if isinstance(reason, (ReadTimeoutError, ConnectTimeoutError)):
                raise DropError("http_timeout", str(e)[:200]) from None
            if isinstance(reason, SSLError):
                raise DropError("tls_error", str(e)[:200]) from None
            raise DropError("connection_error", str(e)[:200]) from None
        except (HTTPError, ValueError) as e:  # ValueError: malformed URL
            raise DropError("invalid_url", str(e)[:200]) from None

    @staticmethod
    def _check_status(resp, host: str) -> None:
        status = resp.status
        if status in (429, 503):
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise _RetryLater("rate_limited" if status == 429 else "http_5xx", f"HTTP {status}",
                              host, retry_after)
        if 400 <= status < 500:
            raise DropError("http_4xx", f"HTTP {status}")
        if status >= 500:
            raise DropError("http_5xx", f"HTTP {status}")
        if status != 200:
            raise DropError("http_error", f"HTTP {status}")

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
