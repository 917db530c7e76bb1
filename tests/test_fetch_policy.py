"""The crawler's manners against real local HTTP servers: opt-outs, Retry-After, per-host limits, the
DNS cache, the SSRF guard and the user-agent it sends.

Times are the server's own records of when each request arrived (never the test's wall clock).
"""

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import start_http_server
from vlp.config import ConfigError, load_config
from vlp.curation.config import CurationConfig
from vlp.curation.drops import DropError
from vlp.curation.fetch import DEFAULT_OPT_OUT_DIRECTIVES, FetchConfig, Fetcher, default_user_agent
from vlp.data.storage import Storage

LOCAL = ("127.0.0.0/8",)


@pytest.fixture(scope="module")
def blob(http_server):
    """A fresh file on the server: (its name, its bytes). Each test fetches its own, so the server's
    per-path records start empty."""
    def make():
        name = f"policy-{uuid.uuid4().hex[:10]}.bin"
        data = os.urandom(3000)
        with open(os.path.join(http_server.root, name), "wb") as f:
            f.write(data)
        return name, data
    return make


@pytest.fixture(scope="module")
def second_server(http_root):
    """The same server program on 127.0.0.2: another loopback host, so that the guard can let one
    server through and refuse the other."""
    yield from start_http_server(http_root, host="127.0.0.2")


def _fetcher(**kw):
    return Fetcher(FetchConfig(**{"timeout_s": 2.0, "retries": 2, "backoff_s": 0.01,
                                  "allow_networks": LOCAL, **kw}), Storage())


def _reason(fetcher, url):
    with pytest.raises(DropError) as e:
        fetcher.fetch(url)
    return e.value.reason


# --- opt-outs and the user-agent -------------------------------------------------------------------

@pytest.mark.parametrize("tags, opted_out", [
    (["noai"], True),
    (["noimageai"], True),
    (["noindex, nofollow"], True),
    (["NoImageIndex"], True),
    (["none"], True),                                   # Google's none = noindex, nofollow
    (["vlp-curate: noai"], True),                       # addressed to our token
    (["*: noimageai"], True),
    (["nofollow", "noimageai"], True),                  # the second of two headers
    (["otherbot: noai"], False),                        # addressed to another crawler
    (["otherbot: noindex", "nofollow"], False),
    (["max-image-preview: large, nofollow"], False),    # a valued directive is no crawler name
    (["unavailable_after: 25 Jun 2030 15:00:00 GMT"], False),
    ([], False),
])
def test_x_robots_tag_opt_outs_drop_the_row(http_server, blob, tags, opted_out):
    name, data = blob()
    query = "&".join(f"tag={t}" for t in tags)
    url = f"{http_server.url}/robots/{name}?{query}"
    if opted_out:
        assert _reason(_fetcher(), url) == "opted_out"
    else:
        assert _fetcher().fetch(url) == data


def test_opt_outs_follow_the_configured_token_and_directives(http_server, blob):
    name, data = blob()
    url = f"{http_server.url}/robots/{name}?tag=mybot: noai"
    assert _fetcher().fetch(url) == data  # "mybot" is not us by default
    assert _reason(_fetcher(user_agent_token="mybot"), url) == "opted_out"
    assert _fetcher(opt_out_directives=()).fetch(f"{http_server.url}/robots/{name}?tag=noai") == data
    assert _reason(_fetcher(opt_out_directives=("noarchive",)),
                   f"{http_server.url}/robots/{name}?tag=noarchive") == "opted_out"
    assert FetchConfig().opt_out_directives == DEFAULT_OPT_OUT_DIRECTIVES == (
        "noai", "noimageai", "noindex", "noimageindex")


def test_user_agent_names_the_crawler_and_no_made_up_url(http_server, blob):
    name, _ = blob()
    _fetcher().fetch(f"{http_server.url}/files/{name}")
    sent = http_server.requests(f"/files/{name}")[-1]["user_agent"]
    from importlib.metadata import version

    assert sent == default_user_agent("vlp-curate") == f"vlp-curate/{version('vlp')}"
    assert "http" not in sent
    own = "vlp-curate/0.1 (+https://example.org/our-crawl)"
    _fetcher(user_agent=own).fetch(f"{http_server.url}/files/{name}")
    assert http_server.requests(f"/files/{name}")[-1]["user_agent"] == own


