"""KubeRay manifests rendered from a job config: the YAML that drives `dlray train` also sizes its pods.

    dlray k8s render jobs/cnn_digits.yaml scaling.use_gpu=true --image registry.example.com/dlray:0.1.0 > job.yaml
    dlray k8s render jobs/cnn_digits.yaml --kind rayservice --artifact /mnt/shared/artifacts/cnn --image ...
    kubectl apply -f k8s/storage.yaml -f job.yaml      # create the auth Secret first: see k8s/storage.yaml

One Ray Train worker per worker pod: `scaling.num_workers` pods, each with the CPUs/GPUs/memory one
worker asks for (`scaling.use_gpu` or `scaling.resources_per_worker`) plus room for the raylet.
Job files are read from the image (the Dockerfile copies the repo to APP_DIR), so a changed job
file needs a new image; dotted overrides do not. Pure functions returning dicts; the shipped
k8s/ray-job.train.yaml and k8s/ray-service.serve.yaml are their output (tests/test_k8s.py checks it).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from pathlib import Path

import yaml

from dlray.config import ConfigError, JobConfig, ServeSection, load_config
from dlray.models import FAMILIES

RAY_VERSION = "2.60.0"  # the image's Ray; KubeRay's authOptions needs >= 2.52
APP_DIR = "/home/ray/dlray"  # where the Dockerfile puts the repo
SHARED_VOLUME = "shared"
SHARED_PVC = "dlray-shared"  # k8s/storage.yaml
SHARED_MOUNT = "/mnt/shared"
RUNS_DIR = f"{SHARED_MOUNT}/runs"
AUTH_SECRET = "dlray-ray-auth"  # created by hand, never committed: see k8s/storage.yaml
AUTH_SECRET_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName
RAY_UID, RAY_GID = 1000, 100  # the `ray` user and `users` group of the rayproject/ray images
SERVE_PORT = 8000  # KubeRay's serve Service targets this port
JOB_DEADLINE_S = 6 * 3600  # a hung job must not hold GPUs forever
FINISHED_TTL_S = 600  # keep a finished job's cluster 10 min for `kubectl logs`, then delete it
CPU_WORKER_MEMORY_GIB = 4
GPU_WORKER_MEMORY_GIB = 16  # per GPU: pinned host buffers and dataloader copies
NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
NAME_MAX = 47  # KubeRay's limit for RayJob and RayService names


# ---------------------------------------------------------------------------------------------
# Building blocks shared by RayJob, RayService and the hand-written k8s/ray-cluster.gpu.yaml.


def security_context() -> dict:
    """Non-root, no privilege escalation, no capabilities: Kubernetes' "restricted" pod security level."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def auth_env() -> list[dict]:
    """Ray token auth for a container; the token only ever comes from the Secret."""
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": AUTH_SECRET, "key": AUTH_SECRET_KEY}}},
    ]


def resources(cpu: str | int, memory: str, gpus: int = 0) -> dict:
    # Requests equal limits: Ray sizes itself from the limits, so the pod must really get them.
    amount = {"cpu": str(cpu), "memory": memory}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


def ray_container(name: str, image: str, res: dict, ports: list[dict] | None = None) -> dict:
    container = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": auth_env(),
        "resources": res,
        "securityContext": security_context(),
        "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": SHARED_MOUNT}],
    }
    if ports:
        container["ports"] = ports
    return container


def pod_template(container: dict, gpu: bool = False, service_account_token: bool = False) -> dict:
    spec = {
        # Only the head's autoscaler sidecar talks to the Kubernetes API.
        "automountServiceAccountToken": service_account_token,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RAY_UID,
            "runAsGroup": RAY_GID,
            "fsGroup": RAY_GID,  # block-storage volumes become group-writable; NFS needs its export owned by 1000:100
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": SHARED_PVC}}],
    }
    if gpu:
        # GPU node pools are usually tainted so that CPU pods stay off them.
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def head_ports(serve: bool = False) -> list[dict]:
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    if serve:
        ports.append({"name": "serve", "containerPort": SERVE_PORT})
    return ports


def head_group(image: str, serve: bool = False, autoscaling: bool = False) -> dict:
    return {
        # The head runs the driver, GCS and dashboard; keeping Ray from scheduling work there keeps them responsive.
        "rayStartParams": {"num-cpus": "0"},
        "template": pod_template(
            ray_container("ray-head", image, resources(2, "8Gi"), head_ports(serve)), service_account_token=autoscaling
        ),
    }


