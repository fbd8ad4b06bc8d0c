"""Every shipped (k8s/*.yaml) and rendered (dlray.k8s) Kubernetes manifest is valid, strict and secure.

    .venv/bin/pytest tests/test_k8s.py -q

KubeRay kinds validate against the v1.7.0 CRDs in tests/data/kuberay/ (source and licence in its
README), made strict (unknown fields rejected, nulls dropped, defaults filled); core
kinds validate with kubernetes-validate. No cluster, no network.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from dlray import k8s
from dlray.cli import app
from dlray.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = Path(__file__).parent / "data"  # kuberay/: the KubeRay v1.7.0 CRDs, shipped with the tests
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
K8S_VERSION = "1.35"  # a version kubernetes-validate carries; the manifests use only long-stable core fields
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))
IMAGE = "registry.example.com/dlray:0.1.0"
SECRET_LIKE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL", re.I)
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is several times faster on the ~1 MB CRDs


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    # dlray.k8s maps job paths into the image relative to the working directory, as the CLI does.
    monkeypatch.chdir(REPO)


# ---------------------------------------------------------------------------------------------
# Validation


def strict(schema):
    """A copy of a CRD schema that rejects unknown fields, as the API server's pruning would."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def drop_nulls(value):
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def fill_defaults(value, schema):
    """Fill required fields that have a default (e.g. minReplicas), as the API server does."""
    if isinstance(value, dict) and "properties" in schema:
        for key in schema.get("required", []):
            if key not in value and "default" in schema["properties"].get(key, {}):
                value[key] = copy.deepcopy(schema["properties"][key]["default"])
        for key, child in value.items():
            if key in schema["properties"]:
                fill_defaults(child, schema["properties"][key])
    elif isinstance(value, list) and "items" in schema:
        for child in value:
            fill_defaults(child, schema["items"])
    return value


@functools.cache
def crd_schema(kind: str) -> dict:
    path = SCHEMAS / "kuberay" / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"KubeRay CRD schema {path} is missing from the repository (see tests/data/kuberay/README.md)")
    with open(path) as f:
        crd = yaml.load(f, Loader=Loader)
    return strict(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])


@functools.cache
def crd_validator(kind: str) -> Draft202012Validator:
    return Draft202012Validator(crd_schema(kind))


def schema_errors(doc: dict) -> list[str]:
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    if api.startswith("ray.io/"):
        if api != "ray.io/v1" or kind not in CRD_FILES:
            return [f"{api} {kind}: use apiVersion ray.io/v1 with RayCluster, RayJob or RayService"]
        instance = fill_defaults(drop_nulls(copy.deepcopy(doc)), crd_schema(kind))
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(kind).iter_errors(instance)]
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---------------------------------------------------------------------------------------------
# What is checked: every document in k8s/, and what `dlray k8s render` makes from the shipped jobs.

RENDER_CASES = {
    "train-digits": ("rayjob", "jobs/cnn_digits.yaml", []),
    "train-digits-gpu": ("rayjob", "jobs/cnn_digits.yaml", ["scaling.use_gpu=true"]),
    "train-debug": ("rayjob", "jobs/debug/cnn_cpu.yaml", []),
    "train-debug-gpu": ("rayjob", "jobs/debug/cnn_cpu.yaml", ["scaling.use_gpu=true", "scaling.num_workers=4"]),
    "train-debug-resources": ("rayjob", "jobs/debug/cnn_cpu.yaml", ["scaling.use_gpu=true", "scaling.resources_per_worker={CPU: 3, GPU: 0.5, fast_disk: 1}"]),
    "serve-digits": ("rayservice", "jobs/cnn_digits.yaml", []),
    "serve-debug-autoscaling": ("rayservice", "jobs/debug/cnn_cpu.yaml", ["serve.autoscaling.max_replicas=3"]),
    "serve-digits-gpu": ("rayservice", "jobs/cnn_digits.yaml", ["serve.num_gpus_per_replica=1"]),
}


@functools.cache
def rendered(case: str) -> dict:
    kind, job, overrides = RENDER_CASES[case]
    return k8s.render(job, overrides, image=IMAGE, kind=kind, artifact="/mnt/shared/artifacts/cnn")


def all_docs() -> list[tuple[str, dict]]:
    shipped = [(f"{p.name}[{i}]", d) for p in MANIFESTS for i, d in enumerate(load_docs(p))]
    return shipped + [(f"render:{case}", rendered(case)) for case in RENDER_CASES]


