"""The deployment files of infra/, checked offline: the KubeRay manifests against the CRDs of KubeRay
v1.7.0 with unknown fields rejected, their secrets only by reference, the image and versions they
name, the commands they run, and the Dockerfile and MLflow server files.

The CRDs are not in the repository: they are read from the folder that ``VLP_KUBERAY_CRDS`` names, else
from ``shared/kuberay-crds`` beside the clone (CI's layout). Without either, the checks that need them
skip, saying how to enable them; every other check runs.

Kubernetes prunes unknown fields of a custom resource without a word, so a typo (``minReplica``) would
apply cleanly and do nothing. The validator here is strict instead: every object schema that lists
``properties`` and allows nothing else gets ``additionalProperties: false``. The CRDs' CEL rules
(``x-kubernetes-validations``) are not evaluated; they guard fields these manifests do not set.
"""

from __future__ import annotations

import copy
import functools
import glob
import os
import re
import shlex
import subprocess
import tomllib

import jsonschema
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
CRD_ENV = "VLP_KUBERAY_CRDS"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFESTS = sorted(glob.glob(os.path.join(INFRA, "kuberay", "*.yaml")))
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.IGNORECASE)
PLACEHOLDER = "REPLACE-ME"
KUBERAY_AUTH_TOKEN_KEY = "auth_token"  # KubeRay's RAY_AUTH_TOKEN_SECRET_KEY


def kuberay_crd_dir(environ=os.environ, root: str = ROOT) -> str | None:
    """The folder with the KubeRay CRDs: ``$VLP_KUBERAY_CRDS``, else ``shared/kuberay-crds`` beside the
    repository; the first that holds every file of ``CRD_FILES``, None where neither does."""
    candidates = [environ[CRD_ENV]] if environ.get(CRD_ENV) else []
    candidates.append(os.path.join(os.path.dirname(root), "shared", "kuberay-crds"))
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name)) for name in CRD_FILES.values()):
            return folder
    return None


CRD_DIR = kuberay_crd_dir()
NO_CRDS = (f"KubeRay CRDs not found: set {CRD_ENV} to a folder with the KubeRay v1.7.0 CRDs "
           f"({', '.join(sorted(CRD_FILES.values()))} from ray-operator/config/crd/bases/ of "
           "ray-project/kuberay at tag v1.7.0, and a README.md naming v1.7.0), or put them in "
           "shared/kuberay-crds beside the repository")


def _crd_dir() -> str:
    """The CRD folder, or skip the calling test (it needs the CRDs) with how to enable it."""
    if CRD_DIR is None:
        pytest.skip(NO_CRDS)
    return CRD_DIR


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _load_yaml_docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


def _manifests() -> list[tuple[str, dict]]:
    return [(os.path.relpath(p, ROOT), doc) for p in MANIFESTS for doc in _load_yaml_docs(p)]


def _of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(path, doc) for path, doc in _manifests() if doc["kind"] in kinds]


def _ids(items):
    return [f"{path}:{doc['kind']}/{doc['metadata']['name']}" for path, doc in items]


# --- the strict validator ---------------------------------------------------------------------

