"""The team MLflow server of infra/mlflow/, started for real: PostgreSQL (Debian's, initdb and pg_ctl in
a temp folder) as the backend store, SeaweedFS as the S3 artifact store, MLflow's basic-auth app on,
launched by ``infra/mlflow/run_server.sh`` exactly as a deployment runs it. A tiny ``vlp train`` logs to
it with a non-admin user's credentials from the environment.

Training runs through the CLI in a subprocess: it starts its own local Ray, whose workers inherit the
credentials (Ray Train workers are separate processes; the session Ray of the other tests was started
before the credentials existed).
"""

from __future__ import annotations

import base64
import glob
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
import yaml

from tests.conftest import free_port, stop_process, wait_for_port
from tests.test_train import _config, shards  # noqa: F401  (shards is a fixture used below)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SERVER = os.path.join(ROOT, "infra", "mlflow", "run_server.sh")
ARTIFACT_ROOT = "s3://vlp-test/mlflow-artifacts"


def _postgres_binary(name: str) -> str:
    debian = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    found = shutil.which(name) or next(iter(debian), None)
    if not found:
        pytest.fail(f"{name} not found: install Debian's postgresql package (apt-get install "
                    "postgresql)")
    return found


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"the MLflow server needs {package}: pip install '{package}' (test extras)")


