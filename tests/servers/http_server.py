"""A test HTTP server with well-behaved and misbehaving endpoints, run as its own process.

    /files/<path>               the file under --root
    /status/<code>/<anything>   that status code
    /flaky/<n>/<path>           503 for the first n requests of this URL, then the file
    /slow/<seconds>/<path>      sleeps, then the file
    /redirect/<n>/<path>        n redirects, then the file
    /big/<bytes>                a body of that many bytes (announced by Content-Length)
    /bigchunked/<bytes>         the same without Content-Length
    /_hits/<url path>           how many times that URL path was requested (JSON)
"""

import argparse
import json
import os
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HITS: Counter = Counter()
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    root = "."
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: bytes = b"", length: bool = True):
        self.send_response(code)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _file(self, rel: str):
        path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            return self._send(404, b"not found")
        with open(path, "rb") as f:
            self._send(200, f.read())

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        with LOCK:
            HITS[path] += 1
            count = HITS[path]
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
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if kind == "big":
            return self._send(200, b"\0" * int(parts[1]))
        if kind == "bigchunked":
            return self._send(200, b"\0" * int(parts[1]), length=False)
        if kind == "_hits":
            with LOCK:
                n = HITS["/" + path[len("/_hits/"):]]
            return self._send(200, json.dumps({"hits": n}).encode())
        return self._send(404, b"unknown route")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    Handler.root = args.root
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
