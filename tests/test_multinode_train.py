"""`vlp train` on a real multi-node Ray cluster: the grouped loss groups each node's ranks, and a lost
node is survived by an elastic restart from the last checkpoint.

The cluster (``multinode_ray`` in conftest) is a CPU-less head and two worker nodes of 2 CPUs, each
a ``ray start`` of its own on a loopback address. Four training workers of 0.75 CPU fit two to a
node (a third would need 2.25), and leave 0.5 CPU per node for the input pipeline's tasks. The
driver is the CLI in a subprocess, joined to the cluster by ``RAY_ADDRESS``; MLflow is a SQLite
file, which every node reaches as they share this machine's disk.

One run checks both behaviours of issue 17's part 3, as each needs the other's set-up:

- before the break, with ``loss.group_size: null``, the groups the loss's collectives actually sent
  in (``process_layout/*.json``, gathered from every rank) are ``[0, 1]`` and ``[2, 3]``, one per
  node, and the bytes sent in groups that span nodes (``comm_cross_node_bytes_per_step``) are 0
  while the loss does send (``comm_bytes_per_step`` > 0);
- once a checkpoint exists, one worker node is killed (every process, SIGKILL). With ``min_workers:
  2`` the run restarts from that checkpoint on the node left, records the restart in the same MLflow
  run (``resumed_at_step``, ``world_size``), trains the steps after the checkpoint once and the ones
  before it not again, and ends with exactly the planned samples.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.test_train import BATCH, _train_rows, shards, train_overrides  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 6  # 36 steps on 4 workers: the break lands mid-run on a fast machine too
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _checkpoint_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints Ray Train has committed so far (their ``state.json``)."""
    steps = []
    for entry in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        state = os.path.join(run_dir, entry, "state.json")
        if entry.startswith("checkpoint_") and os.path.exists(state):
            try:
                with open(state) as f:
                    steps.append(json.load(f)["step"])
            except (OSError, ValueError):  # being written
                pass
    return steps


@pytest.mark.timeout(600)
def test_grouped_loss_stays_on_each_node_and_a_lost_node_is_survived(multinode_ray, shards, tmp_path):
    from mlflow import MlflowClient

    cluster = multinode_ray
    nodes = cluster.wait_for_nodes(3)
    worker_ips = sorted(n["ip"] for n in nodes if n["resources"].get("CPU", 0) > 0)
    assert worker_ips == ["127.0.0.3", "127.0.0.4"]
    cmd = [sys.executable, "-m", "pipelines.cli", "train"]
    for override in [*train_overrides(tmp_path, shards), "run_name=nodes",
                     "scaling.num_workers=4", "scaling.min_workers=2", "scaling.cpus_per_worker=0.75",
                     "scaling.max_failures=3", "data.cpus_per_data_task=0.25",
                     "objectives.contrastive.loss.mode=grouped", "objectives.contrastive.loss.group_size=null",
                     f"schedule.epochs={EPOCHS}", "schedule.log_every=1", "schedule.checkpoint_every=6",
                     "tracking.log_checkpoints=false", "tracking.system_metrics=false"]:
        cmd += ["--set", override]
    run_dir = os.path.join(tmp_path, "runs", "nodes")
    log_path = os.path.join(tmp_path, "driver.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=cluster.client_env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def driver_log() -> str:
        with open(log_path, errors="replace") as f:
            return f.read()

    try:
        # A checkpoint every 6 steps, one pass over the data on 4 workers: each is taken after a
        # pass's last step, before the loop sees the pass end (the resume must not take the pass
        # for an empty one). Ray Train keeps a checkpoint once its controller has collected every
        # worker's report of it (it polls them every 2 s); one written just before the break may
        # not be kept. Break at the second (step 12), and at least 5 s after the first.
        deadline, first_seen = time.monotonic() + 300, None
        while True:
            steps = _checkpoint_steps(run_dir)
            if steps and first_seen is None:
                first_seen = time.monotonic()
            if steps and max(steps) >= 12 and time.monotonic() - first_seen >= 5:
                break
            assert proc.poll() is None, f"training ended before the break:\n{driver_log()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint in time:\n{driver_log()[-4000:]}"
            time.sleep(0.2)
        victim = next(w for w in cluster.alive_workers() if w.ip == "127.0.0.4")
        killed = cluster.kill_node(victim)
        assert killed
        code = proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = driver_log()
    assert code == 0, out[-6000:]
    assert "Traceback" not in out.split("[train] summary")[-1]

    run_id = re.search(r"MLflow run\s+(\w+)", out.split("[train] summary")[-1]).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    # The restart is in the run's record: once, from a checkpoint the first attempt wrote, with 2.
    resumed = history("resumed_at_step")
    assert len(resumed) == 1, resumed
    checkpoint_step = int(resumed[0][1])
    assert checkpoint_step >= 6 and checkpoint_step % 6 == 0
    assert history("resumed_world_size") == [(checkpoint_step, 2.0)]
    # No step twice in the final lineage: the 4-worker attempt trained up to the checkpoint (and
    # maybe a few steps past it, lost with the node), the 2-worker one every step after it, once.
    world = history("world_size")
    four = [s for s, w in world if w == 4]
    two = [s for s, w in world if w == 2]
    assert set(range(1, checkpoint_step + 1)) <= set(four)
    assert two == list(range(checkpoint_step + 1, two[-1] + 1)), two
    # ... and exactly the planned samples: EPOCHS passes over the training rows, in global batches
    # of 32 (4 workers) before the checkpoint and 16 after it.
    planned = EPOCHS * (_train_rows(shards) // (4 * BATCH)) * (4 * BATCH)
    assert checkpoint_step * 4 * BATCH + len(two) * 2 * BATCH == planned
    final = max(_checkpoint_steps(run_dir))
    assert final == two[-1]
    assert re.search(rf"^\s+steps\s+{final}$", out, re.MULTILINE), out[-2000:]

    # The grouped loss's groups, as its collectives used them on every rank: one per node.
    layouts = {}
    for artifact in client.list_artifacts(run_id, "process_layout"):
        local = client.download_artifacts(run_id, artifact.path, str(tmp_path / "layouts"))
        with open(local) as f:
            layout = json.load(f)
        layouts[layout["world_size"]] = layout
    first = layouts[4]
    assert first["node_of_rank"] == [0, 0, 1, 1] and first["ranks_by_node"] == [[0, 1], [2, 3]]
    assert first["collective_groups"] == [[0, 1], [2, 3]] and first["cross_node_groups"] == []
    # After the restart the node left holds both ranks: one group, still on one node.
    assert layouts[2]["node_of_rank"] == [0, 0] and layouts[2]["collective_groups"] == [[0, 1]]
    # The loss sent bytes at every step, and none of them in a group spanning nodes.
    sent = history("comm_bytes_per_step")
    assert sent and all(v > 0 for _, v in sent)
    cross = history("comm_cross_node_bytes_per_step")
    assert len(cross) == len(sent) and all(v == 0 for _, v in cross)
