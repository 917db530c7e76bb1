"""A multi-node Ray cluster on this one machine, for tests that need real nodes, and to lose one.

Each node is one ``ray start --block`` in a session of its own, on a loopback address of its own (the
head on 127.0.0.2, workers on 127.0.0.3, 127.0.0.4, ...; Ray would turn 127.0.0.1 into the machine's
routable address), with every port chosen free, its own ``--temp-dir`` and token authentication (a
random token in a file of the cluster's folder, named by ``RAY_AUTH_TOKEN_PATH``; nothing goes to
``~/.ray``). Ray Data and Ray Train see separate nodes. With a node IP other than 127.0.0.1, Ray's
servers listen on all interfaces (``pipelines/ray_runtime.py``'s loopback switch also refuses worker
nodes): the token is what guards them, for the minutes the cluster lives.

Every process of a node carries ``VLP_TEST_RAY_NODE=<cluster>:<node>`` in its environment (Ray
workers inherit the raylet's, and put themselves in process groups of their own), so a node is found,
and killed, by its ``ray start`` process group plus that marker: ``kill_node`` is a machine dying,
``stop`` ends everything this module started, by PID. Never ``ray stop``: other Ray processes share
the machine.

Drivers run as subprocesses with ``client_env`` (``RAY_ADDRESS``, the token): the test process may
hold a Ray session of its own (the conftest ``ray_cluster`` fixture), and a process joins one cluster.
``python -m tests.ray_cluster ADDRESS N TIMEOUT`` is such a driver: it waits until ``N`` nodes are
alive and prints them as JSON.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

MARKER = "VLP_TEST_RAY_NODE"
HEAD_IP = "127.0.0.2"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables of the developer's shell that would point Ray at another cluster or token.
_RAY_CLIENT_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                    "RAY_AUTH_MODE")
# A killed node is declared dead after about period x threshold (Ray's defaults: 3 s x 5); 1 s x 5
# here, so that a lost node's work moves on within seconds, with a time-out long enough that a node
# of a busy 2-core machine is not declared dead by mistake.
_FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                       "RAY_health_check_failure_threshold": "5"}


class RayStartUnavailable(RuntimeError):
    """``ray start`` cannot run on this machine at all (the only reason to skip)."""


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


@dataclass
class RayNode:
    """One ``ray start --block`` process and everything it started."""

    name: str
    ip: str
    proc: subprocess.Popen
    temp_dir: str
    log_path: str
    marker: str

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        return state, int(pgrp)
    except (OSError, ValueError):
        return None


def marked_processes(pgids: set[int], marker_prefix: str) -> list[int]:
    """Live processes in one of ``pgids``, or whose ``MARKER`` starts with ``marker_prefix``."""
    needle = f"{MARKER}={marker_prefix}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        stat = _proc_stat(pid)
        if stat is None or stat[0] == "Z":  # gone, or exited and waiting to be reaped
            continue
        if stat[1] in pgids:
            found.append(pid)
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(var.startswith(needle) for var in f.read().split(b"\0")):
                    found.append(pid)
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _kill_all(pids: list[int], timeout: float = 15.0) -> list[int]:
    """SIGKILL every pid at once (so that none is re-parented and missed); returns those still
    running after ``timeout``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if (s := _proc_stat(p)) is not None and s[0] != "Z"]
    return left


