"""The rules the fetcher keeps: which addresses it may connect to, how hard it may press one host,
which opt-outs it honours, and how long it waits when told to come back later.

Each rule is a small object the ``Fetcher`` (``vlp.curation.fetch``) holds one of per worker process,
shared by its threads:

- ``AddressGuard``: the SSRF guard. Loopback, private, link-local, multicast, reserved, unspecified and
  otherwise non-global addresses are refused unless ``fetch.allow_networks`` opens them; cloud metadata
  endpoints (``CLOUD_METADATA``) only open when their exact address is listed (a /32 or /128 entry).
- ``DnsCache``: one lookup per host per TTL, shared by the worker's threads; the fetcher connects to the
  address it looked up and checked (so a name that resolves to 127.0.0.1 is caught, and a second
  lookup with another answer, DNS rebinding, never happens between check and connect).
- ``HostLimiter``: at most ``per_host_concurrency`` requests to one host at once and
  ``per_host_rate`` request starts per second; a host that answers ``Retry-After`` is left alone
  until then.
- ``RobotsTag``: ``X-Robots-Tag`` opt-outs (``noai``, ``noimageai``, ``noindex``, ``noimageindex`` by
  default), for all crawlers or addressed to our user-agent token.

New rules go here, as plain objects the fetcher calls; nothing here does I/O except ``DnsCache``.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Iterator
from email.utils import parsedate_to_datetime

from vlp.curation.drops import DropError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services hand out cloud credentials to whoever asks from inside the machine: the
# classic target of server-side request forgery. AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
# (169.254.169.254), AWS ECS task credentials (169.254.170.2), AWS over IPv6 (fd00:ec2::254), Alibaba
# (100.100.100.200). A network that merely contains one does not open it (an operator who allows
# 169.254.0.0/16 for link-local services has not thought of the credentials endpoint); only its own
# address, listed as /32 or /128, does.
CLOUD_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))


def parse_networks(entries: Iterable[str], where: str = "fetch.allow_networks") -> tuple[IPNetwork, ...]:
    """CIDR strings as networks (host bits allowed: ``10.1.2.3/8`` is ``10.0.0.0/8``).

    Raises:
        ValueError: naming the entry that is not a network.
    """
    networks = []
    for i, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{where}[{i}]: {entry!r} is not a network; write a CIDR such as "
                             "127.0.0.0/8 or 10.0.0.0/8") from None
    return tuple(networks)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped ``::ffff:a.b.c.d`` or 6to4), which is where a
    connection to it ends up."""
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped or ip.sixtofour
    return None


def address_class(ip: IPAddress) -> str | None:
    """Why a connection to ``ip`` is refused by default (``loopback``, ``private``, ...), or None for a
    public unicast address."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        reason = address_class(inner)
        if reason:
            return reason
    if ip in CLOUD_METADATA:
        return "cloud metadata endpoint"
    for attr, name in (("is_unspecified", "unspecified"), ("is_loopback", "loopback"),
                       ("is_link_local", "link-local"), ("is_multicast", "multicast"),
                       ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(ip, attr):
            return name
    if not ip.is_global:  # shared address space (100.64.0.0/10), documentation ranges, ...
        return "not globally routable"
    return None


class AddressGuard:
    """Decides whether the fetcher may connect to an address (the SSRF guard)."""

    def __init__(self, allow_networks: Iterable[str] = ()):
        self.allow = parse_networks(allow_networks)
        # Metadata endpoints open only by their own address (see CLOUD_METADATA).
        self._metadata_allowed = frozenset(
            n.network_address for n in self.allow if n.num_addresses == 1
            and n.network_address in CLOUD_METADATA)

    def refusal(self, address: str) -> str | None:
        """None when ``address`` (an IP literal) may be connected to, else why not."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id names no other host
        reason = address_class(ip)
        if reason is None:
            return None
        targets = [ip] + [x for x in (_embedded_ipv4(ip),) if x is not None]
        if any(t in CLOUD_METADATA for t in targets):
            return None if any(t in self._metadata_allowed for t in targets) else reason
        if any(t in net for net in self.allow for t in targets if t.version == net.version):
            return None
        return reason


@dataclass
class _DnsEntry:
    addresses: tuple[str, ...]
    error: str | None
    expires: float


