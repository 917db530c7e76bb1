"""Connecting to Ray, the same way for every job (curation, training, evaluation).

Also owns keeping the embedded local Ray off the network: when ``ensure_ray`` starts Ray itself, every
TCP port it opens (GCS, raylet, object manager, workers, agents, dashboard) listens on 127.0.0.1 only
(``tests/test_local_ray_ports.py`` checks this).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

import ray
from ray._private import ray_constants

# How long an idle worker process above Ray's soft limit (one per CPU) lives before the raylet kills
# it; Ray's default is 1 s. Curation's shard writes are short tasks a few seconds apart, next to
# actors that hold a worker each: with the default, every write started a new Python worker (about
# 1 CPU-second of imports for a few tenths of a second of writing). Clusters get the same setting as
# the environment variable RAY_idle_worker_killing_time_threshold_ms (ray_configs/, infra/kuberay/).
IDLE_WORKER_KEEP_MS = 60_000

# Ray Train V2 re-routes print() on workers through a logger that also echoes to stdout, so every
# progress line would reach the driver twice; our workers print plain progress lines instead.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts a local node, make 127.0.0.1 that node's IP, so its servers bind to it.

    Ray's servers listen on all interfaces unless the node IP is 127.0.0.1, and on Linux
    ``ray.init(_node_ip_address="127.0.0.1")`` is turned into the machine's routable IP
    (``services.resolve_ip_for_localhost``). The one switch that keeps the loopback IP is the flag Ray
    uses for single-machine macOS and Windows installs (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``),
    read once at import as ``ray_constants.ENABLE_RAY_CLUSTER``; we set it only for the start, so a
    later ``ray.init(address=...)`` in this process still joins a real cluster with a routable IP.
    The started processes get the node IP as an argument and keep it. Ray is pinned to 2.60.x in
    pyproject.toml; the port test fails if a Ray upgrade changes this.
    """
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ensure_ray(address: str = "", dashboard: bool = True) -> bool:
    """Connect to Ray, or start the embedded one; True when this call started it (and must stop it).

    ``address`` wins; else ``RAY_ADDRESS`` (set for Ray job entrypoints); else a new local Ray in this
    process, never a cluster that happens to run on the machine (plain ``ray.init()`` would attach to
    the last ``ray start``). The local Ray listens on 127.0.0.1 only, its dashboard (Ray Train's
    controller watchdog queries its state API) included. ``dashboard=False`` starts the embedded Ray
    without its dashboard (a curation-only run does not use it, and on a small machine its ten
    processes cost start-up time and CPU that the workers need); it has no effect on an existing
    cluster.
    """
    if ray.is_initialized():
        return False
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs.update(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                      _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS})
        with _loopback_node():
            ray.init(**kwargs)
        return True
    ray.init(**kwargs)
    return True