def autoscaler_options() -> dict:
    return {
        "idleTimeoutSeconds": 60,  # release idle GPU pods after a minute
        "upscalingMode": "Default",
        "resources": resources("500m", "512Mi"),
        "securityContext": security_context(),
        "env": auth_env(),
    }


def worker_group(name: str, image: str, replicas: int, min_replicas: int, max_replicas: int, cpus: int, memory_gib: int, gpus: int = 0,
                 ray_resources: dict | None = None, extra_cpus: int = 1) -> dict:
    """`cpus` is what Ray may schedule on the pod; the pod gets `extra_cpus` more for the raylet and agents."""
    group = {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": {"num-cpus": str(cpus)},
        "template": pod_template(ray_container("ray-worker", image, resources(cpus + extra_cpus, f"{memory_gib}Gi", gpus)), gpu=gpus > 0),
    }
    if ray_resources:  # custom Ray resources from scaling.resources_per_worker
        group["resources"] = {k: f"{v:g}" for k, v in ray_resources.items()}
    return group


def cluster_spec(head: dict, workers: list[dict], autoscaling: bool = False) -> dict:
    spec = {
        "rayVersion": RAY_VERSION,
        # KubeRay then also authenticates its own dashboard calls (job status, Serve deploys) with this Secret.
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "enableInTreeAutoscaling": autoscaling,
        "headGroupSpec": head,
        "workerGroupSpecs": workers,
    }
    if autoscaling:
        spec["autoscalerOptions"] = autoscaler_options()
    return spec


def submitter_template(image: str) -> dict:
    """The pod that runs `ray job submit`; KubeRay fills in its command."""
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": auth_env(),
        "resources": resources("500m", "512Mi"),
        "securityContext": security_context(),
    }
    template = pod_template(container)
    template["spec"].pop("volumes")
    template["spec"]["restartPolicy"] = "Never"
    return template


def metadata(name: str, component: str) -> dict:
    if len(name) > NAME_MAX or not NAME_RE.fullmatch(name):
        raise ConfigError(f"--name must be a DNS label of at most {NAME_MAX} characters (a-z, 0-9, '-'), got {name!r}")
    return {"name": name, "labels": {"app.kubernetes.io/name": "dlray", "app.kubernetes.io/component": component}}


# ---------------------------------------------------------------------------------------------
# Job config -> manifests.


def worker_shape(cfg: JobConfig) -> dict:
    """Pod size for one Ray Train worker, read the way Ray Train reads ScalingConfig."""
    per = dict(cfg.scaling.resources_per_worker or {})
    gpus = per.pop("GPU", 1 if cfg.scaling.use_gpu else 0)
    cpus = per.pop("CPU", 1)
    memory = per.pop("memory", None)
    if gpus and not cfg.scaling.use_gpu:
        raise ConfigError("scaling.resources_per_worker.GPU needs scaling.use_gpu true")
    gpus = math.ceil(gpus)  # a fractional GPU still needs a whole device in the pod
    if memory is not None:
        memory_gib = math.ceil(memory / 2**30) + 2  # + the raylet and object store's share
    else:
        memory_gib = GPU_WORKER_MEMORY_GIB * gpus if gpus else CPU_WORKER_MEMORY_GIB
    return {"cpus": max(1, math.ceil(cpus)), "gpus": gpus, "memory_gib": memory_gib, "ray_resources": per, "extra_cpus": 1 + cfg.data.dataloader_num_workers}


def image_path(job: str | os.PathLike) -> str:
    """Where `job` (a path inside this repo) lives in the image."""
    relative = os.path.relpath(Path(job).resolve(), Path.cwd())
    if relative.startswith(".."):
        raise ConfigError(f"job file {job} must be inside the repository (run from its root): the image only holds the repo")
    return f"{APP_DIR}/{Path(relative).as_posix()}"


def load_for_cluster(job: str | os.PathLike, overrides: list[str]) -> tuple[JobConfig, list[str]]:
    """The config as the cluster will see it: checkpoints on the shared volume unless overridden."""
    overrides = [f"run.storage_path={RUNS_DIR}", *overrides]
    cfg = load_config(job, overrides)
    storage = cfg.run.storage_path
    if "://" not in storage and not storage.startswith(SHARED_MOUNT + "/"):
        raise ConfigError(f"run.storage_path must be under {SHARED_MOUNT}/ or a cloud URI (s3://, gs://) so every pod sees the checkpoints, got {storage!r}")
    return cfg, overrides


def default_name(job: str | os.PathLike) -> str:
    return "dlray-" + re.sub(r"[^a-z0-9]+", "-", Path(job).stem.lower()).strip("-")


