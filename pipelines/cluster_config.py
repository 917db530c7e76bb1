"""Cluster launcher configs and Ray job specs: load them and check them offline.

``ray_configs/clusters/*.yaml`` are Ray cluster launcher configs (``ray up``). ``check_cluster_config``
runs the two steps of ``ray up`` that need no cloud account: Ray's ``prepare_config`` (merges the
provider's ``defaults.yaml``, fills each node type's worker limits) and ``validate_config`` (Ray's JSON
schema, which rejects unknown keys: a typo fails here, not on the cluster). The provider's
``bootstrap_config`` (IAM roles, subnets, key pairs through the cloud API) is left to ``ray up``.
``check_node_types`` adds what this project relies on: the head runs no work, and the node types that
curation and training ask for (``NODE_TYPES``) exist with the resources they are asked for.

``ray_configs/jobs/*.yaml`` are job specs: the keyword arguments of Ray's
``JobSubmissionClient.submit_job`` (``entrypoint``, ``runtime_env``, optionally ``entrypoint_num_cpus``,
``entrypoint_num_gpus``, ``entrypoint_memory``, ``entrypoint_resources``, ``metadata``).
``load_job_spec`` also takes a plain runtime_env mapping, the file ``ray job submit --runtime-env``
reads, as a spec with an empty entrypoint.

Check files before ``ray up`` or a submission with ``python -m pipelines.cluster_config FILE...``.
``vlp submit --runtime-env FILE`` reads its file with the same ``load_job_spec``.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from vlp.config import ConfigError

#: The custom resource that marks curation nodes; curation work that asks for a sliver of it
#: (e.g. ``{"data_node": 0.001}``) can only run on, and only makes the autoscaler start, ``cpu_data``.
DATA_NODE_RESOURCE = "data_node"


@dataclass(frozen=True)
class NodeTypeContract:
    """What a worker node type must offer: the resources the project's jobs ask for."""

    gpu: bool
    custom_resources: tuple[str, ...] = ()


#: Worker node types every cluster config offers (names are part of the contract: jobs, docs and the
#: autoscaling test use them).
NODE_TYPES: dict[str, NodeTypeContract] = {
    "cpu_data": NodeTypeContract(gpu=False, custom_resources=(DATA_NODE_RESOURCE,)),
    "gpu_train": NodeTypeContract(gpu=True),
}

_JOB_SPEC_KEYS = ("entrypoint", "runtime_env", "entrypoint_num_cpus", "entrypoint_num_gpus",
                  "entrypoint_memory", "entrypoint_resources", "metadata")


