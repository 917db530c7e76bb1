"""``vlp submit`` and ``vlp jobs`` against a real Ray head with token auth, started here on 127.0.0.1.

One head serves the module (starting one takes 10-20 s on 2 cores). It runs ``ray start --head
--block`` in its own session with private ports and temp dir, ``RAY_AUTH_MODE=token`` and a random
token, and is stopped by PID (its process group, then every process of its tree). The CLI runs as a
subprocess with a private ``HOME``, so a developer's ``~/.ray/auth_token`` never stands in for the
token under test. The first tests need no cluster: address and token precedence, and refusing
credentials.
"""

from __future__ import annotations

import io
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from tests.conftest import free_port
from pipelines.cli import build_parser
from pipelines.submit import (DEFAULT_ADDRESS, ClusterConfig, JobConfig, SubmitError,
                             job_config_from_args, submit)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables of the developer's shell that would point the CLI at another cluster or token.
_RAY_CLIENT_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                    "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")


# --- no cluster needed -------------------------------------------------------------------------


def test_address_precedence_flag_then_env_then_default():
    """--address wins over RAY_API_SERVER_ADDRESS, which wins over RAY_ADDRESS; else 127.0.0.1:8265."""
    env = {"RAY_ADDRESS": "http://a:8265", "RAY_API_SERVER_ADDRESS": "http://b:8265"}
    assert ClusterConfig.resolve("http://flag:8265/", environ=env).address == "http://flag:8265"
    assert ClusterConfig.resolve(None, environ=env).address == "http://b:8265"
    assert ClusterConfig.resolve(None, environ={"RAY_ADDRESS": "http://a:8265"}).address == "http://a:8265"
    assert ClusterConfig.resolve(None, environ={}).address == DEFAULT_ADDRESS


