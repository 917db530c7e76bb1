"""Cluster launcher configs and job specs under ray_configs/, checked offline (no cloud SDK, no Ray).

Promises: every cluster config passes the checks ``ray up`` runs before touching the cloud (Ray's
``prepare_config`` and ``validate_config``) and a typo does not; node types have the resources jobs
ask for and the head runs nothing; the Ray token comes from a secret store and no credential is in a
file; every job spec is a valid Ray runtime_env plus an entrypoint that the ``vlp`` CLI accepts.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import shlex

import pytest

from vlp.config import ConfigError, load_config
from pipelines.cluster_config import (
    DATA_NODE_RESOURCE,
    NODE_TYPES,
    JobSpec,
    check_cluster_config,
    check_node_types,
    load_job_spec,
    load_yaml,
    main,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTERS = sorted(glob.glob(os.path.join(ROOT, "ray_configs", "clusters", "*.yaml")))
JOBS = sorted(glob.glob(os.path.join(ROOT, "ray_configs", "jobs", "*.yaml")))
GPU_RECIPES = [p for p in sorted(glob.glob(os.path.join(ROOT, "ray_configs", "train_*.yaml")))
               if (load_yaml(p).get("scaling") or {}).get("use_gpu")]


def _name(path: str) -> str:
    return os.path.basename(path)


@pytest.fixture(params=CLUSTERS, ids=_name)
def cluster(request) -> dict:
    return load_yaml(request.param)


def test_both_clouds_and_all_pipeline_stages_have_files():
    assert {_name(p) for p in CLUSTERS} >= {"aws.yaml", "gcp.yaml"}
    assert {_name(p) for p in JOBS} >= {"curate_images.yaml", "train_quickstart.yaml",
                                        "train_vit_b16.yaml", "eval.yaml"}
    assert "train_vit_b16_gpu.yaml" in {_name(p) for p in GPU_RECIPES}


# --- Ray's schema ------------------------------------------------------------------------------------

def test_cluster_config_passes_rays_offline_checks(cluster):
    before = copy.deepcopy(cluster)
    prepared = check_cluster_config(cluster)
    check_node_types(prepared)
    assert cluster == before, "the check must not modify its input"
    assert prepared["provider"]["type"] in ("aws", "gcp")
    assert set(prepared["available_node_types"]) == {prepared["head_node_type"], *NODE_TYPES}


def _set(config: dict, dotted: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


def _rename(config: dict, dotted: str, new_leaf: str) -> dict:
    config = copy.deepcopy(config)
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[new_leaf] = node.pop(leaf)
    return config


@pytest.mark.parametrize("mutate, named", [
    (lambda c: _rename(c, "available_node_types.cpu_data.max_workers", "max_wokers"), "max_wokers"),
    (lambda c: _rename(c, "idle_timeout_minutes", "idle_timeout_minuts"), "idle_timeout_minuts"),
    (lambda c: _set(c, "autoscale_everything", True), "autoscale_everything"),
    (lambda c: _rename(c, "docker.image", "imge"), "imge"),
    (lambda c: _set(c, "available_node_types.gpu_train.resources.GPU", 0.5), "0.5"),
    (lambda c: _set(c, "upscaling_speed", -1), "-1"),
    (lambda c: _set(c, "head_node_type", "ray_head"), "head_node_type"),
], ids=["node-type-key", "top-level-key", "unknown-top-level", "docker-key", "fractional-gpu",
        "negative-speed", "unknown-head-type"])
def test_typo_or_bad_value_is_caught_before_ray_up(cluster, mutate, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        check_cluster_config(mutate(cluster))


def test_the_files_commands_replace_the_providers_defaults(cluster):
    """Ray merges the provider's defaults.yaml under the file: nothing of it (a nightly Ray wheel, a
    dashboard on 0.0.0.0) may survive in the prepared config."""
    prepared = check_cluster_config(cluster)
    commands = " ".join(prepared[key] if isinstance(prepared[key], str) else " ".join(prepared[key])
                        for key in prepared if key.endswith("_commands"))
    assert "ray-wheels" not in commands and "0.0.0.0" not in commands
    for key in ("setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "initialization_commands"):
        assert prepared[key] == cluster[key], key
    head_start = prepared["head_start_ray_commands"][-1]
    assert "--num-cpus=0" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start


# --- node types --------------------------------------------------------------------------------------

def test_head_runs_no_work_and_each_job_finds_its_node_type(cluster):
    types = check_cluster_config(cluster)["available_node_types"]
    head = types[cluster["head_node_type"]]["resources"]
    assert head.get("CPU") == 0 and not head.get("GPU")
    assert types["gpu_train"]["resources"]["GPU"] >= 1
    assert not types["cpu_data"]["resources"].get("GPU")
    assert types["cpu_data"]["resources"][DATA_NODE_RESOURCE] >= 1
    assert DATA_NODE_RESOURCE not in types["gpu_train"]["resources"]
    assert all(t.get("min_workers", 0) == 0 for t in types.values()), "workers start from zero"


@pytest.mark.parametrize("dotted, value, named", [
    ("available_node_types.head.resources", {"CPU": 8}, "CPU must be 0"),
    ("available_node_types.head.resources", {"CPU": 0, "GPU": 1}, "no GPU"),
    ("available_node_types.gpu_train.resources", {"CPU": 96}, "needs GPUs"),
    ("available_node_types.cpu_data.resources", {"CPU": 64, "GPU": 1, "data_node": 1}, "no GPU"),
    ("available_node_types.cpu_data.resources", {"CPU": 64}, "data_node"),
    ("max_workers", 10, "sum of the node types' max_workers"),
])
def test_node_type_rules_catch_breaches(cluster, dotted, value, named):
    prepared = check_cluster_config(_set(cluster, dotted, value))
    with pytest.raises(ConfigError, match=re.escape(named)):
        check_node_types(prepared)


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=_name)
def test_gpu_recipes_fit_the_gpu_node_type(cluster, recipe):
    from vlp.train.config import TrainConfig

    scaling = load_config(TrainConfig, recipe).scaling
    gpu_train = check_cluster_config(cluster)["available_node_types"]["gpu_train"]
    res = gpu_train["resources"]
    assert scaling.cpus_per_worker * res["GPU"] <= res["CPU"], "a full node's workers need more CPUs"
    assert scaling.num_workers <= gpu_train["max_workers"] * res["GPU"], "not enough GPU nodes"


def test_aws_and_gcp_offer_the_same_cluster():
    aws, gcp = (check_cluster_config(load_yaml(os.path.join(ROOT, "ray_configs", "clusters", f)))
                for f in ("aws.yaml", "gcp.yaml"))
    for key in ("max_workers", "upscaling_speed", "idle_timeout_minutes", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        assert aws[key] == gcp[key], key
    assert aws["docker"]["run_options"] == gcp["docker"]["run_options"]
    for name in aws["available_node_types"]:
        a, g = aws["available_node_types"][name], gcp["available_node_types"][name]
        assert (a["resources"], a["min_workers"], a["max_workers"]) == \
            (g["resources"], g["min_workers"], g["max_workers"]), name


def test_cluster_keeps_idle_workers_as_the_embedded_ray_does(cluster):
    from pipelines.ray_runtime import IDLE_WORKER_KEEP_MS

    options = " ".join(cluster["docker"]["run_options"])
    assert f"--env RAY_idle_worker_killing_time_threshold_ms={IDLE_WORKER_KEEP_MS}" in options


# --- authentication and secrets ----------------------------------------------------------------------

_SECRET_FETCH = re.compile(r"secretsmanager get-secret-value|gcloud secrets versions access")


def test_token_authentication_is_on_with_the_token_from_a_secret_store(cluster):
    options = " ".join(cluster["docker"]["run_options"])
    assert "--env RAY_AUTH_MODE=token" in options
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", options).group(1)
    host_dir, container_dir = re.search(r"--volume (\S+):(\S+):ro", options).groups()
    assert os.path.dirname(token_path) == container_dir
    fetch = [c for c in cluster["initialization_commands"] if _SECRET_FETCH.search(c)]
    assert len(fetch) == 1, "the token is fetched from the cloud's secret store on every node"
    assert f"> {host_dir}/{os.path.basename(token_path)}" in fetch[0]
    assert "umask 077" in fetch[0], "the token file is readable by its owner only"


@pytest.mark.parametrize("path", CLUSTERS + JOBS, ids=_name)
def test_no_credentials_in_config_files(path):
    with open(path) as f:
        text = f.read()
    for pattern in (r"AKIA[0-9A-Z]{16}", r"[0-9a-f]{32,}", r"BEGIN [A-Z ]*PRIVATE KEY",
                    r"(?i)aws_secret_access_key", r"(?i)password\s*:", r"RAY_AUTH_TOKEN=",
                    r"(?m)^\s*ssh_private_key\s*:"):
        assert not re.search(pattern, text), f"{_name(path)} matches {pattern}"


# --- job specs -----------------------------------------------------------------------------------------

@pytest.fixture(params=JOBS, ids=_name)
def job(request) -> JobSpec:
    return load_job_spec(request.param)


def test_job_spec_is_a_runtime_env_with_placeholders_and_an_entrypoint(job):
    env = job.runtime_env
    assert env["working_dir"] == "."
    assert isinstance(env["pip"], list)
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert ".git" not in env.get("excludes", []), "Ray leaves .git out by itself"
    kwargs = job.submit_kwargs()
    assert kwargs["entrypoint"] == job.entrypoint and kwargs["runtime_env"] == env


def _vlp_commands(entrypoint: str) -> list[list[str]]:
    commands = [shlex.split(part) for part in entrypoint.split("&&")]
    return [argv for argv in commands if argv and argv[0] == "vlp"]


def test_job_entrypoint_is_a_vlp_command_whose_config_loads(job, monkeypatch):
    """Run from the repository root (the working_dir): --config files exist, --set keys exist."""
    from pipelines.cli import build_parser
    from vlp.curation.config import CurationConfig, VideoCurationConfig
    from vlp.train.config import TrainConfig

    monkeypatch.chdir(ROOT)
    commands = _vlp_commands(job.entrypoint)
    assert commands, f"no vlp command in {job.entrypoint!r}"
    for argv in commands:
        args = build_parser().parse_args(argv[1:])
        if args.command == "train":
            load_config(TrainConfig, args.config, args.overrides)
        elif args.command == "curate":
            config_class = VideoCurationConfig if args.kind == "videos" else CurationConfig
            load_config(config_class, args.config, args.overrides)


def test_train_jobs_keep_their_driver_on_the_head():
    """Ray Train's controller runs on the driver's node and queries the dashboard on the head's
    loopback: train drivers reserve nothing, so they stay on the head."""
    for path in JOBS:
        spec = load_job_spec(path)
        if any(argv[1] == "train" for argv in _vlp_commands(spec.entrypoint)):
            assert not (spec.entrypoint_num_cpus or spec.entrypoint_num_gpus
                        or spec.entrypoint_resources), _name(path)


@pytest.mark.parametrize("text, named", [
    ("entrypoint: vlp eval\nruntime_env: {working_dir: ., env_var: {A: b}}\n", "env_var"),
    ("entry_point: vlp eval\nruntime_env: {working_dir: .}\n", "entry_point"),
    ("entrypoint: vlp eval\nruntime_env: {env_vars: {RETRIES: 3}}\n", "env_vars"),
    ("entrypoint: vlp eval\nruntime_env: {}\nentrypoint_resources: [data_node]\n",
     "entrypoint_resources"),
], ids=["runtime-env-key", "spec-key", "non-string-env-var", "resources-not-a-mapping"])
def test_job_spec_typo_is_caught(tmp_path, text, named):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_job_spec(str(path))


def test_plain_runtime_env_file_is_accepted_and_needs_an_entrypoint_to_submit(tmp_path):
    """The file `ray job submit --runtime-env` reads works too, with the entrypoint given apart."""
    path = tmp_path / "env.yaml"
    path.write_text("working_dir: .\nenv_vars: {MLFLOW_TRACKING_URI: http://mlflow:5000}\n")
    spec = load_job_spec(str(path))
    assert spec.entrypoint == "" and spec.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    with pytest.raises(ConfigError, match="no entrypoint"):
        spec.submit_kwargs()
    assert spec.submit_kwargs("vlp eval --checkpoint c")["entrypoint"] == "vlp eval --checkpoint c"


def test_check_command_passes_the_files_and_fails_a_broken_one(tmp_path, capsys):
    assert main(CLUSTERS + JOBS) == 0
    broken = copy.deepcopy(load_yaml(CLUSTERS[0]))
    broken["available_node_types"]["cpu_data"]["max_wokers"] = 4
    path = tmp_path / "broken.yaml"
    import yaml

    path.write_text(yaml.safe_dump(broken))
    assert main([CLUSTERS[0], str(path)]) == 1
    assert "max_wokers" in capsys.readouterr().err