class LocalRayCluster:
    """A head and worker nodes on this machine, started and stopped by PID."""

    def __init__(self, worker_cpus: float = 1, worker_resources: dict | None = None,
                 object_store_bytes: int = 80 * 1024**2, node_env: dict | None = None):
        """``worker_cpus``, ``worker_resources``: what each worker node offers (logical CPUs may
        exceed the machine's cores); ``object_store_bytes``: each node's object store;
        ``node_env``: variables every node's processes get (Ray's settings)."""
        self.id = uuid.uuid4().hex[:12]
        self.worker_cpus, self.worker_resources = worker_cpus, dict(worker_resources or {})
        self.dir = tempfile.mkdtemp(prefix="vlpmn-", dir="/tmp")  # short: Ray's socket paths
        self.object_store_bytes = object_store_bytes
        self.token_path = os.path.join(self.dir, "auth_token")
        with open(os.open(self.token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.port = _free_port()
        self.address = f"{HEAD_IP}:{self.port}"
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []
        self._next_ip = 3
        base = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_VARS}
        base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path,
                    RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)
        self._node_env = dict(base, **(node_env or {}))
        self.client_env = dict(base, RAY_ADDRESS=self.address)

    # --- starting -------------------------------------------------------------------------------

    def _start(self, name: str, ip: str, args: list[str], env_extra: dict) -> RayNode:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        if not os.path.exists(ray_cli):
            raise RayStartUnavailable(f"no `ray` program beside {sys.executable}")
        temp_dir = os.path.join(self.dir, name)
        os.makedirs(temp_dir)
        marker = f"{self.id}:{name}"
        ports = {flag: _free_port() for flag in (
            "node-manager-port", "object-manager-port", "metrics-export-port",
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port")}
        cmd = [ray_cli, "start", "--block", f"--node-ip-address={ip}", f"--temp-dir={temp_dir}",
               f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats",
               "--min-worker-port=0", "--max-worker-port=0",  # OS-assigned: no range to collide on
               *(f"--{flag}={port}" for flag, port in ports.items()), *args]
        log_path = os.path.join(self.dir, f"{name}.log")
        env = dict(self._node_env, **env_extra, **{MARKER: marker})
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                raise RayStartUnavailable(f"cannot run {ray_cli}: {e}") from e
        return RayNode(name, ip, proc, temp_dir, log_path, marker)

    def start_head(self, num_cpus: float = 0) -> RayNode:
        """The head: GCS, no dashboard (nothing here uses it; on 2 cores its processes cost start-up
        time), ``num_cpus`` CPUs (0: drivers' tasks and actors go to the workers, as on the real
        clusters of ``ray_configs/clusters``)."""
        self.head = self._start("head", HEAD_IP, [
            "--head", f"--port={self.port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            "--include-dashboard=false", f"--dashboard-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}"], _FAST_HEALTH_CHECKS)
        from tests.conftest import wait_for_port

        try:
            wait_for_port(self.port, timeout=90, proc=self.head.proc, host=HEAD_IP)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"the Ray head did not come up: {e}\n{self.head.log_tail()}") from e
        return self.head

    def add_worker(self) -> RayNode:
        """Start a worker node on the next loopback address (does not wait for it: see
        ``wait_for_nodes``)."""
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        node = self._start(f"worker{self._next_ip - 4}", ip, [
            f"--address={self.address}", f"--num-cpus={self.worker_cpus}", "--num-gpus=0",
            f"--resources={json.dumps(self.worker_resources)}"], {})
        self.workers.append(node)
        return node

    def ensure_workers(self, count: int) -> None:
        """Start workers until ``count`` are running (replacing lost ones, as an autoscaler would),
        and wait for them."""
        missing = count - len(self.alive_workers())
        for _ in range(missing):
            self.add_worker()
        if missing > 0:
            self.wait_for_nodes(1 + count)

    def alive_workers(self) -> list[RayNode]:
        return [w for w in self.workers if w.proc.poll() is None]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        """Wait until ``count`` nodes are alive (head included); returns them (``ray.nodes()``)."""
        for node in [self.head, *self.alive_workers()]:
            if node is not None and node.proc.poll() is not None:
                raise RuntimeError(f"Ray node {node.name} exited early:\n{node.log_tail()}")
        done = subprocess.run([sys.executable, "-m", "tests.ray_cluster", self.address, str(count),
                               str(timeout)], env=self.client_env, cwd=REPO, check=False,
                              capture_output=True, text=True, timeout=timeout + 60)
        if done.returncode != 0:
            tails = "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in [self.head, *self.workers])
            raise RuntimeError(f"{count} Ray nodes did not come up:\n{done.stderr[-3000:]}\n{tails}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    # --- processes ------------------------------------------------------------------------------

    def node_processes(self, node: RayNode) -> list[int]:
        return marked_processes({node.proc.pid}, node.marker)

    def processes(self) -> list[int]:
        """Every live process of the cluster (all nodes, their workers included)."""
        nodes = [n for n in [self.head, *self.workers] if n is not None]
        return marked_processes({n.proc.pid for n in nodes}, f"{self.id}:")

    def actor_processes(self, class_name: str) -> dict[str, list[int]]:
        """PIDs of the worker processes running an actor of ``class_name``, by node name (Ray titles
        an actor's process ``ray::<Class>`` or ``ray::<Class>.<method>``)."""
        found: dict[str, list[int]] = {}
        for node in [n for n in [self.head, *self.workers] if n is not None]:
            for pid in self.node_processes(node):
                title = _cmdline(pid)
                if title == f"ray::{class_name}" or title.startswith(f"ray::{class_name}."):
                    found.setdefault(node.name, []).append(pid)
        return found

    def kill_node(self, node: RayNode) -> list[int]:
        """SIGKILL every process of ``node`` at once, as if its machine died; returns their PIDs."""
        pids = self.node_processes(node)
        left = _kill_all(pids)
        node.proc.wait(timeout=10)
        if left:
            raise RuntimeError(f"processes of node {node.name} survived SIGKILL: {left}")
        return pids

    def stop(self) -> list[int]:
        """Kill every node (workers, then the head) by PID; returns PIDs still running after it."""
        for node in [*self.workers, self.head]:
            if node is None:
                continue
            _kill_all(self.node_processes(node), timeout=5)
            node.proc.wait(timeout=10)
        return _kill_all(self.processes(), timeout=10)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_and_list(address: str, count: int, timeout: float) -> list[dict]:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= count:
                return [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"],
                         "resources": n["Resources"]} for n in alive]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {count} Ray nodes alive after {timeout} s")
            time.sleep(0.5)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(_wait_and_list(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