def test_token_precedence_follows_ray_and_never_shows_in_repr(tmp_path, monkeypatch):
    """--token-file, then RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token; repr hides it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "flag").write_text("from-flag\n")
    (tmp_path / "path").write_text("from-path")
    full = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "path")}
    assert ClusterConfig.resolve(token_file=str(tmp_path / "flag"), environ=full).token == "from-flag"
    assert ClusterConfig.resolve(environ=full).token == "from-env"
    assert ClusterConfig.resolve(environ={"RAY_AUTH_TOKEN_PATH": str(tmp_path / "path")}).token \
        == "from-path"
    home = ClusterConfig.resolve(environ={})
    assert home.token == "from-home" and home.headers() == {"Authorization": "Bearer from-home"}
    assert "from-home" not in repr(home)
    with pytest.raises(SubmitError, match="cannot read the Ray token file"):
        ClusterConfig.resolve(token_file=str(tmp_path / "missing"), environ={})


def _job(argv: list[str], environ: dict[str, str]) -> JobConfig:
    return job_config_from_args(build_parser().parse_args(["submit", *argv]), environ=environ,
                                err=io.StringIO())


def test_credentials_never_go_into_the_runtime_env(tmp_path):
    """Secret-looking names and URLs with passwords are refused; defaults forward only safe names."""
    caller = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL_S3": "http://s3:9000",
              "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "id", "RAY_AUTH_TOKEN": "t"}
    env = _job(["--working-dir", str(tmp_path), "--env", "TOKENIZERS_PARALLELISM=false", "--", "true"],
               caller).runtime_env()["env_vars"]
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL_S3": "http://s3:9000",
                   "TOKENIZERS_PARALLELISM": "false"}
    for bad in (["--env", "AWS_SECRET_ACCESS_KEY"], ["--env", "MLFLOW_TRACKING_TOKEN=x"],
                ["--env", "DB=postgresql://user:pw@db/mlflow"], ["--env", "DB_PASSWORD=x"],
                ["--env", "HF_TOKEN=x"], ["--env", "AWS_ACCESS_KEY_ID"]):
        with pytest.raises(SubmitError, match="credential") as e:
            _job([*bad, "--working-dir", str(tmp_path), "--", "true"], caller).runtime_env()
        assert "s3cr3t" not in str(e.value) and "pw@" not in str(e.value)
    # A tracking URI with a password is not forwarded by default (and its value is never printed).
    quiet = _job(["--working-dir", str(tmp_path), "--", "true"],
                 {"MLFLOW_TRACKING_URI": "http://u:pw@mlflow:5000"}).runtime_env()
    assert "env_vars" not in quiet


def test_job_spec_file_gives_entrypoint_and_runtime_env_flags_override(tmp_path):
    """A ray_configs/jobs-style spec is accepted; a command after -- and flags replace its parts."""
    spec = tmp_path / "job.yaml"
    spec.write_text("entrypoint: >-\n  vlp train\n  --config x.yaml\nentrypoint_num_cpus: 8\n"
                    f"runtime_env:\n  working_dir: {tmp_path}\n  excludes: [data/]\n"
                    "  env_vars: {PYTHONUNBUFFERED: '1'}\n")
    job = _job(["--runtime-env", str(spec)], {})
    assert job.entrypoint == "vlp train --config x.yaml" and job.entrypoint_num_cpus == 8
    runtime_env = job.runtime_env()
    assert runtime_env["working_dir"] == str(tmp_path) and runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert "data/" in runtime_env["excludes"] and ".venv" in runtime_env["excludes"]
    other = _job(["--runtime-env", str(spec), "--entrypoint-num-cpus", "1", "--", "python", "-c", "print(1)"], {})
    assert other.entrypoint == "python -c 'print(1)'" and other.entrypoint_num_cpus == 1
    spec.write_text("env_var: {A: '1'}\n")  # a plain runtime env with a typo
    with pytest.raises(SubmitError, match="unknown runtime_env keys .*env_var"):
        _job(["--runtime-env", str(spec), "--", "true"], {}).runtime_env()


# --- against a real head -----------------------------------------------------------------------


@dataclass
class RayHead:
    address: str
    token: str
    proc: subprocess.Popen
    dir: str

    def cluster(self) -> ClusterConfig:
        return ClusterConfig(address=self.address, token=self.token, token_source="test")


def _job_api_ready(address: str, token: str) -> bool:
    request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _process_tree(pid: int) -> list[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop the head by PID: its process group, then anything of its tree that outlived it.

    Job entrypoints run in sessions of their own, so the tree is collected before anything is killed.
    """
    import psutil

    tree = _process_tree(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)  # a clean stop can take 30 s; whatever is left is killed below
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    survivors = []
    for pid in tree:
        try:
            p = psutil.Process(pid)
            p.kill()
            survivors.append(p)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(survivors, timeout=10)
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    head_dir = tempfile.mkdtemp(prefix="vlpsub-", dir="/tmp")  # short: Ray's socket paths
    token = secrets.token_hex(32)
    ports = {flag: free_port() for flag in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "node-manager-port", "object-manager-port")}
    env = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_VARS}
    # Ray turns --node-ip-address=127.0.0.1 into the machine's routable IP, and then listens on all
    # interfaces; this flag keeps the loopback IP (see pipelines/ray_runtime.py).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_USAGE_STATS_ENABLED="0", HOME=head_dir)
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
           "--num-cpus=1", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--temp-dir={os.path.join(head_dir, 'ray')}",
           "--min-worker-port=0", "--max-worker-port=0",  # OS-assigned: no range to collide on
           f"--object-store-memory={100 * 1024 * 1024}", "--disable-usage-stats",
           *(f"--{flag}={port}" for flag, port in ports.items())]
    log_path = os.path.join(head_dir, "head.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{ports['dashboard-port']}", token, proc, head_dir)
    try:
        deadline = time.monotonic() + 120
        while not _job_api_ready(head.address, token):
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, errors="replace") as f:
                    pytest.fail(f"the Ray head did not come up:\n{f.read()[-3000:]}")
            time.sleep(0.5)
        yield head
    finally:
        _stop_head(proc)
        shutil.rmtree(head_dir, ignore_errors=True)


def _cli_env(home: str, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _RAY_CLIENT_VARS}
    env.update(HOME=home, PYTHONUNBUFFERED="1")
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


