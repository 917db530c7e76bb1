"""The embedded local Ray (``pipelines.ray_runtime.ensure_ray``) is not reachable from other machines.

A subprocess starts Ray exactly as ``vlp`` commands do (so it cannot clash with the session Ray of
conftest), runs a task and an actor so that workers exist too, and waits; this test then lists, with
``ss`` (iproute2), the listening sockets of that subprocess's whole process tree and requires every one
to be bound to a loopback address.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
import json, os, sys
import ray
from pipelines.ray_runtime import ensure_ray

assert ensure_ray(""), "ensure_ray did not start a local Ray"

@ray.remote
def task_pid():
    return os.getpid()

@ray.remote
class Actor:
    def pid(self):
        return os.getpid()

actor = Actor.remote()
pids = [ray.get(task_pid.remote()), ray.get(actor.pid.remote())]
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"worker_pids": pids}, f)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
sys.stdin.read()  # hold Ray up until the test closes stdin
ray.shutdown()
"""


def is_loopback(host: str) -> bool:
    """Whether an ``ss`` local-address host (``*``, ``0.0.0.0``, ``[::ffff:127.0.0.1]``, ...) is loopback."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*": every address
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_is_loopback_reads_ss_addresses():
    """The parser the port test relies on: wildcards and routable IPs are not loopback."""
    assert all(map(is_loopback, ["127.0.0.1", "[::1]", "[::ffff:127.0.0.1]", "127.0.0.1%lo"]))
    assert not any(map(is_loopback, ["*", "0.0.0.0", "[::]", "192.0.2.2", "[::ffff:10.0.0.1]"]))


def listening_sockets(pids: set[int]) -> list[tuple[str, str, str]]:
    """(protocol, local address, process name) of every listening TCP/UDP socket owned by ``pids``."""
    out = subprocess.run(["ss", "-Htulnp"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p): name for name, p in re.findall(r'\("([^"]*)",pid=(\d+)', line)}
        if owners.keys() & pids:
            cols = line.split()
            names = ",".join(sorted({owners[p] for p in owners.keys() & pids}))
            found.append((cols[0], cols[4], names))
    return found


@pytest.mark.ray
def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """Every port the local Ray opens (GCS, raylet, workers, agents, dashboard) is bound to loopback."""
    import psutil

    if not shutil.which("ss"):
        pytest.fail("ss is not installed: apt-get install iproute2")
    ray_tmp = tempfile.mkdtemp(prefix="vlpports-", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO)
    ready, log_path = tmp_path / "ready.json", tmp_path / "driver.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ready)], cwd=REPO, env=env,
                                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the driver did not start Ray:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        workers = json.loads(ready.read_text())["worker_pids"]
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        pids = {p.pid for p in tree}
        assert set(workers) <= pids, "the workers are not in the driver's process tree"

        sockets = listening_sockets(pids)
        owners = ",".join(name for _, _, name in sockets)
        # Guard against a vacuous pass: the core servers must be among what was found.
        assert "gcs_server" in owners and "raylet" in owners, sockets
        exposed = [s for s in sockets if not is_loopback(s[1].rsplit(":", 1)[0])]
        assert not exposed, f"listening beyond this machine: {exposed}"
    finally:
        proc.stdin.close()  # the driver shuts Ray down and exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for p in tree:  # anything that outlived the driver (psutil checks it is still that process)
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