def doc_ids() -> list[str]:
    return [f"{p.name}[{i}]" for p in MANIFESTS for i, _ in enumerate(load_docs(p))] + [f"render:{c}" for c in RENDER_CASES]


def get_doc(doc_id: str) -> dict:
    if doc_id.startswith("render:"):
        return rendered(doc_id.removeprefix("render:"))
    name, index = re.fullmatch(r"(.+)\[(\d+)\]", doc_id).groups()
    return load_docs(REPO / "k8s" / name)[int(index)]


def ray_cluster(doc: dict) -> dict | None:
    spec = doc.get("spec", {})
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(doc["kind"])


def pod_specs(doc: dict) -> dict[str, dict]:
    cluster = ray_cluster(doc)
    pods = {}
    if cluster:
        pods["head"] = cluster["headGroupSpec"]["template"]["spec"]
        pods.update({g["groupName"]: g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])})
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        pods["submitter"] = doc["spec"]["submitterPodTemplate"]["spec"]
    return pods


def containers(doc: dict) -> dict[str, dict]:
    """Every container a manifest runs, KubeRay's autoscaler sidecar included."""
    out = {f"{pod}/{c['name']}": c for pod, spec in pod_specs(doc).items() for c in spec.get("containers", []) + spec.get("initContainers", [])}
    cluster = ray_cluster(doc)
    if cluster and cluster.get("enableInTreeAutoscaling"):
        out["head/autoscaler"] = cluster.get("autoscalerOptions", {})
    return out


def test_manifests_exist():
    assert {"ray-cluster.gpu.yaml", "ray-job.train.yaml", "ray-job.tune.yaml", "ray-service.serve.yaml", "storage.yaml"} <= {p.name for p in MANIFESTS}


@pytest.mark.parametrize("doc_id", doc_ids())
def test_validates_strictly(doc_id):
    assert schema_errors(get_doc(doc_id)) == []


@pytest.mark.parametrize(
    "path, case",
    [("ray-job.train.yaml", ("rayjob", "jobs/cnn_digits.yaml", ["scaling.use_gpu=true"], "dlray-train-cnn")),
     ("ray-service.serve.yaml", ("rayservice", "jobs/cnn_digits.yaml", ["serve.autoscaling.max_replicas=4"], "dlray-serve-cnn"))],
)
def test_shipped_manifest_is_what_render_makes(path, case):
    kind, job, overrides, name = case
    shipped, = load_docs(REPO / "k8s" / path)
    made = k8s.render(job, overrides, image=IMAGE, kind=kind, artifact="/mnt/shared/artifacts/cnn", name=name)
    for doc in (shipped, made):  # compare the Serve config as data, not as text
        if "serveConfigV2" in doc["spec"]:
            doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert shipped == made, f"k8s/{path} differs from `dlray k8s render`; regenerate it (command in its header)"


