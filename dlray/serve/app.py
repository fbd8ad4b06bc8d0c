"""The Serve application builder: one import path for `dlray serve`, `serve run`, `serve deploy`
and KubeRay's RayService.

    dlray serve out/cnn
    serve run dlray.serve.app:build_app artifact=out/cnn
    dlray serve out/cnn --print-config > serve.yaml && serve deploy serve.yaml
"""

from __future__ import annotations

import json
import os
import shlex
from typing import TypeVar

import ray
from pydantic import BaseModel, ValidationError, create_model
from ray import serve
from ray.serve import Application

from dlray.artifact import read_artifact_config
from dlray.config import ConfigError
from dlray.config.dotted import messages
from dlray.config.serve import DeploymentSettings, EndpointSettings, GenerateSettings
from dlray.serve import classify, generate, images
from dlray.serve.endpoint import Endpoint
from dlray.serve.openai_text import model_name
from dlray.serve.vllm import build_vllm_app, choose_engine

# An artifact's task (dlray.json; its family's `task`) -> the endpoint that serves it.
ENDPOINTS: dict[str, Endpoint] = {"classify": classify.ENDPOINT, "images": images.ENDPOINT, "generate": generate.ENDPOINT}
IMPORT_PATH = "dlray.serve.app:build_app"
Model = TypeVar("Model", bound=BaseModel)


def build_app(args: dict) -> Application:
    """`args`: {"artifact": dir} plus any `serve:` keys (max_batch_size, num_replicas, ...) to override."""
    if "artifact" not in args:
        raise ValueError(f"{IMPORT_PATH} needs args.artifact: a directory written by `dlray export`")
    artifact = os.path.abspath(os.path.expanduser(args["artifact"]))
    config = read_artifact_config(artifact)
    endpoint = endpoint_of(artifact, config)
    deployment, settings = serve_settings(artifact, config, {k: v for k, v in args.items() if k != "artifact"})
    if endpoint.prepare:
        settings = endpoint.prepare(artifact, config, settings)
    if isinstance(settings, GenerateSettings) and choose_engine(artifact, config, settings, deployment.num_gpus_per_replica > 0)[0] == "vllm":
        return build_vllm_app(artifact, model_name(artifact, settings.served_model_name), deployment, settings)
    options = {"max_ongoing_requests": deployment.max_ongoing_requests,
               "ray_actor_options": {"num_cpus": deployment.num_cpus_per_replica, "num_gpus": deployment.num_gpus_per_replica}}
    if deployment.autoscaling:
        options["autoscaling_config"] = deployment.autoscaling.model_dump()
    else:
        options["num_replicas"] = deployment.num_replicas
    return endpoint.deployment.options(**options).bind(artifact, settings)


def endpoint_of(artifact: str, config: dict) -> Endpoint:
    if config["task"] not in ENDPOINTS:
        raise ValueError(f"{artifact}: dlray has no serving endpoint for task {config['task']!r} yet (endpoints: {', '.join(ENDPOINTS)})")
    return ENDPOINTS[config["task"]]


def serve_settings(artifact: str, config: dict, overrides: dict) -> tuple[DeploymentSettings, EndpointSettings]:
    """The deployment's settings and those of the artifact's endpoint: the artifact's `serve:` section (its
    job's, which holds every shipped endpoint's keys) with `overrides` applied, each override a key of one or
    the other. Raises ConfigError naming the dotted keys at fault and what is allowed."""
    endpoint = endpoint_of(artifact, config).settings
    unknown = sorted(set(overrides) - set(DeploymentSettings.model_fields) - set(endpoint.model_fields))
    if unknown:
        raise ConfigError(f"unknown key {', '.join(f'serve.{key}' for key in unknown)} for the {config['task']} endpoint; "
                          f"allowed keys: {', '.join([*DeploymentSettings.model_fields, *endpoint.model_fields])}")
    merged = {**config.get("serve", {}), **overrides}
    return checked(DeploymentSettings, merged), checked(endpoint, merged)