class DnsCache:
    """Host name -> addresses, looked up once per host per ``ttl_s`` and shared by a worker's threads.

    ``getaddrinfo`` tells no TTL, so one fixed TTL applies. A name that does not exist is remembered
    like an answer (asking again costs the resolver and finds nothing); a temporary failure is not.
    ``ttl_s`` 0 looks every host up each time.
    """

    MAX_ENTRIES = 100_000  # hosts remembered per worker before expired entries are swept

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, _DnsEntry] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.lookups = 0  # resolver calls made (the cache's effect, observable)

    def resolve(self, host: str, port: int) -> tuple[str, ...]:
        """The addresses of ``host`` (IP literals, resolver order, no duplicates).

        Raises:
            DropError: ``dns_error`` when the name does not resolve.
        """
        name = host.lower().rstrip(".")
        if self.ttl_s <= 0:
            entry = self._lookup(name, port)
        else:
            with self._lock:
                if len(self._locks) >= self.MAX_ENTRIES:
                    self._sweep()
                lock = self._locks.setdefault(name, threading.Lock())
            with lock:  # one lookup per host at a time: the others wait for its answer
                entry = self._entries.get(name)
                if entry is None or entry.expires <= self._clock():
                    entry = self._lookup(name, port)
        if entry.error:
            raise DropError("dns_error", f"{host}: {entry.error}")
        return entry.addresses

    def _lookup(self, name: str, port: int) -> _DnsEntry:
        with self._lock:
            self.lookups += 1
        cache = True
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
            entry = _DnsEntry(tuple(dict.fromkeys(str(info[4][0]) for info in infos)), None, 0.0)
        except (socket.gaierror, UnicodeError) as e:
            message = getattr(e, "strerror", None) or str(e)
            cache = getattr(e, "errno", None) in _PERMANENT_DNS_ERRORS
            entry = _DnsEntry((), message, 0.0)
        if not entry.error and not entry.addresses:
            entry = _DnsEntry((), "no address", 0.0)
        entry.expires = self._clock() + self.ttl_s
        if cache and self.ttl_s > 0:
            with self._lock:
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._sweep()
                self._entries[name] = entry
        return entry

    def _sweep(self) -> None:
        """Forget expired hosts (and, when all are fresh, the older half); called holding the lock.
        A lookup in progress for a forgotten host only means that host may be looked up twice."""
        now = self._clock()
        for name in [n for n, e in self._entries.items() if e.expires <= now]:
            del self._entries[name]
        if len(self._entries) >= self.MAX_ENTRIES:
            for name in sorted(self._entries, key=lambda n: self._entries[n].expires)[
                    : len(self._entries) // 2]:
                del self._entries[name]
        for name in [n for n in self._locks if n not in self._entries]:
            del self._locks[name]


_PERMANENT_DNS_ERRORS = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL")
                         if hasattr(socket, n)}


class _Host:
    __slots__ = ("slots", "next_start", "users")

    def __init__(self, concurrency: int):
        self.slots = threading.BoundedSemaphore(concurrency)
        self.next_start = 0.0
        self.users = 0


class HostLimiter:
    """Per-host politeness inside one worker: a concurrency limit, a request rate, and deferral.

    ``slot(host)`` is held around one request (connect, headers, body); it waits for one of the host's
    ``concurrency`` slots, then for the host's next start time, which each start pushes on by
    ``1 / rate`` seconds (``rate`` 0: no spacing) and ``defer`` pushes past a ``Retry-After``.
    """

    MAX_IDLE_HOSTS = 10_000  # idle hosts remembered before they are swept

    def __init__(self, concurrency: int, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.concurrency, self.interval = concurrency, (1.0 / rate if rate > 0 else 0.0)
        self._clock, self._sleep = clock, sleep
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        key = host.lower()
        with self._lock:
            state = self._hosts.get(key)
            if state is None:
                if len(self._hosts) >= self.MAX_IDLE_HOSTS:
                    self._sweep()
                state = self._hosts[key] = _Host(self.concurrency)
            state.users += 1
        try:
            state.slots.acquire()
            try:
                with self._lock:
                    now = self._clock()
                    start = max(now, state.next_start)
                    state.next_start = start + self.interval
                if start > now:
                    self._sleep(start - now)
                yield
            finally:
                state.slots.release()
        finally:
            with self._lock:
                state.users -= 1

    def defer(self, host: str, seconds: float) -> None:
        """No request to ``host`` starts in the next ``seconds`` (it asked for that with Retry-After)."""
        with self._lock:
            state = self._hosts.setdefault(host.lower(), _Host(self.concurrency))
            state.next_start = max(state.next_start, self._clock() + seconds)

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._hosts.items() if s.users == 0 and s.next_start <= now]:
            del self._hosts[key]


# Directives that take a value after a colon; any other "name: ..." names the crawler the rest is for.
_VALUED_DIRECTIVES = frozenset({"max-snippet", "max-image-preview", "max-video-preview",
                                "unavailable_after"})
# Google's "none" is noindex plus nofollow.
_IMPLIED = {"none": ("noindex", "nofollow")}


class RobotsTag:
    """``X-Robots-Tag`` opt-outs for a crawler named ``token``.

    A header value is a comma-separated list of directives, optionally addressed to one crawler as
    ``name: directive, ...`` (several headers may be sent). Directives without a name apply to every
    crawler, as do those addressed to ``*``; named ones apply when the name is ``token``
    (case-insensitive). img2dataset reads the header the same way.
    """

    def __init__(self, directives: Iterable[str], token: str):
        self.directives = frozenset(d.lower() for d in directives)
        self.token = token.lower()

    def opt_out(self, values: Iterable[str]) -> str | None:
        """The first opt-out directive among the header ``values`` that applies to us, or None."""
        if not self.directives:
            return None
        for value in values:
            agent = None
            for item in value.split(","):
                name, colon, rest = item.partition(":")
                name = name.strip().lower()
                if colon and name not in _VALUED_DIRECTIVES:
                    agent, directive = name, rest.strip().lower()
                else:
                    directive = name
                if agent not in (None, "*", self.token):
                    continue
                for d in (directive, *_IMPLIED.get(directive, ())):
                    if d in self.directives:
                        return d
        return None


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or an HTTP-date), or None when it is
    absent or unreadable (then the ordinary backoff applies). A date in the past means now."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT; a date without a zone is read as such
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now())
