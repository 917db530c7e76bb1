"""Connecting to Ray, the same way for every job (curation, training, evaluation)."""

from __future__ import annotations

import logging
import os

import ray

# Ray Train V2 re-routes print() on workers through a logger that also echoes to stdout, so every
# progress line would reach the driver twice; our workers print plain progress lines instead.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def ensure_ray(address: str = "") -> bool:
    """Connect to Ray, or start the embedded one; True when this call started it (and must stop it).

    ``address`` wins; else ``RAY_ADDRESS`` (set for Ray job entrypoints); else a new local Ray in this
    process, never a cluster that happens to run on the machine (plain ``ray.init()`` would attach to
    the last ``ray start``). The local Ray's dashboard (Ray Train's controller watchdog queries its
    state API) listens on 127.0.0.1 only.
    """
    if ray.is_initialized():
        return False
    kwargs: dict = {"log_to_driver": True, "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address
    elif not os.environ.get("RAY_ADDRESS"):
        kwargs.update(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
    ray.init(**kwargs)
    return True
