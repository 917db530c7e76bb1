"""``vlp submit`` and ``vlp jobs``: a command line in, a Ray job out, followed to its end.

This module owns the path from a laptop (or CI) to a Ray cluster's job API:

- :class:`ClusterConfig`: where the job API is (``--address``, else ``RAY_API_SERVER_ADDRESS`` or
  ``RAY_ADDRESS``, else ``http://127.0.0.1:8265``) and the token sent with every request;
- :class:`JobConfig`: the entrypoint, its runtime env (working dir with ``excludes``, pip packages,
  environment variables) and the resources the entrypoint itself reserves;
- following a job's logs and mapping how it ended to an exit code;
- the ``submit`` and ``jobs`` parsers and their handlers (:func:`add_parsers`, :func:`run`), which
  :mod:`pipelines.cli` wires in.

Token: Ray 2.60 clusters can require a bearer token on their job API (``RAY_AUTH_MODE=token``). It
is read from ``--token-file``, else ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` names,
else ``~/.ray/auth_token`` (Ray's own order), and sent as ``Authorization: Bearer``; it is never
printed. A refused request ends with one line saying which of these to fix.

Credentials never travel with a job. Ray stores a job's entrypoint and runtime env in the cluster and
shows them to anyone who can open its dashboard, so variable names that look like secrets (``*SECRET*``,
``*TOKEN*``, ``*PASSWORD*``, ``*ACCESS_KEY*``, ...) and URLs carrying a password are refused: the
cluster's nodes or pods get credentials from their own environment or secret store (a Kubernetes
Secret on the Ray pods, an instance role). By default only ``MLFLOW_TRACKING_URI`` and
``AWS_ENDPOINT_URL*`` are forwarded from the caller's environment.

Exit codes of ``vlp submit`` and ``vlp jobs logs --follow``: 0 the job SUCCEEDED, 1 it FAILED, 130 it
was STOPPED (``vlp jobs stop``), or the caller detached with Ctrl-C while the job keeps running; 2 a
problem the caller can fix (address, token, flags), printed as one ``vlp: error:`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, TextIO
from urllib.parse import urlsplit

import yaml

from pipelines.cluster_config import JobSpec, check_runtime_env, load_job_spec
from vlp.config import ConfigError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Ray's JobSubmissionClient lets these override the address it is given; we resolve them ourselves
# (so that --address wins) and hide them while the client is built.
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")

# Never uploaded: environments, caches, local run outputs (they can be gigabytes; Ray refuses packages
# over 512 MiB). Ray also honours the directory's .gitignore and .rayignore.
DEFAULT_EXCLUDES = (
    ".venv", "venv", ".git", ".bench", ".whl", ".gl", "__pycache__", "*.pyc", "*.egg-info",
    ".pytest_cache", ".ruff_cache", ".mypy_cache", "build", "dist", "quickstart", "mlruns",
    "mlartifacts", "mlflow.db", "runs", "benchmarks/results",
)
FORWARDED_ENV_VARS = ("MLFLOW_TRACKING_URI",)
FORWARDED_ENV_PREFIXES = ("AWS_ENDPOINT_URL",)
# Matched as whole parts of a name (HF_TOKEN, AWS_SECRET_ACCESS_KEY), so TOKENIZERS_PARALLELISM passes.
_SECRET_NAME = re.compile(r"(^|_)(SECRETS?|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIALS?|PRIVATE_KEY|"
                          r"API_KEY|ACCESS_KEY|ACCOUNT_KEY|SESSION_KEY)(_|$)", re.I)
_URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.I)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_REQ_COMMENT = re.compile(r"(^|\s)#.*$")

EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
EXIT_DETACHED = 130
TERMINAL = frozenset(EXIT_CODES)


class SubmitError(Exception):
    """A problem the caller can fix (address, token, flags, unknown job): one line, exit code 2."""


# --- configs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    """A cluster's job API and the token that opens it.

    Attributes:
        address: the job API (dashboard) URL, e.g. ``http://127.0.0.1:8265`` or ``https://ray.example``.
        token: the bearer token, or None to send none; kept out of ``repr`` so it never reaches a log.
        token_source: where the token came from, for error messages (``RAY_AUTH_TOKEN``, a path, ...).
    """

    address: str = DEFAULT_ADDRESS
    token: str | None = field(default=None, repr=False)
    token_source: str = "none"

    @classmethod
    def resolve(cls, address: str | None = None, token_file: str | None = None,
                environ: Mapping[str, str] | None = None) -> ClusterConfig:
        """Apply the documented precedence for the address and the token.

        Raises:
            SubmitError: a token file that was named cannot be read or is empty.
        """
        env = os.environ if environ is None else environ
        address = address or next((env[k] for k in ADDRESS_ENV_VARS if env.get(k)), DEFAULT_ADDRESS)
        token, source = None, "none"
        if token_file:
            token, source = _read_token(token_file, "--token-file"), token_file
        elif env.get("RAY_AUTH_TOKEN", "").strip():
            token, source = env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
        elif env.get("RAY_AUTH_TOKEN_PATH"):
            token, source = _read_token(env["RAY_AUTH_TOKEN_PATH"], "RAY_AUTH_TOKEN_PATH"), \
                env["RAY_AUTH_TOKEN_PATH"]
        else:
            default = DEFAULT_TOKEN_FILE.expanduser()
            if default.is_file():
                token, source = _read_token(str(default), "the default token file"), str(default)
        return cls(address=address.rstrip("/"), token=token, token_source=source)

    def headers(self) -> dict[str, str]:
        """HTTP headers for every request (Ray's job API reads ``Authorization: Bearer``)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def shown_address(self) -> str:
        """The address without any ``user:password@`` part, for messages."""
        parts = urlsplit(self.address)
        if parts.hostname and "@" in parts.netloc:
            return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
        return self.address


def _read_token(path: str, what: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise SubmitError(f"cannot read the Ray token file {path} ({what}): {e.strerror}") from None
    if not token:
        raise SubmitError(f"the Ray token file {path} ({what}) is empty")
    return token


@dataclass
class JobConfig:
    """One job: what runs, with which runtime env, reserving what.

    Attributes:
        entrypoint: the shell command the cluster runs (its working directory is ``working_dir``).
        working_dir: local folder uploaded with the job (or a remote package URI); None uploads nothing
            (the code must then be in the cluster's image).
        excludes: gitignore-style patterns left out of the upload.
        pip: packages installed for this job on top of the cluster's image (slow: a virtualenv per job).
        env_vars: environment for the entrypoint; no credentials (see the module docstring).
        extra_runtime_env: any other runtime env fields, from ``--runtime-env FILE``.
        submission_id: the job's ID; Ray makes one (``raysubmit_...``) when None.
        entrypoint_num_cpus: CPUs reserved for the entrypoint process itself (not its Ray tasks).
        entrypoint_num_gpus: GPUs reserved for the entrypoint process itself.
        entrypoint_resources: custom resources reserved for the entrypoint, e.g. ``{"head": 1}``.
        entrypoint_memory: bytes of memory reserved for the entrypoint.
        metadata: free-form string labels stored with the job.
    """

    entrypoint: str
    working_dir: str | None = "."
    excludes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    pip: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    extra_runtime_env: dict[str, Any] = field(default_factory=dict)
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_resources: dict[str, float] | None = None
    entrypoint_memory: int | None = None
    metadata: dict[str, str] | None = None

    def runtime_env(self) -> dict[str, Any]:
        """The runtime env to submit, after checking it carries no credentials.

        Raises:
            SubmitError: a missing working dir, a field Ray rejects, or a variable or URL that looks
                like a credential.
        """
        check_no_credentials(self.env_vars, "the job's environment")
        if _URL_WITH_PASSWORD.search(self.entrypoint):
            raise SubmitError("the entrypoint contains a URL with a password; Ray shows entrypoints "
                              "in its dashboard: give credentials to the cluster's environment instead")
        env: dict[str, Any] = dict(self.extra_runtime_env)
        if self.working_dir is not None:
            if "://" not in self.working_dir and not os.path.isdir(self.working_dir):
                raise SubmitError(f"working dir {self.working_dir} is not a folder")
            env["working_dir"] = self.working_dir
            env["excludes"] = list(dict.fromkeys([*env.get("excludes", []), *self.excludes]))
        if self.pip:
            env["pip"] = list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        for key, value in env.items():  # e.g. a pip index URL with user:password@
            if _URL_WITH_PASSWORD.search(json.dumps(value, default=str)):
                raise SubmitError(f"the runtime env's {key} contains a URL with a password; Ray "
                                  "shows runtime envs in its dashboard: give credentials to the "
                                  "cluster's environment instead")
        _check_with_ray(env)
        return env


def _check_with_ray(runtime_env: dict[str, Any]) -> None:
    """Ray's own validation, before anything is uploaded (the client runs it after the upload);
    the same check the job-spec loader (``pipelines.cluster_config.load_job_spec``) runs on files."""
    try:
        check_runtime_env(runtime_env)
    except ConfigError as e:
        raise SubmitError(f"invalid runtime env: {str(e).strip().splitlines()[0]}") from None


def check_no_credentials(env_vars: Mapping[str, str], where: str) -> None:
    """Refuse variables that look like credentials, by name or by a password inside a URL.

    Raises:
        SubmitError: naming the variable (never its value).
    """
    for name, value in env_vars.items():
        if _SECRET_NAME.search(name) or _URL_WITH_PASSWORD.search(str(value)):
            raise SubmitError(
                f"{name} in {where} looks like a credential; Ray shows a job's runtime env to anyone "
                "who can reach its dashboard, so credentials must come from the cluster's own "
                "environment or secret store (e.g. a Kubernetes Secret on the Ray pods)")


def forwarded_env(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The caller's variables forwarded by default, and the names skipped as credential-bearing."""
    names = [n for n in environ if n in FORWARDED_ENV_VARS or n.startswith(FORWARDED_ENV_PREFIXES)]
    kept, skipped = {}, []
    for name in sorted(names):
        if not environ[name]:
            continue
        if _URL_WITH_PASSWORD.search(environ[name]):
            skipped.append(name)
        else:
            kept[name] = environ[name]
    return kept, skipped


def job_config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                         err: TextIO = sys.stderr) -> JobConfig:
    """Build the job from ``vlp submit`` flags: defaults < the ``--runtime-env`` file < flags.

    The file is a plain runtime env (what ``ray job submit --runtime-env`` takes) or a job spec
    (``ray_configs/jobs/*.yaml``: ``entrypoint``, ``runtime_env``, ``entrypoint_*``, ``metadata``); a
    command after ``--`` replaces the spec's entrypoint.

    Raises:
        SubmitError: no entrypoint, an unreadable file, a malformed flag, or a credential.
    """
    env = os.environ if environ is None else environ
    spec = _read_job_spec(args.runtime_env) if args.runtime_env else JobSpec(entrypoint="")
    extra = dict(spec.runtime_env)
    command = list(args.entrypoint)
    if command[:1] == ["--"]:
        command = command[1:]
    # One argument is taken as a shell command line; several are quoted so each stays one argument.
    entrypoint = (command[0] if len(command) == 1 else shlex.join(command)) if command \
        else spec.entrypoint
    if not entrypoint:
        raise SubmitError("nothing to submit: put the command after --, e.g. vlp submit -- vlp train "
                          "--config ray_configs/train_quickstart.yaml, or give a job spec with an "
                          "entrypoint (--runtime-env ray_configs/jobs/train_quickstart.yaml)")

    env_vars, skipped = forwarded_env(env)
    for name in skipped:
        print(f"vlp: not forwarding {name}: its URL carries a password (the cluster must set it)",
              file=err)
    file_env = extra.pop("env_vars", None) or {}
    if not isinstance(file_env, dict):
        raise SubmitError(f"{args.runtime_env}: env_vars must be a mapping")
    check_no_credentials(file_env, args.runtime_env)
    env_vars.update({str(k): str(v) for k, v in file_env.items()})
    env_vars.update(_parse_env_flags(args.env, env))

    working_dir = args.working_dir or extra.pop("working_dir", None) or os.getcwd()
    excludes = [*DEFAULT_EXCLUDES, *(extra.pop("excludes", None) or [])]
    # --pip/--requirements replace the file's pip field; without them it stays as the file has it.
    pip = _read_requirements(args.requirements) if args.requirements else list(args.pip or [])

    def pick(flag: Any, key: str) -> Any:
        return flag if flag is not None else getattr(spec, key)

    return JobConfig(
        entrypoint=entrypoint, working_dir=working_dir, excludes=excludes, pip=pip,
        env_vars=env_vars, extra_runtime_env=extra, submission_id=args.submission_id,
        entrypoint_num_cpus=pick(args.entrypoint_num_cpus, "entrypoint_num_cpus"),
        entrypoint_num_gpus=pick(args.entrypoint_num_gpus, "entrypoint_num_gpus"),
        entrypoint_resources=pick(_parse_resources(args.entrypoint_resources),
                                  "entrypoint_resources"),
        entrypoint_memory=spec.entrypoint_memory, metadata=spec.metadata)


def _read_job_spec(path: str) -> JobSpec:
    """The ``--runtime-env`` file through the one job-spec loader, its errors as ``SubmitError``."""
    try:
        return load_job_spec(path)
    except OSError as e:
        raise SubmitError(f"cannot read --runtime-env {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SubmitError(f"--runtime-env {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except ConfigError as e:
        raise SubmitError(f"--runtime-env {e}") from None


def _parse_env_flags(flags: list[str] | None, environ: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for flag in flags or []:
        name, sep, value = flag.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise SubmitError(f"--env {flag}: expected KEY=VALUE or KEY (copied from this shell)")
        if not sep:
            if name not in environ:
                raise SubmitError(f"--env {name}: {name} is not set in this shell")
            value = environ[name]
        out[name] = value
    check_no_credentials(out, "--env")
    return out


def _parse_resources(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError
        return {str(k): float(v) for k, v in value.items()}
    except (ValueError, TypeError):
        raise SubmitError(f"--entrypoint-resources {text!r}: expected a JSON object of numbers, "
                          'e.g. \'{"head": 1}\'') from None


def _read_requirements(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SubmitError(f"cannot read requirements file {path}: {e.strerror}") from None
    # pip's rule: "#" starts a comment at the line start or after whitespace (not in "...#egg=x").
    return [s for s in (_REQ_COMMENT.sub("", line).strip() for line in lines) if s]


# --- talking to the cluster --------------------------------------------------------------------


@contextmanager
def _cluster_errors(cluster: ClusterConfig, job_id: str | None = None) -> Iterator[None]:
    """Turn the job client's exceptions into one-line :class:`SubmitError` messages."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise SubmitError(_auth_message(cluster)) from None
    except (ConnectionError, requests.RequestException) as e:
        raise SubmitError(f"cannot reach the Ray job API at {cluster.shown_address} "
                          f"({type(e).__name__}): is the cluster up, and is --address (or "
                          "RAY_ADDRESS) its dashboard URL?") from None
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if job_id and "404" in first:
            raise SubmitError(f"no job {job_id} on the cluster at {cluster.shown_address} "
                              "(vlp jobs list shows its jobs)") from None
        raise SubmitError(f"the request to {cluster.shown_address} failed: {first}") from None


def _auth_message(cluster: ClusterConfig) -> str:
    where = f"the Ray cluster at {cluster.shown_address}"
    if cluster.token is None:
        return (f"{where} requires an auth token and none was found: set RAY_AUTH_TOKEN (or "
                "RAY_AUTH_TOKEN_PATH) or pass --token-file; `ray get-auth-token` on the head prints it")
    return (f"{where} rejected the token from {cluster.token_source}: it is not this cluster's "
            "token (`ray get-auth-token` on the head prints the right one)")


def connect(cluster: ClusterConfig) -> JobSubmissionClient:
    """A job client for the cluster (it checks the connection and the token on the way).

    Raises:
        SubmitError: the cluster cannot be reached or refused the token.
    """
    from ray.job_submission import JobSubmissionClient

    parts = urlsplit(cluster.address)
    if cluster.token and parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        print(f"vlp: warning: sending the Ray token to {cluster.shown_address} over plain http; "
              "outside a private network use https or a tunnel (kubectl port-forward, ssh -L)",
              file=sys.stderr)
    # Ray's client logs each upload and websocket close at INFO; vlp prints its own status lines.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hidden = {k: os.environ.pop(k) for k in ADDRESS_ENV_VARS if k in os.environ}
    try:
        with _cluster_errors(cluster):
            return JobSubmissionClient(cluster.address, headers=cluster.headers())
    finally:
        os.environ.update(hidden)


def submit(cluster: ClusterConfig, job: JobConfig, *, wait: bool = True,
           out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Submit the job; with ``wait``, stream its logs to ``out`` and return its exit code.

    Status lines go to ``err`` so that ``out`` carries only the job's own output.

    Raises:
        SubmitError: see :func:`connect`; also a rejected submission (duplicate ID, package too big).
    """
    runtime_env = job.runtime_env()
    client = connect(cluster)
    env_names = ", ".join(sorted(runtime_env.get("env_vars", {}))) or "none"
    print(f"vlp: submitting `{job.entrypoint}` to {cluster.shown_address} (working dir "
          f"{runtime_env.get('working_dir', 'none')}; env: {env_names})", file=err, flush=True)
    with _cluster_errors(cluster):
        job_id = client.submit_job(
            entrypoint=job.entrypoint, runtime_env=runtime_env, submission_id=job.submission_id,
            entrypoint_num_cpus=job.entrypoint_num_cpus, entrypoint_num_gpus=job.entrypoint_num_gpus,
            entrypoint_resources=job.entrypoint_resources, entrypoint_memory=job.entrypoint_memory,
            metadata=job.metadata)
    print(f"vlp: submitted job {job_id}; `vlp jobs logs {job_id} --follow` follows it, "
          f"`vlp jobs stop {job_id}` stops it", file=err, flush=True)
    if not wait:
        print(job_id, file=out, flush=True)
        return 0
    return follow(client, cluster, job_id, out=out, err=err)


def follow(client: JobSubmissionClient, cluster: ClusterConfig, job_id: str, *,
           out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Stream a job's logs until it ends; print how it ended and return the exit code."""
    try:
        status, info = _follow_to_end(client, cluster, job_id, out, err)
    except KeyboardInterrupt:
        print(f"\nvlp: detached; job {job_id} keeps running: `vlp jobs logs {job_id} --follow` "
              f"reattaches, `vlp jobs stop {job_id}` stops it", file=err, flush=True)
        return EXIT_DETACHED
    print(f"vlp: job {job_id} {status}{_ending_detail(info)}", file=err, flush=True)
    return EXIT_CODES[status]


def _follow_to_end(client: JobSubmissionClient, cluster: ClusterConfig, job_id: str, out: TextIO,
                   err: TextIO) -> tuple[str, Any]:
    try:
        asyncio.run(_tail(client, job_id, out))
    except Exception as e:  # the stream is a convenience: the job's status decides the outcome
        if _is_auth_refusal(e):
            raise SubmitError(_auth_message(cluster)) from None
        print(f"vlp: lost the log stream ({type(e).__name__}); waiting for the job to end "
              f"(`vlp jobs logs {job_id}` prints the logs)", file=err, flush=True)
    with _cluster_errors(cluster, job_id):
        status = _wait_for_end(client, job_id)
        return status, client.get_job_info(job_id)


async def _tail(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _is_auth_refusal(e: Exception) -> bool:
    return getattr(e, "status", None) in (401, 403) or type(e).__name__ == "AuthenticationError"


def _wait_for_end(client: JobSubmissionClient, job_id: str, timeout: float | None = None) -> str:
    """Poll until the job's status is terminal (the log stream can close a moment before)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id))
        if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(1.0)


def _ending_detail(info: Any) -> str:
    parts = []
    if info.start_time and info.end_time:
        parts.append(f"after {(info.end_time - info.start_time) / 1000:.0f}s")
    code = getattr(info, "driver_exit_code", None)
    if str(info.status) == "FAILED":
        if code is not None:
            parts.append(f"entrypoint exit code {code}")
        elif info.message:
            parts.append(info.message.strip().splitlines()[0])
    return f" ({'; '.join(parts)})" if parts else ""


# --- vlp jobs ----------------------------------------------------------------------------------


def job_status(cluster: ClusterConfig, job_id: str, out: TextIO = sys.stdout) -> int:
    """Print one job's status, entrypoint, times and (when it failed) why."""
    client = connect(cluster)
    with _cluster_errors(cluster, job_id):
        info = client.get_job_info(job_id)
    print(f"{job_id}  {info.status}{_ending_detail(info)}", file=out)
    print(f"  entrypoint: {info.entrypoint}", file=out)
    if info.start_time:
        print(f"  started:    {_when(info.start_time)}", file=out)
    if info.message and str(info.status) in ("FAILED", "STOPPED"):
        print(f"  message:    {info.message.strip().splitlines()[0]}", file=out)
    return 0


def job_logs(cluster: ClusterConfig, job_id: str, *, follow_logs: bool = False,
             out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print a job's logs so far, or (``follow_logs``) stream them and exit as ``vlp submit`` does."""
    client = connect(cluster)
    if follow_logs:
        with _cluster_errors(cluster, job_id):
            client.get_job_status(job_id)  # an unknown ID fails here with a clear line
        return follow(client, cluster, job_id, out=out, err=err)
    with _cluster_errors(cluster, job_id):
        out.write(client.get_job_logs(job_id))
    out.flush()
    return 0


def stop_job(cluster: ClusterConfig, job_id: str, *, wait: bool = True, timeout: float = 60.0,
             err: TextIO = sys.stderr) -> int:
    """Ask the cluster to stop a job and (``wait``) report its final status.

    Returns:
        0 once the job has ended (or had already), 1 if it is still running after ``timeout`` s.
    """
    client = connect(cluster)
    with _cluster_errors(cluster, job_id):
        if not client.stop_job(job_id):
            print(f"vlp: job {job_id} had already ended: {client.get_job_status(job_id)}", file=err)
            return 0
        if not wait:
            print(f"vlp: asked job {job_id} to stop", file=err)
            return 0
        status = _wait_for_end(client, job_id, timeout=timeout)
    if status not in TERMINAL:
        print(f"vlp: job {job_id} is still {status} after {timeout:.0f}s", file=err)
        return 1
    print(f"vlp: job {job_id} {status}", file=err)
    return 0


def list_jobs(cluster: ClusterConfig, out: TextIO = sys.stdout) -> int:
    """Print the cluster's submitted jobs, oldest first (drivers started without submit are left out)."""
    client = connect(cluster)
    with _cluster_errors(cluster):
        jobs = [j for j in client.list_jobs() if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0)
    rows = [(j.submission_id, str(j.status), _when(j.start_time) if j.start_time else "-",
             _duration(j.start_time, j.end_time), _shorten(j.entrypoint, 60)) for j in jobs]
    header = ("SUBMISSION ID", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    return 0


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _duration(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    seconds = ((end or time.time() * 1000) - start) / 1000
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# --- command line ------------------------------------------------------------------------------

_EXIT_HELP = ("exit codes: 0 job SUCCEEDED, 1 FAILED, 130 STOPPED or detached (Ctrl-C; the job keeps "
              "running), 2 a problem to fix here (address, token, flags)")


def _cluster_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--address", help="the cluster's job API (dashboard) URL; default "
                       f"$RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, else {DEFAULT_ADDRESS}")
    flags.add_argument("--token-file", help="file holding the cluster's auth token; default "
                       "$RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token")
    return flags


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``jobs`` to the ``vlp`` subcommands."""
    cluster = _cluster_flags()
    submit_p = sub.add_parser(
        "submit", parents=[cluster], help="run a command on a Ray cluster as a Ray job",
        description="Submit the command after -- as a Ray job (this folder uploaded as its working "
                    "dir), follow its logs and exit with its outcome. Credentials are never sent "
                    "with the job: the cluster provides them.", epilog=_EXIT_HELP)
    submit_p.add_argument("--submission-id", help="the job's ID (default: one Ray makes)")
    submit_p.add_argument("--working-dir", help="folder uploaded with the job (default: this one, "
                          "without .venv, .git, run outputs)")
    deps = submit_p.add_mutually_exclusive_group()
    deps.add_argument("--pip", nargs="+", action="extend", metavar="PKG",
                      help="packages installed for the job on top of the cluster's image")
    deps.add_argument("--requirements", metavar="FILE", help="requirements file, as --pip")
    submit_p.add_argument("--env", action="append", metavar="KEY=VALUE",
                          help="environment variable for the job; KEY alone copies it from this "
                          "shell (repeatable; MLFLOW_TRACKING_URI and AWS_ENDPOINT_URL* are "
                          "forwarded by default; credentials are refused)")
    submit_p.add_argument("--entrypoint-num-cpus", type=float, metavar="N",
                          help="CPUs reserved for the entrypoint process itself")
    submit_p.add_argument("--entrypoint-num-gpus", type=float, metavar="N",
                          help="GPUs reserved for the entrypoint process itself")
    submit_p.add_argument("--entrypoint-resources", metavar="JSON",
                          help='custom resources for the entrypoint, e.g. \'{"head": 1}\'')
    submit_p.add_argument("--runtime-env", metavar="FILE.yaml",
                          help="a runtime env, or a job spec (ray_configs/jobs/*.yaml: entrypoint, "
                          "runtime_env, entrypoint_*); flags and a command after -- override it")
    submit_p.add_argument("--no-wait", action="store_true",
                          help="print the job ID and return once submitted")
    submit_p.add_argument("entrypoint", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                          help="the command to run, e.g. -- vlp train --config FILE (optional "
                          "with a job spec that has one)")

    jobs_p = sub.add_parser("jobs", help="status, logs, stop and list of submitted Ray jobs",
                            epilog=_EXIT_HELP)
    actions = jobs_p.add_subparsers(dest="action", required=True)
    status_p = actions.add_parser("status", parents=[cluster], help="one job's status")
    status_p.add_argument("job_id")
    logs_p = actions.add_parser("logs", parents=[cluster], help="a job's logs")
    logs_p.add_argument("job_id")
    logs_p.add_argument("--follow", "-f", action="store_true",
                        help="stream until the job ends, and exit with its outcome")
    stop_p = actions.add_parser("stop", parents=[cluster], help="stop a job")
    stop_p.add_argument("job_id")
    stop_p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    actions.add_parser("list", parents=[cluster], help="the cluster's submitted jobs")


def run(args: argparse.Namespace) -> int:
    """Run ``vlp submit`` or ``vlp jobs ACTION`` from parsed arguments.

    Raises:
        SubmitError: a problem the caller can fix; :mod:`pipelines.cli` prints it as one line (exit 2).
    """
    cluster = ClusterConfig.resolve(args.address, args.token_file)
    if args.command == "submit":
        return submit(cluster, job_config_from_args(args), wait=not args.no_wait)
    if args.action == "status":
        return job_status(cluster, args.job_id)
    if args.action == "logs":
        return job_logs(cluster, args.job_id, follow_logs=args.follow)
    if args.action == "stop":
        return stop_job(cluster, args.job_id, wait=not args.no_wait)
    return list_jobs(cluster)