@pytest.mark.parametrize("override, message", [
    ("fetch.user_agent=somebot/1.0", "must contain fetch.user_agent_token"),
    ("fetch.user_agent_token=my bot", "user_agent_token"),
    ("fetch.allow_networks=[127.0.0.0/8, 10.0.0.0/33]", "allow_networks[1]"),
    ("fetch.per_host_concurrency=0", "per_host_concurrency"),
    ("fetch.per_host_rate=-1", "per_host_rate"),
])
def test_bad_fetch_settings_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(CurationConfig, None, [override])


# --- Retry-After --------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, value, at_least", [
    (429, "2", 2.0),
    (503, "1", 1.0),
    # An HTTP-date has whole seconds: "now + 2 s" truncated is more than 1 s away.
    (429, "date2", 1.0),
])
def test_retry_after_is_waited_for_before_the_next_attempt(http_server, blob, status, value,
                                                            at_least):
    name, data = blob()
    path = f"/retryafter/1/{status}/{value}/{name}"
    assert _fetcher(max_retry_after_s=10).fetch(f"{http_server.url}{path}") == data
    first, second = http_server.requests(path)
    assert second["t"] - first["t"] >= at_least


def test_retry_after_beyond_the_bound_is_a_drop_without_asking_again(http_server, blob):
    name, _ = blob()
    path = f"/retryafter/1/429/3600/{name}"
    assert _reason(_fetcher(max_retry_after_s=5), f"{http_server.url}{path}") == "retry_after_too_long"
    assert http_server.hits(path) == 1


def test_429_on_every_attempt_is_rate_limited(http_server, blob):
    name, _ = blob()
    path = f"/retryafter/9/429/0/{name}"
    assert _reason(_fetcher(retries=2), f"{http_server.url}{path}") == "rate_limited"
    assert http_server.hits(path) == 3


# --- per-host concurrency and rate --------------------------------------------------------------------

def test_per_host_concurrency_is_a_limit_per_host(http_server, blob):
    """Two requests at once per host: 8 requests to one host never overlap more than 2 (and do reach
    2), while two hosts (127.0.0.1 and localhost) together reach 4."""
    name, _ = blob()
    fetcher = _fetcher(per_host_concurrency=2, threads=16)
    one, two = f"one-{name}", f"two-{name}"
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(fetcher.fetch, [f"{http_server.url}/busy/{one}/0.4/{name}"] * 8))
    assert http_server.peak(one) == 2
    both = [f"http://{host}:{http_server.port}/busy/{two}/0.4/{name}"
            for host in ("127.0.0.1", "localhost") for _ in range(6)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(fetcher.fetch, both))
    assert http_server.peak(two) == 4


def test_per_host_rate_spaces_request_starts(http_server, blob):
    name, _ = blob()
    fetcher = _fetcher(per_host_rate=5.0, per_host_concurrency=8)
    path = f"/files/{name}"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(fetcher.fetch, [f"{http_server.url}{path}"] * 4))
    times = sorted(r["t"] for r in http_server.requests(path))
    assert len(times) == 4
    # 5 per second: starts 0.2 s apart (less the jitter of the loopback between client and server)
    assert all(b - a >= 0.15 for a, b in zip(times, times[1:]))
    assert times[-1] - times[0] >= 0.55


# --- DNS ----------------------------------------------------------------------------------------------

def test_a_name_that_does_not_resolve_is_a_dns_error():
    fetcher = _fetcher(retries=2)
    assert _reason(fetcher, "http://name.invalid/a.jpg") == "dns_error"
    assert fetcher.dns.lookups == 1  # not retried


def test_dns_is_looked_up_once_per_host_per_ttl(http_server, blob):
    name, data = blob()
    cached = _fetcher()
    urls = [f"http://localhost:{http_server.port}/files/{name}?n={i}" for i in range(4)]
    for url in urls:
        assert cached.fetch(url) == data
        cached._http.clear()  # new connections each time: each one asks the resolver (or cache)
    assert cached.dns.lookups == 1
    uncached = _fetcher(dns_cache_ttl_s=0)
    for url in urls:
        assert uncached.fetch(url) == data
        uncached._http.clear()
    assert uncached.dns.lookups == 4