@dataclass
class Postgres:
    port: int
    user: str
    password: str

    def uri(self, database: str) -> str:
        # No password in the URI: libpq reads PGPASSWORD, as run_server.sh documents.
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user,
                                password=self.password, dbname=database)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on a free port of 127.0.0.1 with databases ``mlflow`` and ``mlflow_auth``.

    initdb refuses to run as root: as root, the server runs as the ``postgres`` user (or ``nobody``).
    """
    _require("psycopg2", "psycopg2-binary")  # MLflow's PostgreSQL store
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    root = tempfile.mkdtemp(prefix="vlppg-", dir="/tmp")  # short: it holds the Unix socket too
    run_as: list[str] = []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", account.pw_name, "--"]
    password = secrets.token_hex(16)
    data, log = os.path.join(root, "data"), os.path.join(root, "postgres.log")
    postmaster_pid = None
    try:
        pwfile = os.path.join(root, "pwfile")
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(password)
        if run_as:
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        made = subprocess.run([*run_as, initdb, "-D", data, "-U", "vlp", f"--pwfile={pwfile}",
                               "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"],
                              check=False, capture_output=True, text=True, cwd=root)
        os.unlink(pwfile)
        assert made.returncode == 0, made.stderr[-2000:]
        port = free_port()
        started = subprocess.run(
            [*run_as, pg_ctl, "start", "-D", data, "-l", log, "-w", "-t", "60",
             "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1"],
            check=False, capture_output=True, text=True, cwd=root)
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            with open(os.path.join(data, "postmaster.pid")) as f:
                postmaster_pid = int(f.readline())
        assert started.returncode == 0, _tail(log) or started.stderr
        server = Postgres(port=port, user="vlp", password=password)
        conn = server.connect("postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
            cur.execute("CREATE DATABASE mlflow_auth")
        conn.close()
        yield server
    finally:
        if postmaster_pid is not None:
            subprocess.run([*run_as, pg_ctl, "stop", "-D", data, "-m", "fast", "-w", "-t", "30"],
                           check=False, capture_output=True, cwd=root)
            if _alive(postmaster_pid):
                os.kill(postmaster_pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _tail(path: str, chars: int = 4000) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class MlflowServer:
    url: str
    admin: tuple[str, str]

    def request(self, path: str, body: dict | None = None, auth: tuple[str, str] | None = None):
        """A REST call; returns (status, parsed JSON or text)."""
        req = urllib.request.Request(self.url + path, method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def create_user(self, username: str) -> tuple[str, str]:
        password = secrets.token_hex(16)
        status, body = self.request("/api/2.0/mlflow/users/create",
                                    {"username": username, "password": password}, auth=self.admin)
        assert status == 200, body
        return username, password


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3_server, tmp_path_factory):
    """infra/mlflow/run_server.sh on a free port: PostgreSQL stores, SeaweedFS artifacts, basic auth."""
    _require("boto3", "boto3")  # MLflow's S3 artifact store
    _require("flask_wtf", "mlflow[auth]")  # the basic-auth app
    port = free_port()
    admin = ("admin", secrets.token_hex(16))
    env = dict(
        os.environ,
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        MLFLOW_BACKEND_STORE_URI=postgres.uri("mlflow"),
        MLFLOW_AUTH_DATABASE_URI=postgres.uri("mlflow_auth"),
        PGPASSWORD=postgres.password,
        MLFLOW_ARTIFACTS_DESTINATION=ARTIFACT_ROOT,
        MLFLOW_S3_ENDPOINT_URL=s3_server.endpoint,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_AUTH_ADMIN_USERNAME=admin[0],
        MLFLOW_AUTH_ADMIN_PASSWORD=admin[1],
        MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port), MLFLOW_WORKERS="1",
        TMPDIR=str(tmp_path_factory.mktemp("mlflow-server")),
    )
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    log_path = os.path.join(env["TMPDIR"], "mlflow.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["bash", RUN_SERVER], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = MlflowServer(url=f"http://127.0.0.1:{port}", admin=admin)
    try:
        try:
            wait_for_port(port, timeout=120, proc=proc)
            deadline = time.monotonic() + 60
            while server.request("/health")[0] != 200:
                assert time.monotonic() < deadline, "the MLflow server never became healthy"
                time.sleep(0.5)
        except BaseException:
            print(_tail(log_path))  # pytest shows it with the failure
            raise
        yield server
    finally:
        stop_process(proc)


def test_a_training_run_logs_to_the_team_server_postgres_s3_and_basic_auth(
        tmp_path, shards, mlflow_server, postgres, s3_server, cli_env):  # noqa: F811
    from mlflow import MlflowClient

    from vlp.config import to_dict

    trainer = mlflow_server.create_user("vlp-train")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(_config(
        tmp_path, shards, "run_name=team-server", "schedule.max_steps=4",
        "tracking.experiment=vlp-team"))))
    env = dict(cli_env)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    command = [sys.executable, "-m", "pipelines.cli", "train", "--config", str(recipe),
               "--set", f"tracking.tracking_uri={mlflow_server.url}"]

    # Without credentials the server refuses the driver before any Ray worker starts.
    refused = subprocess.run(command, env=env, check=False, capture_output=True, text=True,
                             timeout=180)
    assert refused.returncode == 2, refused.stderr[-2000:]  # one clear line, no traceback
    assert "vlp: error: MLflow at" in refused.stderr and "Traceback" not in refused.stderr
    assert "401" in refused.stderr or "Unauthorized" in refused.stderr, refused.stderr[-2000:]

    env.update(MLFLOW_TRACKING_USERNAME=trainer[0], MLFLOW_TRACKING_PASSWORD=trainer[1])
    trained = subprocess.run(command, env=env, check=False, capture_output=True, text=True,
                             timeout=480)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-4000:]

    # The run, read back through the server with credentials (the admin's here).
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = mlflow_server.admin
    try:
        client = MlflowClient(mlflow_server.url)
        experiment = client.get_experiment_by_name("vlp-team")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED" and run.info.run_name == "team-server"
        params = run.data.params
        assert params["data.batch_size"] == "8" and params["scaling.num_workers"] == "2"
        for key in ("loss/total", "lr", "eval/retrieval/mean_recall"):
            assert key in run.data.metrics, key
        assert any(k.startswith("system/") for k in run.data.metrics)  # rank 0's system metrics
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not the client's S3
        downloaded = client.download_artifacts(run.info.run_id, "eval.json", str(tmp_path))
        served_eval = json.loads(_tail(downloaded, chars=1 << 20))
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]

    # ...stored in PostgreSQL,
    with postgres.connect("mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM params WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone()[0] == len(run.data.params)
        cur.execute("SELECT count(DISTINCT key) FROM metrics WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone()[0] == len(run.data.metrics)
        cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone()[0] == "FINISHED"
    with postgres.connect("mlflow_auth") as conn, conn.cursor() as cur:
        cur.execute("SELECT username, is_admin FROM users ORDER BY username")
        assert cur.fetchall() == [("admin", True), ("vlp-train", False)]

    # ...with its artifacts in the S3 bucket,
    storage = s3_server.storage()
    prefix = f"{ARTIFACT_ROOT}/{experiment.experiment_id}/{run.info.run_id}/artifacts"
    stored = {path[len(prefix) + 1:] for path in storage.list_files(prefix)}
    assert {"eval.json", "checkpoints/final/model.pt", "dataset/_manifest.json"} <= stored, stored
    assert json.loads(storage.read_bytes(f"{prefix}/eval.json")) == served_eval

    # ...and nothing without valid credentials.
    search = "/api/2.0/mlflow/experiments/search?max_results=10"
    assert mlflow_server.request(search)[0] == 401
    assert mlflow_server.request(search, auth=(trainer[0], "wrong-password"))[0] == 401
    assert mlflow_server.request(search, auth=trainer)[0] == 200
    status, _ = mlflow_server.request("/api/2.0/mlflow/users/create",
                                      {"username": "intruder", "password": secrets.token_hex(16)},
                                      auth=trainer)
    assert status == 403  # only an admin creates users
