"""A test HTTP server with well-behaved and misbehaving endpoints, run as its own process.

    /files/<path>               the file under --root
    /status/<code>/<anything>   that status code
    /flaky/<n>/<path>           503 for the first n requests of this URL, then the file
    /slow/<seconds>/<path>      sleeps, then the file
    /redirect/<n>/<path>        n redirects, then the file
    /redirect-to?url=<url>      one redirect to any URL (another host, a private address, ...)
    /big/<bytes>                a body of that many bytes (announced by Content-Length)
    /bigchunked/<bytes>         the same without Content-Length
    /robots/<path>?tag=<value>  the file with one X-Robots-Tag header per tag parameter
    /retryafter/<n>/<status>/<value>/<path>
                                <status> (429, 503) with Retry-After <value> for the first n requests
                                of this URL, then the file; <value> "date<s>" sends the HTTP-date s
                                seconds from now
    /busy/<group>/<seconds>/<path>
                                holds the request <seconds>, then the file; counts the requests of
                                <group> in flight at once (see /_peak)
    /hang/<token>/<path>        holds the request until /_heal/<token> (at most 120 s), then the file
    /_heal/<token>              releases the requests held by /hang/<token> and serves later ones at once
    /_hits/<url path>           how many times that URL path was requested (JSON)
    /_requests/<url path>       each request of that path: server time (monotonic s), User-Agent, Host
    /_peak/<group>              the most /busy/<group> requests ever in flight at once (JSON)
"""

import argparse
import json
import os
import threading
import time
from collections import Counter, defaultdict
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HITS: Counter = Counter()
REQUESTS: dict = defaultdict(list)
ACTIVE: Counter = Counter()
PEAK: Counter = Counter()
HEALED: dict = defaultdict(threading.Event)
LOCK = threading.Lock()
HANG_LIMIT_S = 120.0  # a held request ends by itself at last, so no thread outlives a test run by long


class Handler(BaseHTTPRequestHandler):
    root = "."
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", length: bool = True, headers=()):
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client left (tests make them leave)
            self.close_connection = True

    def _file(self, rel: str, headers=()):
        path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            return self._send(404, b"not found")
        with open(path, "rb") as f:
            self._send(200, f.read(), headers=headers)

    def _json(self, data):
        return self._send(200, json.dumps(data).encode())

    def do_GET(self):
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        with LOCK:
            HITS[path] += 1
            count = HITS[path]
            REQUESTS[path].append({"t": time.monotonic(), "user_agent": self.headers.get("User-Agent"),
                                   "host": self.headers.get("Host")})
        parts = path.lstrip("/").split("/", 2)
        kind = parts[0]
        if kind == "files":
            return self._file(path[len("/files/"):])
        if kind == "status":
            return self._send(int(parts[1]), b"status")
        if kind == "flaky":
            if count <= int(parts[1]):
                return self._send(503, b"try later")
            return self._file(parts[2])
        if kind == "slow":
            time.sleep(float(parts[1]))
            return self._file(parts[2])
        if kind == "redirect":
            n = int(parts[1])
            target = f"/redirect/{n - 1}/{parts[2]}" if n > 1 else f"/files/{parts[2]}"
            return self._send(302, headers=[("Location", target)])
        if kind == "redirect-to":
            return self._send(302, headers=[("Location", query["url"][0])])
        if kind == "big":
            return self._send(200, b"\0" * int(parts[1]))
        if kind == "bigchunked":
            return self._send(200, b"\0" * int(parts[1]), length=False)
        if kind == "robots":
            return self._file(path[len("/robots/"):],
                              headers=[("X-Robots-Tag", tag) for tag in query.get("tag", [])])
        if kind == "retryafter":
            n, status, value, rel = path[len("/retryafter/"):].split("/", 3)
            if count <= int(n):
                if value.startswith("date"):
                    value = formatdate(time.time() + float(value[4:]), usegmt=True)
                return self._send(int(status), b"later", headers=[("Retry-After", value)])
            return self._file(rel)
        if kind == "busy":
            group, seconds, rel = path[len("/busy/"):].split("/", 2)
            with LOCK:
                ACTIVE[group] += 1
                PEAK[group] = max(PEAK[group], ACTIVE[group])
            try:
                time.sleep(float(seconds))
            finally:
                with LOCK:
                    ACTIVE[group] -= 1
            return self._file(rel)
        if kind == "hang":
            with LOCK:
                healed = HEALED[parts[1]]
            healed.wait(HANG_LIMIT_S)
            return self._file(parts[2])
        if kind == "_heal":
            with LOCK:
                healed = HEALED[parts[1]]
            healed.set()
            return self._json({"healed": parts[1]})
        if kind == "_hits":
            with LOCK:
                n = HITS["/" + path[len("/_hits/"):]]
            return self._json({"hits": n})
        if kind == "_requests":
            with LOCK:
                seen = list(REQUESTS["/" + path[len("/_requests/"):]])
            return self._json({"requests": seen})
        if kind == "_peak":
            with LOCK:
                peak = PEAK[parts[1]]
            return self._json({"peak": peak})
        return self._send(404, b"unknown route")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="a loopback address to listen on")
    args = p.parse_args()
    Handler.root = args.root
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