def strict_schema(schema: dict) -> dict:
    """A copy of an OpenAPI v3 (structural) schema that JSON Schema validates as the API server would,
    but rejecting unknown fields instead of pruning them.

    - objects with ``properties`` and no ``additionalProperties`` get ``additionalProperties: false``,
      unless they carry ``x-kubernetes-preserve-unknown-fields`` (then anything goes, as on the server);
    - ``x-kubernetes-int-or-string`` means an integer or a string, whatever ``type`` says;
    - ``nullable`` admits null.
    """
    s = dict(schema)
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {name: strict_schema(sub) for name, sub in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = strict_schema(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [strict_schema(sub) for sub in s[key]]
    return s


def _list_map_keys(validator, keys, instance, schema):
    """``x-kubernetes-list-type: map``: items are unique by their map keys (env names, ports...)."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for key {dict(zip(keys, key))}")
        seen.add(key)


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-map-keys": _list_map_keys})

# The top-level metadata is a bare ``type: object`` in a CRD (the API server validates ObjectMeta
# itself): the fields these manifests may use, strictly.
OBJECT_META = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
CORE_SCHEMAS = {  # the parts of core/v1 Secret and ConfigMap that templates may use
    "Secret": {"type": "object", "additionalProperties": False, "required": ["metadata"],
               "properties": {"apiVersion": {"enum": ["v1"]}, "kind": {"enum": ["Secret"]},
                              "metadata": OBJECT_META, "type": {"type": "string"},
                              "stringData": STRING_MAP, "immutable": {"type": "boolean"}}},
    "ConfigMap": {"type": "object", "additionalProperties": False, "required": ["metadata"],
                  "properties": {"apiVersion": {"enum": ["v1"]}, "kind": {"enum": ["ConfigMap"]},
                                 "metadata": OBJECT_META, "data": STRING_MAP,
                                 "immutable": {"type": "boolean"}}},
}


@functools.cache
def _crd_version(kind: str) -> dict:
    """The served storage version of the kind's CRD (skips the calling test without the CRDs)."""
    (crd,) = _load_yaml_docs(os.path.join(_crd_dir(), CRD_FILES[kind]))
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    return {"group": crd["spec"]["group"], **version}


@functools.cache
def _validator(kind: str):
    if kind in CORE_SCHEMAS:
        return KubernetesValidator(CORE_SCHEMAS[kind])
    schema = strict_schema(_crd_version(kind)["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    return KubernetesValidator(schema)


def schema_errors(doc: dict) -> list[str]:
    """Every violation, as 'path: message' (the path names the field)."""
    errors = _validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_the_strict_schema_rejects_unknown_fields_and_knows_the_kubernetes_extensions():
    schema = strict_schema({"type": "object", "properties": {
        "replicas": {"type": "integer"},
        "cpu": {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "port": {"x-kubernetes-int-or-string": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"known": {"type": "string"}}},
        "params": {"type": "object", "additionalProperties": {"type": "string"}},
        "nested": {"type": "array",
                   "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
    }})
    ok = {"replicas": 1, "cpu": "500m", "port": 8080, "free": {"known": "x", "anything": [1]},
          "params": {"num-cpus": "0", "whatever": "y"}, "nested": [{"a": "b"}]}
    assert not list(KubernetesValidator(schema).iter_errors(ok))
    for bad, named in [({"replica": 1}, "replica"), ({"nested": [{"b": "c"}]}, "'b'"),
                       ({"cpu": 1.5}, "1.5"), ({"port": [80]}, "[80]"),
                       ({"params": {"num-cpus": 0}}, "0 is not of type 'string'")]:
        messages = [e.message for e in KubernetesValidator(schema).iter_errors(bad)]
        assert any(named in m for m in messages), (bad, messages)


@pytest.mark.parametrize("path,doc", _manifests(), ids=_ids(_manifests()))
def test_every_manifest_validates_against_its_schema_with_unknown_fields_rejected(path, doc):
    assert doc["kind"] in {*CRD_FILES, *CORE_SCHEMAS}, f"{path}: no schema for kind {doc['kind']}"
    if doc["kind"] in CRD_FILES:
        version = _crd_version(doc["kind"])
        assert doc["apiVersion"] == f"{version['group']}/{version['name']}" == "ray.io/v1"
    assert schema_errors(doc) == []


def _schema_named_keys(instance, schema, path=()):
    """Paths of every mapping key the (strict) schema names, depth first."""
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                yield (*path, key)
                yield from _schema_named_keys(value, props[key], (*path, key))
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from _schema_named_keys(value, schema["additionalProperties"], (*path, key))
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            yield from _schema_named_keys(item, schema["items"], (*path, i))


def _misspell(doc: dict, path: tuple, typo: str | None = None) -> tuple[dict, str]:
    """A copy of ``doc`` with the key at ``path`` renamed (last letter dropped, or ``typo``)."""
    bad = copy.deepcopy(doc)
    parent = bad
    for step in path[:-1]:
        parent = parent[step]
    key = path[-1]
    typo = typo or (key[:-1] if key[:-1] not in parent else key + "_")
    parent[typo] = parent.pop(key)
    return bad, typo


@pytest.mark.parametrize("path,doc", _manifests(), ids=_ids(_manifests()))
def test_a_misspelt_field_anywhere_in_a_manifest_is_rejected_by_name(path, doc):
    schema = _validator(doc["kind"]).schema
    keys = [k for k in _schema_named_keys(doc, schema) if k not in (("apiVersion",), ("kind",))]
    assert len(keys) > (50 if doc["kind"] in CRD_FILES else 3)  # the walk went all the way down
    for key_path in keys:
        bad, typo = _misspell(doc, key_path)
        errors = schema_errors(bad)
        assert any(f"'{typo}' was unexpected" in e for e in errors), (key_path, errors)


@pytest.mark.parametrize("file,key_path,typo", [
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 0, "minReplicas"), "minReplica"),
    ("raycluster.yaml", ("spec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    ("raycluster.yaml", ("spec", "enableInTreeAutoscaling"), "enableInTreeAutoScaling"),
    ("raycluster.yaml", ("spec", "workerGroupSpecs", 1, "template", "spec", "containers", 0,
                         "resources", "limits"), "limit"),
    ("rayjob-train.yaml", ("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinish"),
    ("rayjob-curate.yaml", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"),
     "maxReplica"),
    ("rayjob-curate.yaml", ("metadata", "labels"), "label"),
])
def test_the_typical_typos_are_rejected_with_the_field_named(file, key_path, typo):
    (doc,) = _load_yaml_docs(os.path.join(INFRA, "kuberay", file))
    bad, _ = _misspell(doc, key_path, typo)
    errors = schema_errors(bad)
    where = ".".join(map(str, key_path[:-1]))
    assert any(e.startswith(f"{where}: ") and f"'{typo}' was unexpected" in e for e in errors), errors


# --- what the manifests promise ---------------------------------------------------------------

def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{p}:{d['metadata']['name']}", d["spec"]) for p, d in _of_kind("RayCluster")]
    specs += [(f"{p}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"])
              for p, d in _of_kind("RayJob") if "rayClusterSpec" in d["spec"]]
    return specs


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _containers(spec: dict):
    for name, group in _groups(spec):
        for container in group["template"]["spec"].get("containers", []):
            yield name, container


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _bytes(quantity) -> float:
    text = str(quantity)
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40),
                           ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * factor
    return float(text)


def _shm_bytes(pod: dict, container: dict) -> float:
    """The size of the memory-backed volume mounted at /dev/shm (0 without one)."""
    mounts = {m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    sizes = [v["emptyDir"]["sizeLimit"] for v in pod.get("volumes", [])
             if v["name"] in mounts and v.get("emptyDir", {}).get("medium") == "Memory"]
    return _bytes(sizes[0]) if sizes else 0.0


def _dockerfile(path: str = os.path.join(INFRA, "Dockerfile")) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in _read(path).splitlines(keepends=True):
        line = raw.rstrip("\n")
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            instruction, _, args = current.strip().partition(" ")
            lines.append((instruction.upper(), " ".join(args.split())))
            current = ""
    return lines


def _docker_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _dockerfile() if i == "ARG" and "=" in a)


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirement(name: str):
    from packaging.requirements import Requirement

    (req,) = [Requirement(r) for r in _pyproject()["project"]["dependencies"]
              if Requirement(r).name == name]
    return req


def _documented_image() -> str:
    match = re.search(r"\*\*Image\*\*: `([^`]+)`", _read(os.path.join(INFRA, "README.md")))
    assert match, "infra/README.md names the image as **Image**: `...`"
    return match.group(1)


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=[w for w, _ in _cluster_specs()])
def test_every_cluster_autoscales_uses_token_auth_and_keeps_work_off_the_head(where, spec):
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    assert spec["authOptions"] == {"mode": "token", "secretName": "vlp-ray-auth"}
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for name, group in _groups(spec):
        for container in group["template"]["spec"]["containers"]:
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            assert (gpus is not None) == (name == "gpu-workers"), (name, container["resources"])
            assert container["resources"]["requests"] == container["resources"]["limits"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        if name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            pod = group["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False
            # Ray's object store takes 30% of the memory limit, in /dev/shm (64 MiB by default)
            (container,) = pod["containers"]
            memory = _bytes(container["resources"]["limits"]["memory"])
            assert _shm_bytes(pod, container) >= 0.3 * memory, (where, name)
    assert {n for n, _ in _groups(spec)} >= {"head", "cpu-workers"}


def test_ray_start_params_are_options_ray_start_knows():
    from ray.scripts.scripts import start

    known = {opt.lstrip("-") for param in start.params for opt in param.opts}
    for where, spec in _cluster_specs():
        for name, group in _groups(spec):
            assert set(group["rayStartParams"]) <= known, (where, name, group["rayStartParams"])


def test_the_gpu_group_fits_the_training_recipe():
    """8 GPUs a pod = the grouped loss' group_size (the gather stays inside a node); the recipe's
    workers fit the group's maximum, and their CPUs fit a pod."""
    recipe = yaml.safe_load(_read(os.path.join(ROOT, "ray_configs", "train_vit_b16_gpu.yaml")))
    scaling = recipe["scaling"]
    for where, spec in _cluster_specs():
        groups = dict(_groups(spec))
        if "gpu-workers" not in groups:
            continue
        gpu = groups["gpu-workers"]
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        per_pod = int(limits["nvidia.com/gpu"])
        assert per_pod == recipe["objectives"]["contrastive"]["loss"]["group_size"], where
        assert gpu["maxReplicas"] * per_pod >= scaling["num_workers"], where
        assert scaling["cpus_per_worker"] * per_pod < _cpus(limits["cpu"]), where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            gpu["template"]["spec"]["tolerations"]


def test_secrets_reach_pods_only_by_reference_and_every_reference_resolves():
    secrets = {d["metadata"]["name"]: d for _, d in _of_kind("Secret")}
    config_maps = {d["metadata"]["name"]: d for _, d in _of_kind("ConfigMap")}
    for where, spec in _cluster_specs():
        assert KUBERAY_AUTH_TOKEN_KEY in secrets[spec["authOptions"]["secretName"]]["stringData"]
        containers = list(_containers(spec))
        containers.append(("autoscaler", {"env": spec["autoscalerOptions"].get("env", []),
                                          "envFrom": spec["autoscalerOptions"].get("envFrom", [])}))
        for name, container in containers:
            for env in container.get("env", []):
                assert not (SECRET_NAME.search(env["name"]) and "value" in env), (where, name, env)
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (where, ref)
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, (where, source)
                else:
                    assert source["configMapRef"]["name"] in config_maps, (where, source)
    for config_map in config_maps.values():
        assert not [k for k in config_map["data"] if SECRET_NAME.search(k)], config_map["data"]
    assert "MLFLOW_TRACKING_URI" in config_maps["vlp-env"]["data"]
    from pipelines.ray_runtime import IDLE_WORKER_KEEP_MS

    # Every Ray pod keeps idle workers as the embedded Ray does (ray_runtime.IDLE_WORKER_KEEP_MS).
    keep = config_maps["vlp-env"]["data"]["RAY_idle_worker_killing_time_threshold_ms"]
    assert keep == str(IDLE_WORKER_KEEP_MS)


def test_secret_templates_hold_placeholders_only():
    for path, secret in _of_kind("Secret"):
        assert "data" not in secret  # base64 would hide a real value from review
        for key, value in secret["stringData"].items():
            assert value.startswith(PLACEHOLDER), (path, key)
    template = os.path.join(INFRA, "mlflow", "mlflow.env.template")
    for line in _read(template).splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.strip().partition("=")
            if SECRET_NAME.search(name):
                assert value.startswith(PLACEHOLDER), line
    # and nothing in infra/ looks like a real credential or the tests' own
    leaks = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|vlp-test-(key|secret)")
    for path in glob.glob(os.path.join(INFRA, "**", "*"), recursive=True):
        if os.path.isfile(path):
            assert not leaks.search(_read(path)), path


def test_images_versions_and_api_version_are_the_documented_ones():
    image = _documented_image()
    args = _docker_args()
    version = _pyproject()["project"]["version"]
    assert args["RAY_VERSION"] in _requirement("ray").specifier
    assert args["TORCH_VERSION"] in _requirement("torch").specifier
    assert image.rsplit(":", 1)[1] == f"{version}-ray{args['RAY_VERSION']}-gpu"
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == args["RAY_VERSION"], where
        for name, container in _containers(spec):
            assert container["image"] == image, (where, name)
    readme = _read(os.path.join(INFRA, "README.md"))
    assert "KubeRay v1.7.0" in readme and "`ray.io/v1`" in readme


def test_the_crds_validated_against_are_the_documented_kuberay_release():
    """The CRDs found (shared/ or VLP_KUBERAY_CRDS) are the KubeRay release that infra/README.md names."""
    crd_readme = os.path.join(_crd_dir(), "README.md")
    assert os.path.isfile(crd_readme), f"{crd_readme}: the README naming the KubeRay release of the CRDs"
    assert "KubeRay v1.7.0" in _read(os.path.join(INFRA, "README.md")) and "v1.7.0" in _read(crd_readme)


def test_the_crds_are_found_through_the_variable_then_beside_the_repository(tmp_path):
    """A fresh clone has no shared/ beside it: the lookup says so (the CRD checks then skip) instead
    of failing, and VLP_KUBERAY_CRDS, where set to a folder with the CRDs, comes first."""
    root = tmp_path / "clone"
    root.mkdir()
    mine, shared = tmp_path / "mine", tmp_path / "shared" / "kuberay-crds"
    mine.mkdir()
    assert kuberay_crd_dir({}, str(root)) is None
    assert kuberay_crd_dir({CRD_ENV: str(tmp_path / "missing")}, str(root)) is None
    assert kuberay_crd_dir({CRD_ENV: str(mine)}, str(root)) is None  # empty
    (mine / CRD_FILES["RayCluster"]).write_text("{}")
    assert kuberay_crd_dir({CRD_ENV: str(mine)}, str(root)) is None  # incomplete
    shared.mkdir(parents=True)
    for name in CRD_FILES.values():
        (shared / name).write_text("{}")
    assert kuberay_crd_dir({}, str(root)) == str(shared)
    assert kuberay_crd_dir({CRD_ENV: str(mine)}, str(root)) == str(shared)
    (mine / CRD_FILES["RayJob"]).write_text("{}")
    assert kuberay_crd_dir({CRD_ENV: str(mine)}, str(root)) == str(mine)
    assert "VLP_KUBERAY_CRDS" in NO_CRDS and "v1.7.0" in NO_CRDS


def test_job_entrypoints_are_commands_the_cli_accepts_with_existing_config_keys():
    from pipelines.cli import build_parser
    from vlp.config import load_config
    from vlp.curation.config import CurationConfig
    from vlp.train.config import TrainConfig

    workdir = [a for i, a in _dockerfile() if i == "WORKDIR"][-1]
    for path, job in _of_kind("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        cd, rest = spec["entrypoint"].split("&&", 1)
        assert shlex.split(cd) == ["cd", workdir], path
        words = shlex.split(rest)
        assert words[0] == "vlp", path
        args = build_parser().parse_args(words[1:])
        assert args.config and os.path.exists(os.path.join(ROOT, args.config)), path
        cls = TrainConfig if args.command == "train" else CurationConfig
        config = load_config(cls, os.path.join(ROOT, args.config), args.overrides)  # unknown keys raise
        if args.command == "train":  # every node reads the shards and writes checkpoints: S3
            assert config.data.train.startswith("s3://") and config.output_dir.startswith("s3://")
            assert config.scaling.use_gpu
        else:
            assert args.input.startswith("s3://") and args.output.startswith("s3://")
            assert config.execution.workers > 0  # an empty autoscaling cluster has no CPUs to count


def test_the_dockerfile_installs_the_project_on_the_pinned_ray_and_torch():
    steps = _dockerfile()
    args = _docker_args()
    (base,) = [a for i, a in steps if i == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-py311-gpu"
    from packaging.specifiers import SpecifierSet

    assert "3.11" in SpecifierSet(_pyproject()["project"]["requires-python"])
    constraints = next(a for i, a in steps if i == "RUN" and "constraints-image.txt" in a)
    assert "ray==%s" in constraints and '"${RAY_VERSION}"' in constraints
    assert "torch==%s" in constraints and '"${TORCH_VERSION}"' in constraints
    install = [n for n, (i, a) in enumerate(steps) if i == "RUN" and
               re.search(r"pip install .*-c /home/ray/constraints-image\.txt \.( |$)", a)]
    assert len(install) == 1, "one `pip install -c <constraints> .` of the project"
    copied = {word for i, a in steps[:install[0]] if i == "COPY"
              for word in a.split()[:-1] if not word.startswith("--")}
    packages = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", "README.md", *(p.rstrip("*") for p in packages)}
    assert needed <= copied, needed - copied
    assert any(i == "COPY" and "ray_configs" in a for i, a in steps)
    assert not any(i == "USER" for i, _ in steps)  # the base image's non-root `ray` user stays
    ignore = _read(os.path.join(INFRA, "Dockerfile.dockerignore")).split()
    for path in needed | {"ray_configs"}:
        assert f"!{path}" in ignore or f"!{path}/" in ignore, path
    assert args["RAY_VERSION"] and args["TORCH_VERSION"]


def test_the_mlflow_server_files_keep_secrets_in_the_environment():
    script = os.path.join(INFRA, "mlflow", "run_server.sh")
    assert subprocess.run(["bash", "-n", script], check=False).returncode == 0
    text = _read(script)
    assert "--app-name basic-auth" in text and "--serve-artifacts" in text
    assert "--backend-store-uri" not in text.split("exec", 1)[1]  # read from the environment
    compose = yaml.safe_load(_read(os.path.join(INFRA, "mlflow", "compose.yaml")))
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:[-?][^}]*)?\}", str(value)), (name, key, value)
            assert not re.search(r"://[^/@\s]+:[^/@\s]+@", str(value)), (name, key)  # no user:pass@
    server_image = _dockerfile(os.path.join(INFRA, "mlflow", "Dockerfile"))
    server = dict(a.split("=", 1) for i, a in server_image if i == "ARG")
    assert server["MLFLOW_VERSION"] in _requirement("mlflow").specifier
