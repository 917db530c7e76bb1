"""HTTP fetching against a real local server: retries, no retry on 4xx, redirects, size caps.

The server listens on 127.0.0.1, which the fetcher's SSRF guard refuses by default: these fetchers open
127.0.0.0/8 (tests/test_fetch_policy.py checks the guard itself)."""

import os

import pytest

from vlp.curation.drops import DropError
from vlp.curation.fetch import FetchConfig, Fetcher
from vlp.data.storage import Storage


@pytest.fixture(scope="module")
def payload(http_server):
    data = os.urandom(5000)
    with open(os.path.join(http_server.root, "blob.bin"), "wb") as f:
        f.write(data)
    return data


def _fetcher(**kw):
    cfg = FetchConfig(**{"timeout_s": 1.0, "retries": 2, "backoff_s": 0.01,
                         "allow_networks": ("127.0.0.0/8",), **kw})
    return Fetcher(cfg, Storage())


def _reason(fetcher, url):
    with pytest.raises(DropError) as e:
        fetcher.fetch(url)
    return e.value.reason


def test_ok_and_redirects_within_the_limit(http_server, payload):
    f = _fetcher(max_redirects=3)
    assert f.fetch(f"{http_server.url}/files/blob.bin") == payload
    assert f.fetch(f"{http_server.url}/redirect/3/blob.bin") == payload
    assert _reason(f, f"{http_server.url}/redirect/4/blob.bin") == "too_many_redirects"


def test_4xx_is_not_retried(http_server):
    assert _reason(_fetcher(), f"{http_server.url}/status/404/a") == "http_4xx"
    assert http_server.hits("/status/404/a") == 1


def test_5xx_is_retried_then_dropped(http_server):
    assert _reason(_fetcher(retries=2), f"{http_server.url}/status/500/b") == "http_5xx"
    assert http_server.hits("/status/500/b") == 3


def test_flaky_server_recovers_within_retries(http_server, payload):
    assert _fetcher(retries=2).fetch(f"{http_server.url}/flaky/2/blob.bin") == payload


def test_timeouts_are_retried_then_dropped(http_server, payload):
    assert _reason(_fetcher(timeout_s=0.3, retries=1), f"{http_server.url}/slow/2/blob.bin") == "http_timeout"
    assert http_server.hits("/slow/2/blob.bin") == 2


def test_size_cap_with_and_without_content_length(http_server):
    f = _fetcher(max_bytes=1000)
    assert _reason(f, f"{http_server.url}/big/5000") == "too_large"
    assert _reason(f, f"{http_server.url}/bigchunked/5000") == "too_large"
    assert len(f.fetch(f"{http_server.url}/big/1000")) == 1000


def test_connection_refused_and_bad_urls():
    from tests.conftest import free_port

    f = _fetcher(retries=0)
    assert _reason(f, f"http://127.0.0.1:{free_port()}/x") == "connection_error"
    assert _reason(f, "http://") in ("invalid_url", "connection_error")


def test_local_files(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    f = _fetcher(max_bytes=2)
    assert _reason(f, str(tmp_path / "missing.jpg")) == "file_not_found"
    assert _reason(f, str(p)) == "too_large"
    assert _fetcher().fetch(str(p)) == b"abc"


def test_local_file_checks_like_fetch_without_reading(tmp_path):
    f = Fetcher(FetchConfig(max_bytes=10), Storage())
    small, big = tmp_path / "a.mp4", tmp_path / "b.mp4"
    small.write_bytes(b"12345")
    big.write_bytes(b"x" * 11)
    assert f.local_file(str(small)) == str(small)
    for path, reason in ((big, "too_large"), (tmp_path / "nope.mp4", "file_not_found"),
                         (tmp_path, "file_not_found")):
        with pytest.raises(DropError) as e:
            f.local_file(str(path))
        assert e.value.reason == reason
        if path != tmp_path:  # fetch agrees on the same files
            with pytest.raises(DropError) as e2:
                f.fetch(str(path))
            assert e2.value.reason == reason