# --- the SSRF guard -----------------------------------------------------------------------------------

def test_loopback_is_refused_by_default_with_no_request_sent(http_server, blob):
    name, data = blob()
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
        url = f"http://{host}:{http_server.port}/files/{name}"
        assert _reason(Fetcher(FetchConfig(retries=0), Storage()), url) == "blocked_address"
    assert http_server.hits(f"/files/{name}") == 0
    # opened on purpose: fetched, and the request names the host of the URL although the
    # connection went to the address the fetcher checked
    assert _fetcher().fetch(f"http://localhost:{http_server.port}/files/{name}") == data
    assert http_server.requests(f"/files/{name}")[-1]["host"] == f"localhost:{http_server.port}"


def test_a_redirect_to_loopback_is_refused_with_the_guard_on(http_server, second_server, blob):
    """The URL is on an allowed host (127.0.0.2); its redirect points at 127.0.0.1."""
    name, data = blob()
    target = f"{http_server.url}/files/{name}"
    url = f"{second_server.url}/redirect-to?url={target}"
    guarded = _fetcher(allow_networks=("127.0.0.2/32",))
    assert _reason(guarded, url) == "blocked_address"
    assert http_server.hits(f"/files/{name}") == 0
    assert second_server.hits("/redirect-to") == 1
    assert _fetcher(allow_networks=("127.0.0.0/8",)).fetch(url) == data  # guard open for 127/8
    assert http_server.hits(f"/files/{name}") == 1


def test_a_redirect_to_the_metadata_endpoint_is_refused(http_server):
    url = f"{http_server.url}/redirect-to?url=http://169.254.169.254/latest/meta-data/"
    # 127/8 is open, so only the hop to 169.254.169.254 can be refused
    assert _reason(_fetcher(retries=0), url) == "blocked_address"
    for networks in ((), ("169.254.0.0/16",), ("0.0.0.0/0", "::/0"), ("169.254.169.0/24",)):
        with pytest.raises(DropError) as e:
            _fetcher(allow_networks=networks).resolve_checked("169.254.169.254")
        assert e.value.reason == "blocked_address" and "metadata" in e.value.detail
    # Only its own address opens it. Checked on the guard's decision, not by connecting: a test must
    # not talk to a real metadata service where one answers.
    opened = _fetcher(allow_networks=("169.254.169.254/32",))
    assert opened.resolve_checked("169.254.169.254") == ("169.254.169.254",)
    with pytest.raises(DropError):
        opened.resolve_checked("169.254.170.2")


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.0.1", "172.16.5.5", "169.254.1.1",
                                     "224.0.0.1", "0.0.0.0", "240.0.0.1", "::1", "fe80::1",
                                     "fc00::1", "100.64.0.1"])
def test_non_public_addresses_are_refused(address):
    with pytest.raises(DropError) as e:
        Fetcher(FetchConfig(), Storage()).resolve_checked(address)
    assert e.value.reason == "blocked_address"


def test_public_addresses_pass_the_guard():
    fetcher = Fetcher(FetchConfig(), Storage())
    for address in ("93.184.215.14", "2606:4700:4700::1111"):
        assert fetcher.resolve_checked(address) == (address,)


# --- schemes and TLS ----------------------------------------------------------------------------------

def test_only_http_https_and_s3_urls_are_fetched(http_server, tmp_path):
    fetcher = _fetcher(retries=0)
    for url in ("file:///etc/passwd", "ftp://example.org/a.jpg", "gopher://x/", "FILE:///etc/hosts"):
        assert _reason(fetcher, url) == "unsupported_scheme"
        with pytest.raises(DropError) as e:
            fetcher.local_file(url)
        assert e.value.reason == "unsupported_scheme"
    assert _reason(fetcher, f"{http_server.url}/redirect-to?url=file:///etc/passwd") == \
        "unsupported_scheme"
    local = tmp_path / "a.bin"
    local.write_bytes(b"abc")
    assert fetcher.fetch(str(local)) == b"abc"  # plain paths stay local files


def test_tls_errors_are_their_own_reason(http_server):
    # TLS spoken to a plain HTTP server: the handshake fails
    assert _reason(_fetcher(retries=0), f"https://127.0.0.1:{http_server.port}/files/x") == "tls_error"