def vlp(head: RayHead, *args: str, token: str | None = "head", home: str,
        timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, against the test head (token="head" means the right one)."""
    env = _cli_env(home, head.token if token == "head" else token)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path):
    """A tiny working dir: one script, plus a .venv folder that must not be uploaded."""
    (tmp_path / "hello.py").write_text(
        "import os\n"
        "print('hello from job', os.environ.get('GREETING'), flush=True)\n"
        "print('venv uploaded:', os.path.exists('.venv'), flush=True)\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big.bin").write_bytes(b"\0" * 1024)
    return tmp_path


@pytest.mark.ray
def test_submit_uploads_the_working_dir_streams_logs_and_exits_0(ray_head, workdir, tmp_path):
    """The happy path through the CLI: logs reach stdout, SUCCEEDED gives 0, nothing secret travels."""
    job_id = f"vlp-ok-{secrets.token_hex(3)}"
    r = vlp(ray_head, "submit", "--address", ray_head.address, "--working-dir", str(workdir),
            "--submission-id", job_id, "--env", "GREETING=bonjour", "--", "python", "hello.py",
            home=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "hello from job bonjour" in r.stdout
    assert "venv uploaded: False" in r.stdout  # the default excludes apply
    assert f"job {job_id} SUCCEEDED" in r.stderr
    assert ray_head.token not in r.stdout + r.stderr

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.address, headers=ray_head.cluster().headers())
    runtime_env = client.get_job_info(job_id).runtime_env
    # conftest puts test S3 credentials in this process's environment: they must not be forwarded.
    assert runtime_env["env_vars"] == {"GREETING": "bonjour"}


@pytest.mark.ray
def test_failing_job_exits_1_with_its_exit_code(ray_head, workdir, tmp_path):
    """A non-zero entrypoint makes the job FAILED and ``vlp submit`` exit 1, naming the exit code."""
    r = vlp(ray_head, "submit", "--address", ray_head.address, "--working-dir", str(workdir), "--",
            "python", "-c", "import sys; print('about to fail', flush=True); sys.exit(3)",
            home=str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "about to fail" in r.stdout
    assert "FAILED" in r.stderr and "exit code 3" in r.stderr


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


@pytest.mark.ray
def test_ctrl_c_detaches_then_stop_ends_the_job_as_stopped(ray_head, workdir, tmp_path):
    """Ctrl-C leaves the job running (exit 130); ``jobs stop`` makes it STOPPED; following exits 130."""
    job_id = f"vlp-sleep-{secrets.token_hex(3)}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "submit", "--address", ray_head.address, "--working-dir",
         str(workdir), "--submission-id", job_id, "--", "python", "-c",
         "import time; print('now' + ' sleeping', flush=True); time.sleep(300)"],
        cwd=REPO, env=_cli_env(str(tmp_path), ray_head.token), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # A shell's background jobs ignore SIGINT, and children inherit that: restore Ctrl-C.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines, deadline = _lines(proc.stdout), time.monotonic() + 120
        while True:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "now sleeping" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert "detached" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    home = str(tmp_path)
    assert "RUNNING" in vlp(ray_head, "jobs", "status", job_id, "--address", ray_head.address,
                            home=home).stdout
    stop = vlp(ray_head, "jobs", "stop", job_id, "--address", ray_head.address, home=home)
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stderr, stop.stderr
    status = vlp(ray_head, "jobs", "status", job_id, "--address", ray_head.address, home=home)
    assert status.returncode == 0 and f"{job_id}  STOPPED" in status.stdout
    follow = vlp(ray_head, "jobs", "logs", job_id, "--follow", "--address", ray_head.address, home=home)
    assert follow.returncode == 130 and "now sleeping" in follow.stdout


@pytest.mark.ray
def test_list_shows_submitted_jobs_with_their_status(ray_head, workdir, tmp_path):
    """``vlp jobs list`` names each submission with its final status."""
    job_id = f"vlp-listed-{secrets.token_hex(3)}"
    job = JobConfig(entrypoint="python hello.py", working_dir=str(workdir), submission_id=job_id)
    assert submit(ray_head.cluster(), job, out=io.StringIO(), err=io.StringIO()) == 0
    r = vlp(ray_head, "jobs", "list", "--address", ray_head.address, home=str(tmp_path))
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "python hello.py" in row
    unknown = vlp(ray_head, "jobs", "status", "no-such-job", "--address", ray_head.address,
                  home=str(tmp_path))
    assert unknown.returncode == 2 and "no job no-such-job" in unknown.stderr


@pytest.mark.ray
def test_requests_without_or_with_a_wrong_token_are_refused_in_one_line(ray_head, workdir, tmp_path):
    """No token, or another cluster's: exit 2 with one ``vlp: error:`` line, no trace, no token shown."""
    missing = vlp(ray_head, "submit", "--address", ray_head.address, "--working-dir", str(workdir),
                  "--", "python", "hello.py", token=None, home=str(tmp_path))
    assert missing.returncode == 2
    [line] = missing.stderr.strip().splitlines()
    assert line.startswith("vlp: error: the Ray cluster at") and "requires an auth token" in line
    wrong = vlp(ray_head, "jobs", "list", "--address", ray_head.address, token="not-the-token",
                home=str(tmp_path))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines() == [
        f"vlp: error: the Ray cluster at {ray_head.address} rejected the token from RAY_AUTH_TOKEN: it "
        "is not this cluster's token (`ray get-auth-token` on the head prints the right one)"]
    assert "not-the-token" not in wrong.stderr
