"""Autoscaling on one machine: the node types of ray_configs/clusters/aws.yaml, shrunk to 1 CPU / 1 GPU,
behind Ray's fake multi-node provider (each "node" is one more raylet on this machine; its GPU is a
logical resource).

Promises: demand only a curation node can meet (CPU plus a sliver of ``data_node``) starts cpu_data
nodes and lands there; what Ray Train asks for with ``use_gpu=True`` and ``accelerator_type="A100"`` (a
placement group of {CPU, GPU, accelerator} bundles) starts a gpu_train node and lands there; once the
demand is gone, the idle workers are removed; all of it with token authentication on, as on the real
cluster; and the test leaves no process behind.

The head runs in its own session (``ray start --block``), the driver in a subprocess of its own (the
test process may hold a Ray session of the conftest fixture). Teardown kills the head's process group,
then every process still in it or carrying this cluster's marker variable, by PID.
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
from collections import Counter

import pytest
import yaml

from pipelines.cluster_config import DATA_NODE_RESOURCE, NODE_TYPES, load_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_CONFIG = os.path.join(ROOT, "ray_configs", "clusters", "aws.yaml")
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head's type
MAX_WORKERS = {"cpu_data": 2, "gpu_train": 1}  # every fake node is a raylet on this 2-core machine
IDLE_TIMEOUT_MIN = 0.1
OBJECT_STORE_BYTES = 100 * 1024**2
MARKER = "VLP_AUTOSCALING_TEST_CLUSTER"


def fake_cluster_config(source: dict, gcs_address: str) -> dict:
    """``source``'s worker node types with every resource shrunk to 1 unit, on the fake provider."""
    types = {FAKE_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name in NODE_TYPES:
        resources = {key: 1 for key, value in source["available_node_types"][name]["resources"].items()
                     if value}
        resources["object_store_memory"] = OBJECT_STORE_BYTES
        types[name] = {"resources": resources, "node_config": {}, "min_workers": 0,
                       "max_workers": MAX_WORKERS[name]}
    return {
        "cluster_name": "vlp-fake",
        "max_workers": sum(MAX_WORKERS.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "launch_multiple": True,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": types,
        "head_node_type": FAKE_HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def cluster_processes(pgid: int, marker: str) -> list[int]:
    """Live processes of one test cluster: in the head's process group, or carrying ``MARKER=marker``.

    Both are needed: Ray puts worker processes in process groups of their own (they keep the marker
    variable), and the agents of fake nodes get an environment without it (they stay in the group).
    """
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            if state == "Z":  # exited, waiting to be reaped: not running
                continue
            if int(pgrp) == pgid:
                found.append(int(entry))
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):  # gone meanwhile, or not ours to read
            pass
    return found


class FakeCluster:
    """A Ray head with the autoscaler on the fake provider, in its own session; stopped by PID."""

    def __init__(self, config_source: dict):
        from tests.conftest import free_port

        self.dir = tempfile.mkdtemp(prefix="vlpas-", dir="/tmp")  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.marker = uuid.uuid4().hex
        self.config_path = os.path.join(self.dir, "cluster.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(fake_cluster_config(config_source, self.address), f)
        token_path = os.path.join(self.dir, "auth_token")
        with open(os.open(token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.client_env = {k: v for k, v in os.environ.items()
                           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.client_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
        self.head_env = dict(self.client_env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                             RAY_TMPDIR=self.dir, RAY_USAGE_STATS_ENABLED="0",
                             **{MARKER: self.marker})
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "head.log")

    def start(self) -> None:
        from tests.conftest import free_port, wait_for_port

        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_cli, "start", "--head", "--block", f"--autoscaling-config={self.config_path}",
               f"--port={self.port}", "--num-cpus=0", "--num-gpus=0",
               f"--object-store-memory={OBJECT_STORE_BYTES}", "--include-dashboard=false",
               f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", f"--temp-dir={os.path.join(self.dir, 'ray')}",
               "--disable-usage-stats"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.head_env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, timeout=60, proc=self.proc)

    def logs(self) -> str:
        parts = []
        monitor = os.path.join(self.dir, "ray", "session_latest", "logs", "monitor.log")
        for path in (self.log_path, monitor):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    parts.append(f"--- {path} (tail)\n" + "".join(f.readlines()[-40:]))
        return "\n".join(parts)

    def stop(self) -> list[int]:
        """Kill the head's process group, then stragglers by marker; returns PIDs that survived."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # Ray drains for up to 30 s: do not wait
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        for pid in cluster_processes(self.proc.pid, self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while (left := cluster_processes(self.proc.pid, self.marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left


def drive(address: str, timeout_s: float) -> dict:
    """The driver (runs in a subprocess): create demand, record where it ran, release it, wait."""
    import ray
    from ray.train import ScalingConfig
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def alive_nodes() -> list[dict]:
        return [{"id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]

    started = time.monotonic()
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    report: dict = {"before": alive_nodes()}

    @ray.remote
    class Probe:
        def where(self) -> tuple[str, str]:
            return os.environ.get("RAY_NODE_TYPE_NAME", ""), ray.get_runtime_context().get_node_id()

    # Curation as recommended for the cluster: a CPU and a sliver of the curation-node marker each.
    data = [Probe.options(num_cpus=1, resources={DATA_NODE_RESOURCE: 0.001}).remote() for _ in range(2)]
    # Training: the bundle TorchTrainer reserves per worker for this ScalingConfig, in a PACK group.
    bundle = ScalingConfig(num_workers=1, use_gpu=True, resources_per_worker={"CPU": 1},
                           accelerator_type="A100")._resources_per_worker_not_none
    pg = placement_group([bundle], strategy="PACK")
    extra = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    trainer = Probe.options(num_cpus=bundle["CPU"], num_gpus=bundle["GPU"], resources=extra,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
    placed = ray.get([a.where.remote() for a in [*data, trainer]], timeout=timeout_s)
    report.update(bundle=bundle, data_on=placed[:2], train_on=placed[2], during=alive_nodes(),
                  scaled_up_s=round(time.monotonic() - started, 1))

    for actor in [*data, trainer]:
        ray.kill(actor)
    remove_placement_group(pg)
    released = time.monotonic()
    while len(alive_nodes()) > 1 and time.monotonic() - released < timeout_s:
        time.sleep(1)
    report.update(after=alive_nodes(), scaled_down_s=round(time.monotonic() - released, 1))
    ray.shutdown()
    return report


def test_fake_config_passes_rays_schema_and_keeps_the_real_resource_names():
    """The autoscaler only logs a config that fails validation (at debug level): check it here."""
    from ray.autoscaler._private.util import validate_config

    source = load_yaml(SOURCE_CONFIG)
    config = fake_cluster_config(source, "127.0.0.1:1")
    validate_config(config)
    for name in NODE_TYPES:
        real = {k for k, v in source["available_node_types"][name]["resources"].items() if v}
        assert set(config["available_node_types"][name]["resources"]) == real | {"object_store_memory"}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(360)
def test_demand_starts_the_matching_node_type_and_idle_nodes_are_removed():
    cluster = FakeCluster(load_yaml(SOURCE_CONFIG))
    survivors = None
    try:
        cluster.start()
        out = subprocess.run(
            [sys.executable, "-m", "tests.test_autoscaling", cluster.address, "120"], check=False, cwd=ROOT,
            env=cluster.client_env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"driver failed:\n{out.stderr[-4000:]}\n{cluster.logs()}"
        report = json.loads(out.stdout.strip().splitlines()[-1])
        running = cluster_processes(cluster.proc.pid, cluster.marker)
        assert cluster.proc.pid in running and len(running) > 3, "the leftover check sees the cluster"
    finally:
        survivors = cluster.stop()
        shutil.rmtree(cluster.dir, ignore_errors=True)
    assert survivors == [], f"processes of the test cluster still running: {survivors}"

    def kinds(nodes: list[dict]) -> list[str]:
        out = []
        for node in nodes:
            r = node["resources"]
            if r.get("GPU") and r.get("accelerator_type:A100") and not r.get(DATA_NODE_RESOURCE):
                out.append("gpu_train")
            elif r.get(DATA_NODE_RESOURCE) and not r.get("GPU"):
                out.append("cpu_data")
            elif not r.get("CPU") and not r.get("GPU"):
                out.append("head")
            else:
                out.append(f"unexpected {r}")
        return sorted(out)

    assert kinds(report["before"]) == ["head"], "min_workers 0: only the head at the start"
    # The curation actors each got a cpu_data node of their own; the training bundle a gpu_train node.
    assert [t for t, _ in report["data_on"]] == ["cpu_data", "cpu_data"]
    assert len({node for _, node in report["data_on"]}) == 2
    assert report["train_on"][0] == "gpu_train"
    assert report["bundle"] == {"CPU": 1, "GPU": 1, "accelerator_type:A100": 0.001}
    # At least those nodes; the v1 autoscaler may briefly launch one more than a type's max_workers
    # while a slow launch is pending, and then terminates it ("max_workers_per_type").
    during = Counter(kinds(report["during"]))
    assert during["head"] == 1 and during["cpu_data"] >= 2 and during["gpu_train"] >= 1, report
    assert set(during) == {"head", "cpu_data", "gpu_train"}, report
    # Demand gone: the idle workers are removed.
    assert kinds(report["after"]) == ["head"], report
    print(f"\nscaled up in {report['scaled_up_s']} s, down in {report['scaled_down_s']} s")


if __name__ == "__main__":
    print(json.dumps(drive(sys.argv[1], float(sys.argv[2]))))