def render_rayjob(job: str | os.PathLike, overrides: list[str], image: str, name: str | None = None, deadline_s: int = JOB_DEADLINE_S) -> dict:
    """A RayJob that brings up its own cluster, runs `dlray train` (or `dlray tune` for a job with a
    `tune:` section, with workers for max_concurrent_trials trials at once), and deletes the cluster afterwards."""
    cfg, overrides = load_for_cluster(job, list(overrides))
    shape = worker_shape(cfg)
    verb = "tune" if cfg.tune else "train"
    n = cfg.scaling.num_workers * ((cfg.tune.max_concurrent_trials or 1) if cfg.tune else 1)
    group = "gpu-workers" if shape["gpus"] else "cpu-workers"
    workers = worker_group(group, image, n, n, n, shape["cpus"], shape["memory_gib"], shape["gpus"], shape["ray_resources"], shape["extra_cpus"])
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata(name or default_name(job), verb),
        "spec": {
            "entrypoint": shlex.join(["dlray", verb, image_path(job), *overrides]),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": FINISHED_TTL_S,
            "activeDeadlineSeconds": deadline_s,
            "submitterPodTemplate": submitter_template(image),
            "rayClusterSpec": cluster_spec(head_group(image), [workers]),
        },
    }


def serve_config_v2(cfg: JobConfig, artifact: str) -> dict:
    """The Serve config (`serve deploy` format) for an artifact path as the pods see it.

    Not dlray.serve.app.serve_config: that one reads the artifact from local disk and makes its
    path absolute here, while a RayService's artifact lives on the shared volume.
    """
    from dlray.config.serve import DeploymentSettings
    from dlray.serve.app import ENDPOINTS, IMPORT_PATH

    # Serve's options and the endpoint's own settings only: a classifier takes no image limits.
    keys = (set(DeploymentSettings.model_fields) | set(ENDPOINTS[FAMILIES[cfg.model.family].task].settings.model_fields)) - {"host", "port"}
    settings = cfg.serve.model_dump(mode="json", include=keys, exclude_none=True)
    return {
        "proxy_location": "EveryNode",
        # All interfaces inside the pod; what reaches it is decided by KubeRay's serve Service (ClusterIP).
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [{"name": "dlray", "route_prefix": "/", "import_path": IMPORT_PATH, "args": {"artifact": artifact, **settings}}],
    }


def render_rayservice(job: str | os.PathLike, overrides: list[str], image: str, artifact: str, name: str | None = None) -> dict:
    """A RayService serving `artifact` (a `dlray export` directory on the shared volume) with the job's `serve:` settings."""
    if not artifact.startswith(SHARED_MOUNT + "/"):
        raise ConfigError(f"--artifact must be a directory under {SHARED_MOUNT}/ (the volume every pod mounts), got {artifact!r}")
    cfg, _ = load_for_cluster(job, list(overrides))
    serve: ServeSection = cfg.serve
    cpus = max(1, math.ceil(serve.num_cpus_per_replica))  # one replica per pod
    gpus = math.ceil(serve.num_gpus_per_replica)  # a fractional GPU still needs a whole device in the pod
    if serve.autoscaling:
        low, high = serve.autoscaling.min_replicas, serve.autoscaling.max_replicas
    else:
        low = high = serve.num_replicas
    memory_gib = GPU_WORKER_MEMORY_GIB * gpus if gpus else CPU_WORKER_MEMORY_GIB
    workers = worker_group("serve-workers", image, low, low, high, cpus, memory_gib, gpus=gpus)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata(name or default_name(job).replace("dlray-", "dlray-serve-", 1), "serve"),
        "spec": {
            "excludeHeadPodFromServeSvc": True,  # requests go to replicas' nodes, not the control plane
            "serveConfigV2": yaml.safe_dump(serve_config_v2(cfg, artifact), sort_keys=False),
            "rayClusterConfig": cluster_spec(head_group(image, serve=True, autoscaling=serve.autoscaling is not None), [workers], autoscaling=serve.autoscaling is not None),
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, the way they are written by hand."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(manifest: dict) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)


def render(job: str | os.PathLike, overrides: list[str], image: str, kind: str = "rayjob", artifact: str | None = None, name: str | None = None) -> dict:
    """What `dlray k8s render` prints. Raises ConfigError."""
    if kind == "rayjob":
        return render_rayjob(job, overrides, image, name)
    if kind == "rayservice":
        if not artifact:
            raise ConfigError("--kind rayservice needs --artifact, e.g. /mnt/shared/artifacts/cnn")
        return render_rayservice(job, overrides, image, artifact, name)
    raise ConfigError(f"--kind must be 'rayjob' or 'rayservice', got {kind!r}")