def test_misspelt_fields_are_caught():
    job, = load_docs(REPO / "k8s" / "ray-job.train.yaml")
    assert schema_errors(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish'" in e for e in schema_errors(typo))

    typo = copy.deepcopy(job)
    head = typo["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["securityContex"] = head.pop("securityContext")
    errors = schema_errors(typo)
    assert any("headGroupSpec/template/spec/containers/0" in e and "securityContex'" in e for e in errors), errors

    pvc, = load_docs(REPO / "k8s" / "storage.yaml")
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    assert schema_errors(pvc)


def test_defaults_are_filled_like_the_api_server():
    cluster, = load_docs(REPO / "k8s" / "ray-cluster.gpu.yaml")
    for group in cluster["spec"]["workerGroupSpecs"]:
        del group["minReplicas"], group["maxReplicas"]
        group["suspend"] = None
    assert schema_errors(cluster) == []


# ---------------------------------------------------------------------------------------------
# What the manifests run


def rayjob_ids() -> list[str]:
    return [i for i in doc_ids() if get_doc(i)["kind"] == "RayJob"]


@pytest.mark.parametrize("doc_id", rayjob_ids())
def test_entrypoint_runs_a_valid_job_file(doc_id):
    words = shlex.split(get_doc(doc_id)["spec"]["entrypoint"])
    assert words[0] == "dlray" and len(words) >= 3, words
    verb, job, overrides = words[1], words[2], words[3:]
    assert job.startswith(k8s.APP_DIR + "/"), f"{job}: name job files by their path in the image ({k8s.APP_DIR}/...)"
    local = REPO / job.removeprefix(k8s.APP_DIR + "/")
    verbs = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert verb in verbs, f"`dlray {verb}` is not a dlray command"
    assert local.is_file(), f"{job} is not a job file in this repository"
    assert all("=" in o for o in overrides), overrides
    cfg = load_config(local, overrides)
    assert cfg.run.storage_path.startswith(k8s.SHARED_MOUNT + "/"), "checkpoints must land on the shared volume"
    assert (cfg.tune is not None) == (verb == "tune"), f"`dlray {verb}` of {job}: sweeps run with `dlray tune`, other jobs with `dlray train`"


def rayservice_ids() -> list[str]:
    return [i for i in doc_ids() if get_doc(i)["kind"] == "RayService"]


@pytest.mark.parametrize("doc_id", rayservice_ids())
def test_serve_config_deploys(doc_id):
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(get_doc(doc_id)["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    for application in schema.applications:
        module, _, attr = application.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), application.import_path
        assert application.args["artifact"].startswith(k8s.SHARED_MOUNT + "/")


# ---------------------------------------------------------------------------------------------
# Secure by default


@pytest.mark.parametrize("doc_id", [i for i in doc_ids() if get_doc(i)["apiVersion"].startswith("ray.io/")])
def test_containers_are_non_root_and_bounded(doc_id):
    doc = get_doc(doc_id)
    if doc["kind"] == "RayJob":
        assert "submitterPodTemplate" in doc["spec"], "KubeRay's default submitter has no securityContext"
    pods = pod_specs(doc)
    for name, container in containers(doc).items():
        pod = pods.get(name.split("/")[0], pods["head"])
        ctx = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, name
        assert ctx.get("allowPrivilegeEscalation") is False, name
        assert "ALL" in ctx.get("capabilities", {}).get("drop", []), name
        assert not ctx.get("privileged"), name
        res = container.get("resources", {})
        for side in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(side, {})), f"{name}: resources.{side} needs cpu and memory"
        assert res["requests"].get("nvidia.com/gpu") == res["limits"].get("nvidia.com/gpu"), name


@pytest.mark.parametrize("doc_id", doc_ids())
def test_secrets_never_in_plain_text(doc_id):
    doc = get_doc(doc_id)
    assert not (doc["kind"] == "Secret" and (doc.get("data") or doc.get("stringData"))), "a committed Secret is plain text"
    cluster = ray_cluster(doc)
    for name, container in containers(doc).items():
        env = {e["name"]: e for e in container.get("env", [])}
        for var in env.values():
            if SECRET_LIKE.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {var['name']} must come from a Secret"
        if cluster and not name.endswith("wait-gcs-ready"):
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: Ray token auth must be on"
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
            assert ref.get("name") == cluster["authOptions"]["secretName"] and ref.get("key") == k8s.AUTH_SECRET_KEY, name
    if cluster:
        assert cluster["authOptions"]["mode"] == "token"


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_render_prints_a_valid_rayjob():
    result = CliRunner().invoke(app, ["k8s", "render", "jobs/debug/cnn_cpu.yaml", "train.num_epochs=1", "--image", IMAGE, "--name", "dlray-debug"])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert doc["metadata"]["name"] == "dlray-debug" and schema_errors(doc) == []
    assert doc["spec"]["entrypoint"].endswith("run.storage_path=/mnt/shared/runs train.num_epochs=1")


def test_cli_render_of_a_sweep_runs_dlray_tune_with_workers_for_its_concurrent_trials():
    result = CliRunner().invoke(app, ["k8s", "render", "jobs/sweep_cnn_asha.yaml", "tune.max_concurrent_trials=3", "--image", IMAGE])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert schema_errors(doc) == [] and doc["spec"]["entrypoint"].startswith("dlray tune /home/ray/dlray/jobs/sweep_cnn_asha.yaml")
    workers, = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2 * 3  # 2 Train workers per trial, 3 trials at once


@pytest.mark.parametrize(
    "args, message",
    [(["run.storage_path=./runs"], "run.storage_path must be under /mnt/shared/"),
     (["optim.lr=-1"], "optim.lr"),
     (["--kind", "rayservice"], "needs --artifact"),
     (["--name", "Not_A_Name"], "DNS label")],
)
def test_cli_render_rejects_bad_input(args, message):
    result = CliRunner().invoke(app, ["k8s", "render", "jobs/debug/cnn_cpu.yaml", "--image", IMAGE, *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_replicas_on_gpus_get_gpu_pods():
    """serve.num_gpus_per_replica reaches both Serve (the replica's ray_actor_options) and the worker pods."""
    spec = rendered("serve-digits-gpu")["spec"]
    (workers,) = spec["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]["num_gpus_per_replica"] == 1
    cpu_only = rendered("serve-digits")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_only["resources"]["limits"]