def load_yaml(path: str) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def check_cluster_config(config: dict, where: str = "cluster config") -> dict:
    """Ray's own offline checks of a cluster launcher config; returns the prepared config.

    The input is not modified. Raises ``ConfigError`` naming the offending key.
    """
    import json
    import os

    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    try:
        # The file as written first, so that an error names the key the file has (prepare_config's
        # own checks, e.g. of the docker section, would report a misspelt key as a missing one).
        jsonschema.validate(config, schema)
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        at = ".".join(str(p) for p in e.absolute_path) or "top level"
        raise ConfigError(f"{where}: {at}: {e.message}") from None
    except (ValueError, KeyError, AssertionError, NotImplementedError, RuntimeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return prepared


def check_node_types(prepared: dict, where: str = "cluster config") -> None:
    """The project's rules for node types of a prepared config; raises ``ConfigError`` listing all breaches.

    - the head offers no CPU and no GPU to tasks, and no worker of its type is launched;
    - every type in ``NODE_TYPES`` exists, has CPUs, has GPUs exactly when its contract says so, and
      offers its custom resources;
    - every other worker type has some CPU or GPU; ``min_workers <= max_workers`` per type; the global
      ``max_workers`` lets every type reach its own maximum.
    """
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    problems = []
    head_res = types[head].get("resources", {})
    if head_res.get("CPU", None) != 0:
        problems.append(f"head type {head!r}: resources.CPU must be 0 (the head runs no tasks)")
    if head_res.get("GPU", 0):
        problems.append(f"head type {head!r}: must have no GPU")
    if types[head].get("max_workers", 0):
        problems.append(f"head type {head!r}: max_workers must be 0")
    for name, contract in NODE_TYPES.items():
        if name not in types:
            problems.append(f"node type {name!r} is missing (jobs ask for it)")
            continue
        res = types[name].get("resources", {})
        if res.get("CPU", 0) < 1:
            problems.append(f"node type {name!r}: needs CPUs")
        if contract.gpu and res.get("GPU", 0) < 1:
            problems.append(f"node type {name!r}: needs GPUs")
        if not contract.gpu and res.get("GPU", 0):
            problems.append(f"node type {name!r}: must have no GPU (GPU jobs would land there)")
        for resource in contract.custom_resources:
            if res.get(resource, 0) < 1:
                problems.append(f"node type {name!r}: needs resource {resource!r}")
    for name, spec in types.items():
        res = spec.get("resources", {})
        if name != head and not (res.get("CPU", 0) or res.get("GPU", 0)):
            problems.append(f"node type {name!r}: offers neither CPU nor GPU")
        if spec.get("min_workers", 0) > spec.get("max_workers", 0):
            problems.append(f"node type {name!r}: min_workers > max_workers")
    reachable = sum(spec.get("max_workers", 0) for spec in types.values())
    if prepared["max_workers"] < reachable:
        problems.append(f"max_workers {prepared['max_workers']} < {reachable}, the sum of the node "
                        "types' max_workers: some types could never reach their maximum")
    if problems:
        raise ConfigError(f"{where}:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class JobSpec:
    """One Ray job: the command, its runtime environment and the resources its driver reserves."""

    entrypoint: str
    runtime_env: dict = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    entrypoint_memory: int | None = None
    entrypoint_resources: dict | None = None
    metadata: dict | None = None

    def submit_kwargs(self, entrypoint: str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``JobSubmissionClient.submit_job``; ``entrypoint`` replaces the spec's."""
        kwargs = {key: getattr(self, key) for key in _JOB_SPEC_KEYS}
        if entrypoint:
            kwargs["entrypoint"] = entrypoint
        if not kwargs["entrypoint"]:
            raise ConfigError("the job has no entrypoint: give one, or use a spec that has one")
        return {key: value for key, value in kwargs.items() if value not in (None, {})}


def check_runtime_env(runtime_env: Any, where: str = "runtime_env") -> dict:
    """Ray's validation of a runtime_env mapping, plus: no unknown keys.

    Ray treats an unknown key as the name of a runtime-env plugin and fails only when the job starts on
    the cluster; here a typo (``env_var``) fails at once.
    """
    from ray.runtime_env import RuntimeEnv

    if not isinstance(runtime_env, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(runtime_env).__name__}")
    unknown = sorted(set(runtime_env) - RuntimeEnv.known_fields)
    if unknown:
        raise ConfigError(f"{where}: unknown runtime_env keys {unknown}; Ray knows "
                          f"{sorted(k for k in RuntimeEnv.known_fields if not k.startswith('_'))}")
    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    return runtime_env


def load_job_spec(path: str) -> JobSpec:
    """A job spec file, or a plain runtime_env file (then with an empty entrypoint)."""
    data = load_yaml(path)
    if "runtime_env" not in data and "entrypoint" not in data:
        return JobSpec(entrypoint="", runtime_env=check_runtime_env(data, path))
    unknown = sorted(set(data) - set(_JOB_SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown job spec keys {unknown}; expected some of {list(_JOB_SPEC_KEYS)}")
    entrypoint = data.get("entrypoint") or ""
    if not isinstance(entrypoint, str):
        raise ConfigError(f"{path}: entrypoint must be a string (one shell command)")
    for key in ("entrypoint_resources", "metadata"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
    runtime_env = check_runtime_env(data.get("runtime_env") or {}, f"{path}: runtime_env")
    return JobSpec(entrypoint=entrypoint.strip(), runtime_env=runtime_env,
                   **{key: data[key] for key in _JOB_SPEC_KEYS[2:] if data.get(key) is not None})


def _describe_cluster(prepared: dict) -> str:
    types = prepared["available_node_types"]
    parts = [f"{name} {spec.get('min_workers', 0)}..{spec.get('max_workers', 0)} x {spec['resources']}"
             for name, spec in types.items() if name != prepared["head_node_type"]]
    return f"cluster {prepared['cluster_name']!r} ({prepared['provider']['type']}): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Check cluster configs and job specs; prints one line per file, returns 1 if any fails."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m pipelines.cluster_config FILE.yaml [...]", file=sys.stderr)
        return 2
    failed = 0
    for path in paths:
        try:
            data = load_yaml(path)
            if "provider" in data:
                prepared = check_cluster_config(data, path)
                check_node_types(prepared, path)
                print(f"ok    {path}: {_describe_cluster(prepared)}")
            else:
                spec = load_job_spec(path)
                print(f"ok    {path}: job {spec.entrypoint or '(runtime_env only)'}")
        except (ConfigError, OSError, yaml.YAMLError) as e:
            print(f"FAIL  {e}", file=sys.stderr)
            failed = 1
    return failed


if __name__ == "__main__":
    sys.exit(main())
