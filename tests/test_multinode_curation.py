"""`vlp curate images` on a real multi-node Ray cluster survives losing a node, or a dedup shard.

The cluster (``multinode_ray`` in conftest: a CPU-less head and two worker nodes with the
``data_node`` resource, each a ``ray start`` of its own) runs the job as ``ray_configs/clusters``
does: every curation task and actor asks for ``data_node``, so readers, processors, writers and the
dedup index live on the workers, the nodes that get lost (spot instances). The manifest and the
broken cases' files are on S3 (SeaweedFS), the images to keep on the test HTTP server; the output
goes to S3. The driver is the CLI in a subprocess, joined to the cluster by ``RAY_ADDRESS``.

Each test breaks something once a few parts are committed. The run may then finish (Ray retries the
lost tasks and restarts the lost actors; the dedup shard rebuilds its index from the committed parts)
or stop with one ``vlp: error:`` line that says to resume; ``--resume`` must then finish it. Either
way the output, read back from S3 with plain pyarrow, has every input key exactly once: kept in a
listed shard, or in the drop ledger with its expected reason (kept + dropped = rows read), and one
survivor per group of duplicates.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ALLOW_LOCAL, stop_process
from tests.test_curate_images import _outcomes, assert_outcomes


def on_the_cluster(test):
    """The marks of a test that runs curation on the multi-node cluster."""
    return pytest.mark.ray(pytest.mark.slow(pytest.mark.timeout(480)(test)))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = "s3://vlp-test/mn-raw"
FETCH_DELAY_S = 0.25


@pytest.fixture(scope="module")
def s3_samples(s3_server, http_server, tmp_path_factory):
    """Clean rows, one of every broken case and a group of duplicates: the manifest and the files on
    S3; the rows to keep name their image by URL on the test HTTP server instead, which answers each
    after a fixed delay (``/slow/``), so that the run takes long enough, on a fast machine too, for
    the break to land mid-run. Seed 12 draws no two clean images within the near-duplicate radius
    (other seeds do: then the expected outcomes would be wrong, not the run)."""
    from vlp.data.synthetic import generate_image_text_samples

    samples = generate_image_text_samples(str(tmp_path_factory.mktemp("mn-samples")), 240, seed=12)
    served = os.path.join(http_server.root, "mn-samples")
    shutil.copytree(samples.root, served, dirs_exist_ok=True)
    lines = []
    with open(samples.manifest, "rb") as f:
        for raw in f.read().splitlines():
            try:
                row = json.loads(raw)
            except ValueError:  # the broken lines stay as they are
                lines.append(raw)
                continue
            key = row.get("key", "")
            if samples.expected.get(key) == "kept" or key.startswith("dup_"):
                row["url"] = f"{http_server.url}/slow/{FETCH_DELAY_S}/mn-samples/{row.pop('path')}"
            lines.append(json.dumps(row, ensure_ascii=False).encode())
    storage = s3_server.storage()
    storage.write_bytes_atomic(f"{RAW}/manifest.jsonl", b"\n".join(lines) + b"\n")
    for root, _, files in os.walk(samples.root):
        for name in files:
            local = os.path.join(root, name)
            if local != samples.manifest:
                with open(local, "rb") as f:
                    storage.write_bytes_atomic(f"{RAW}/{os.path.relpath(local, samples.root)}",
                                               f.read())
    return samples


def _command(s3_server, output: str) -> list[str]:
    # Small batches, blocks and shards: many commits. Two fetches at once per worker: with the
    # server's delay, at most about 16 rows/s, whatever the machine. Two processor actors on four CPU
    # slots: a processor lost with its node can restart on the other node.
    sets = [f"storage.s3_endpoint_url={s3_server.endpoint}", ALLOW_LOCAL, "fetch.threads=2",
            "execution.node_resources={data_node: 0.001}", "execution.workers=2",
            "execution.batch_size=4", "input.rows_per_block=8", "output.shard_rows=8",
            "execution.progress_interval_s=2", "execution.stall_timeout_s=90"]
    cmd = [sys.executable, "-m", "pipelines.cli", "curate", "images",
           "--input", f"{RAW}/manifest.jsonl", "--output", output]
    for s in sets:
        cmd += ["--set", s]
    return cmd


class CommittedKeys:
    """The keys in the parts committed to ``output`` so far, read from S3 with plain pyarrow (each
    part once)."""

    def __init__(self, storage, output: str):
        self.storage, self.output = storage, output
        self.parts: set[str] = set()
        self.keys: set[str] = set()

    def refresh(self) -> CommittedKeys:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = self.storage.list_files(f"{self.output}/_parts")
        except (OSError, FileNotFoundError):  # nothing committed yet
            return self
        for uri in sorted(set(records) - self.parts):
            record = json.loads(self.storage.read_bytes(uri))
            for name in (record.get("shard"), record.get("drops_file")):
                if name:
                    data = self.storage.read_bytes(f"{self.output}/{name}")
                    table = pq.read_table(pa.BufferReader(data), columns=["key"])
                    self.keys.update(table.column("key").to_pylist())
            self.parts.add(uri)
        return self


def _run_and_break(cluster, cmd: list[str], committed: CommittedKeys, ready, break_it,
                   timeout: float = 300) -> tuple[int, str, dict]:
    """Run the CLI on the cluster; once ``ready(committed)`` holds, call ``break_it()``; wait for
    the run to end. Returns (exit code, its output, what ``break_it`` returned, with the run's
    seconds and the parts committed at the break)."""
    log_path = os.path.join(cluster.dir, f"driver-{time.monotonic_ns()}.log")
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=cluster.client_env, cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = started + timeout
        while not ready(committed.refresh()):
            if proc.poll() is not None:
                with open(log_path, errors="replace") as f:
                    pytest.fail(f"the run ended (code {proc.returncode}) before anything broke:\n"
                                f"{f.read()[-4000:]}")
            assert time.monotonic() < deadline, "the run did not get far enough in time"
            time.sleep(0.3)
        broken = break_it()
        broken.update(parts_at_break=len(committed.parts),
                      broken_at_s=round(time.monotonic() - started))
        proc.wait(timeout=max(10.0, deadline - time.monotonic()))
        broken["run_s"] = round(time.monotonic() - started)
    finally:
        stop_process(proc)
    with open(log_path, errors="replace") as f:
        return proc.returncode, f.read(), broken


def _early_with_the_original(samples):
    """Ready to break: a few parts committed, among them the original of the duplicate group, whose
    copies come last in the input (so they are checked against the index after the break: only a
    rebuilt index knows the original then)."""
    original = next(k for k in samples.duplicate_groups[0] if not k.startswith("dup_"))
    return lambda committed: len(committed.parts) >= 4 and original in committed.keys


def _assert_broken_early(committed: CommittedKeys, samples) -> None:
    copies = {k for k in samples.duplicate_groups[0] if k.startswith("dup_")}
    assert copies and not copies & committed.keys, "the copies were committed before the break"
    assert len(committed.keys) < len(samples.expected) / 2, "the break came late in the run"


def _finish(cluster, cmd: list[str], code: int, log: str) -> str:
    """A run that stopped must say why in one line and tell to resume; resume it. Returns how the
    run ended, for the test's report."""
    if code == 0:
        return "finished"
    errors = [line for line in log.splitlines() if line.startswith("vlp: error:")]
    assert len(errors) == 1 and "--resume" in errors[0], log[-4000:]
    # No traceback of the driver's own (those of Ray's workers come prefixed with their process).
    assert not [line for line in log.splitlines() if line.startswith("Traceback")], log[-4000:]
    done = subprocess.run(cmd + ["--resume"], env=cluster.client_env, cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming" in done.stderr
    return f"stopped ({errors[0]}), resumed"


def _check_output(storage, output: str, samples) -> dict:
    """Every key once with its expected outcome, counts that add up; returns ``_stats.json``."""
    seen, manifest = _outcomes(output, storage)  # fails on a key written or accounted twice
    assert manifest["status"] == "complete"
    assert_outcomes(seen, samples)
    stats = json.loads(storage.read_bytes(f"{output}/_stats.json"))
    assert stats["rows_read"] == len(samples.expected)
    assert stats["rows_read"] == stats["rows_written"] + stats["rows_dropped"]
    assert stats["rows_written"] == sum(v == "kept" for v in seen.values())
    assert not [f for f in storage.list_files(output) if os.path.basename(f).startswith(".tmp-")]
    return stats


def test_cluster_loss_names_what_was_lost_and_leaves_bugs_alone():
    """The cause named in the one-line error of a run that lost part of the cluster, however Ray Data
    wrapped it; any other error is not turned into a "resume" message."""
    from ray.exceptions import ActorUnavailableError, NodeDiedError, RayTaskError

    from pipelines.curation_job import cluster_loss

    lost = ActorUnavailableError("The actor is temporarily unavailable: connection refused\nmore",
                                 b"\x01" * 16)
    in_a_task = RayTaskError("Write", "Traceback (most recent call last): ...", lost)
    try:
        try:
            raise in_a_task.as_instanceof_cause()
        except RayTaskError as e:
            raise RuntimeError("the dataset failed") from e
    except RuntimeError as e:
        line = cluster_loss(e)
    assert line.startswith("ActorUnavailableError: ") and "connection refused" in line
    assert "\n" not in line and "Traceback" not in line
    assert cluster_loss(NodeDiedError("node 127.0.0.3 died")) == "NodeDiedError: node 127.0.0.3 died"
    bug = RayTaskError("fn", "tb", ValueError("a bug")).as_instanceof_cause()
    assert cluster_loss(bug) is None and cluster_loss(ValueError("a bug")) is None


@on_the_cluster
def test_losing_a_worker_node_mid_run_loses_no_row(multinode_ray, s3_server, s3_samples):
    """SIGKILL every process of the worker node that holds the dedup index, with whatever else runs
    there (a processor, as Ray Data spreads its actors over the nodes; readers, writers): no row is
    lost or written twice, duplicates are still found, and a resume after the end changes nothing."""
    cluster = multinode_ray
    cluster.ensure_workers(2)  # the other worker takes over the lost one's work
    storage = s3_server.storage()
    output = "s3://vlp-test/mn-out-node-loss"
    cmd = _command(s3_server, output)
    committed = CommittedKeys(storage, output)

    def kill_the_dedup_node() -> dict:
        placed = cluster.actor_processes("DedupShard")
        assert len(placed) == 1, f"one DedupShard actor expected on the workers: {placed}"
        node = next(w for w in cluster.workers if w.name in placed)
        processors = cluster.actor_processes("MapWorker(MapBatches(ImageTextProcessor))")
        return {"node": node.name, "processors_there": len(processors.get(node.name, [])),
                "processes_killed": len(cluster.kill_node(node))}

    code, log, broken = _run_and_break(cluster, cmd, committed, _early_with_the_original(s3_samples),
                                       kill_the_dedup_node)
    _assert_broken_early(committed, s3_samples)
    ended = _finish(cluster, cmd, code, log)
    stats = _check_output(storage, output, s3_samples)
    if code == 0:  # the run went on: its dedup shard was lost and rebuilt, and it says so
        assert stats["dedup_shards_lost"] == 1 and "were lost during the run" in log, log[-3000:]
        assert "index rebuilt from" in log
        started = time.monotonic()
        again = subprocess.run(cmd + ["--resume"], env=cluster.client_env, cwd=REPO, check=False,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-4000:]
        broken["noop_resume_s"] = round(time.monotonic() - started)
        assert json.loads(storage.read_bytes(f"{output}/_stats.json"))["rows_read_this_run"] == 0
        _check_output(storage, output, s3_samples)
    print(f"\nnode loss: {ended}; {broken}")


@on_the_cluster
def test_a_killed_dedup_shard_is_rebuilt_from_the_committed_parts(multinode_ray, s3_server,
                                                                 s3_samples):
    """SIGKILL only the dedup index actor's process (its node stays): Ray restarts it, it re-indexes
    the committed rows, and the run finishes with every key once and the copies of a row committed
    before the kill still dropped as duplicates."""
    cluster = multinode_ray
    storage = s3_server.storage()
    output = "s3://vlp-test/mn-out-dedup-loss"
    cmd = _command(s3_server, output)
    committed = CommittedKeys(storage, output)

    def kill_the_dedup_actor() -> dict:
        placed = cluster.actor_processes("DedupShard")
        pids = [pid for found in placed.values() for pid in found]
        assert len(pids) == 1, f"one DedupShard actor expected on the workers: {placed}"
        os.kill(pids[0], signal.SIGKILL)
        return {"node": next(iter(placed)), "pid": pids[0]}

    code, log, broken = _run_and_break(cluster, cmd, committed, _early_with_the_original(s3_samples),
                                       kill_the_dedup_actor)
    _assert_broken_early(committed, s3_samples)
    assert code == 0, log[-4000:]  # a lost actor on a live node is restarted: the run goes on
    stats = _check_output(storage, output, s3_samples)
    assert stats["dedup_shards_lost"] == 1 and "index rebuilt from" in log, log[-4000:]
    print(f"\ndedup shard loss: finished; {broken}")