def checked(model: type[Model], values: dict) -> Model:
    """`model` from the keys of `values` it has; errors worded as the job config's, by dotted key (serve.xxx)."""
    section = create_model(f"Serve{model.__name__}", serve=(model, ...))
    try:
        return section.model_validate({"serve": {key: value for key, value in values.items() if key in model.model_fields}}).serve
    except ValidationError as err:
        raise ConfigError("\n".join(messages(err, section))) from None


class ServeAddressError(RuntimeError):
    """Serve already listens on another host/port of this Ray cluster than the one asked for."""


def check_serve_address(host: str, port: int) -> None:
    """Refuse an address a running Serve is not on: Serve's HTTP options are fixed when it first
    starts on a cluster, and a later serve.start(http_options=...) only logs a warning and keeps them."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE  # Ray has no public getter for a running Serve's HTTP options

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # Serve is not running: serve.start starts it where asked
        return
    running = ray.get(controller.get_http_config.remote())
    if (running.host, running.port) != (host, port):
        choice = f"port={running.port}" + (f" host={running.host}" if running.host != host else "")
        raise ServeAddressError(
            f"Serve already listens on {running.host}:{running.port} on this Ray cluster, not on {host}:{port} as asked. "
            f"Serve where it listens with {choice}, or stop Serve first (`serve shutdown`, which deletes its applications) to start it on {host}:{port}"
        )


def run(artifact: str, overrides: dict | None = None, verbose: bool = True):
    """Start Serve's HTTP proxy on the configured host/port and deploy the artifact's endpoint; return once it
    is up. Not `verbose` (the CLI's default): Serve's INFO lines and its per-request access log stay off."""
    overrides = overrides or {}
    deployment, _ = serve_settings(artifact, read_artifact_config(artifact), overrides)
    check_serve_address(deployment.host, deployment.port)
    quiet = {} if verbose else {"logging_config": {"log_level": "WARNING", "enable_access_log": False}}
    serve.start(http_options={"host": deployment.host, "port": deployment.port}, **quiet)  # the controller and proxies
    return serve.run(build_app({"artifact": artifact, **overrides}), name="dlray", route_prefix="/", **quiet)  # the replicas


def engine_of(artifact: str, overrides: dict | None = None) -> tuple[str, str] | None:
    """A text artifact's (engine, why) as build_app picks it (dlray.serve.vllm.choose_engine); None for other tasks."""
    config = read_artifact_config(artifact)
    deployment, settings = serve_settings(artifact, config, overrides or {})
    return choose_engine(artifact, config, settings, deployment.num_gpus_per_replica > 0) if isinstance(settings, GenerateSettings) else None


def describe(artifact: str, overrides: dict | None = None) -> str:
    """What `dlray serve` prints once the app is up: the URL of every route, and a curl command that
    calls the main one with a request this artifact's model accepts."""
    config = read_artifact_config(artifact)
    deployment, settings = serve_settings(artifact, config, overrides or {})
    base = f"http://{deployment.host}:{deployment.port}"
    endpoint = endpoint_of(artifact, config)
    if (engine_of(artifact, overrides) or ("",))[0] == "vllm":  # Ray Serve LLM's OpenAI routes, not dlray's
        routes = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
    else:
        routes = [(method.upper(), path) for path, operations in endpoint.api.openapi()["paths"].items() for method in operations]
        routes += [("GET", path) for path in (endpoint.api.docs_url, endpoint.api.openapi_url) if path]
    path, body, options = endpoint.example_request(os.path.abspath(artifact), config, settings)
    curl = shlex.join(["curl", "-s", base + path, "-H", "content-type: application/json", "-d", json.dumps(body)])
    return "\n".join([*(f"  {method:<4} {base}{route}" for method, route in routes), "example:", f"  {curl}{options}"])


def serve_config(artifact: str, overrides: dict | None = None) -> dict:
    """A Serve config file (the `serve deploy` / RayService `serveConfigV2` format) for an artifact."""
    overrides = overrides or {}
    deployment, _ = serve_settings(artifact, read_artifact_config(artifact), overrides)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": deployment.host, "port": deployment.port},
        "applications": [{"name": "dlray", "route_prefix": "/", "import_path": IMPORT_PATH, "args": {"artifact": os.path.abspath(artifact), **overrides}}],
    }
