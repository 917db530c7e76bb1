"""The embedded local Ray keeps idle worker processes (``pipelines.ray_runtime.IDLE_WORKER_KEEP_MS``).

A subprocess starts Ray exactly as ``vlp`` commands do (its own Ray, not conftest's session Ray), runs
more short zero-CPU tasks at once (as shard writes are) than Ray's soft limit of worker processes
(one per CPU; 1 here, through ``RAY_num_workers_soft_limit``), lets their workers sit idle for longer
than Ray's default 1 s, and reports how many are still alive. With Ray's default the raylet kills
those above the soft limit (checked by hand: 1 of 4 left), and the next write pays for a new Python
worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DRIVER = r"""
import json, os, time
import psutil
import ray
from pipelines.ray_runtime import ensure_ray

assert ensure_ray("", dashboard=False), "ensure_ray did not start a local Ray"

@ray.remote(num_cpus=0)
def slow_pid():
    time.sleep(1.5)
    return os.getpid()

# Four zero-CPU tasks at once need several worker processes: more than the soft limit (set to 1 for
# this test, so that it does not depend on the machine's CPU count).
pids = sorted(set(ray.get([slow_pid.remote() for _ in range(4)])))
time.sleep(6)  # idle for 6x Ray's default threshold (the raylet checks every 200 ms)
alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
print(json.dumps({"workers": len(pids), "alive_after_idle": len(alive)}))
ray.shutdown()
"""


def _run_driver(tmp_path, env_extra: dict) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO, **env_extra}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_embedded_ray_keeps_idle_task_workers_for_the_next_tasks(tmp_path):
    result = _run_driver(tmp_path, {"RAY_num_workers_soft_limit": "1"})
    assert result["workers"] > 1, result  # the pool did go past the soft limit
    assert result["alive_after_idle"] == result["workers"], result
