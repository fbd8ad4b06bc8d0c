"""The Serve application builder: one import path for `dlray serve`, `serve run`, `serve deploy`
and KubeRay's RayService.

    dlray serve out/cnn
    serve run dlray.serve.app:build_app artifact=out/cnn
    dlray serve out/cnn --print-config > serve.yaml && serve deploy serve.yaml
"""

from __future__ import annotations

import base64
import json
import os
import shlex

import ray
import torch
from ray import serve
from ray.serve import Application

from dlray.artifact import read_artifact_config
from dlray.config import ServeSection
from dlray.png import png_bytes
from dlray.serve.classify import Classifier
from dlray.serve.classify import api as classify_api
from dlray.serve.generate import TextGenerator
from dlray.serve.generate import api as generate_api
from dlray.serve.images import ImageGenerator
from dlray.serve.images import api as images_api
from dlray.serve.openai_text import check_chat_template, model_name

ENDPOINTS = {"classify": Classifier, "images": ImageGenerator, "generate": TextGenerator}
APIS = {"classify": classify_api, "images": images_api, "generate": generate_api}  # each endpoint's FastAPI app: its routes
# The `serve:` keys each endpoint takes besides max_body_bytes and dtype, which every endpoint takes.
ENDPOINT_SETTINGS = {
    "classify": ("max_batch_size", "batch_wait_timeout_s"),
    "images": ("max_batch_size", "batch_wait_timeout_s", "max_images_per_request", "max_inference_steps", "num_inference_steps", "scheduler"),
    "generate": ("max_num_seqs", "max_batch_total_tokens", "max_queue_len", "stream_interval", "max_tokens_limit", "max_completions_per_request", "chat",
                 "api_key_env", "served_model_name", "adapters"),  # continuous batching: no @serve.batch settings
}
IMPORT_PATH = "dlray.serve.app:build_app"


def build_app(args: dict) -> Application:
    """`args`: {"artifact": dir} plus any `serve:` keys (max_batch_size, num_replicas, ...) to override."""
    if "artifact" not in args:
        raise ValueError(f"{IMPORT_PATH} needs args.artifact: a directory written by `dlray export`")
    artifact = os.path.abspath(os.path.expanduser(args["artifact"]))
    config = read_artifact_config(artifact)
    if config["task"] not in ENDPOINTS:
        raise ValueError(f"{artifact}: dlray has no serving endpoint for task {config['task']!r} yet (endpoints: {', '.join(ENDPOINTS)})")
    settings = serve_settings(config, {k: v for k, v in args.items() if k != "artifact"})
    if settings.adapters:  # replicas run elsewhere: their paths must not depend on this directory
        settings.adapters = {name: os.path.abspath(os.path.expanduser(path)) for name, path in settings.adapters.items()}
    if config["task"] == "generate":
        from transformers import AutoTokenizer

        check_chat_template(AutoTokenizer.from_pretrained(artifact), artifact, settings.chat)
    options = {"max_ongoing_requests": settings.max_ongoing_requests, "ray_actor_options": {"num_cpus": settings.num_cpus_per_replica, "num_gpus": settings.num_gpus_per_replica}}
    if settings.autoscaling:
        options["autoscaling_config"] = settings.autoscaling.model_dump()
    else:
        options["num_replicas"] = settings.num_replicas
    keys = ("max_body_bytes", "dtype", *ENDPOINT_SETTINGS[config["task"]])
    return ENDPOINTS[config["task"]].options(**options).bind(artifact, **{key: getattr(settings, key) for key in keys})


def serve_settings(artifact_config: dict, overrides: dict) -> ServeSection:
    """The artifact's `serve:` section (from its training config) with overrides applied and checked."""
    return ServeSection.model_validate({**artifact_config.get("serve", {}), **overrides})


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
    settings = serve_settings(read_artifact_config(artifact), overrides)
    check_serve_address(settings.host, settings.port)
    quiet = {} if verbose else {"logging_config": {"log_level": "WARNING", "enable_access_log": False}}
    serve.start(http_options={"host": settings.host, "port": settings.port}, **quiet)  # the controller and proxies
    return serve.run(build_app({"artifact": artifact, **overrides}), name="dlray", route_prefix="/", **quiet)  # the replicas


def describe(artifact: str, overrides: dict | None = None) -> str:
    """What `dlray serve` prints once the app is up: the URL of every route, and a curl command that
    calls the main one with a request this artifact's model accepts."""
    config = read_artifact_config(artifact)
    settings = serve_settings(config, overrides or {})
    base = f"http://{settings.host}:{settings.port}"
    api = APIS[config["task"]]
    routes = [(method.upper(), path) for path, operations in api.openapi()["paths"].items() for method in operations]
    routes += [("GET", path) for path in (api.docs_url, api.openapi_url) if path]
    path, body, options = example_request(os.path.abspath(artifact), config, settings)
    curl = shlex.join(["curl", "-s", base + path, "-H", "content-type: application/json", "-d", json.dumps(body)])
    return "\n".join([*(f"  {method:<4} {base}{route}" for method, route in routes), "example:", f"  {curl}{options}"])


def example_request(artifact: str, config: dict, settings: ServeSection) -> tuple[str, dict, str]:
    """(path, JSON body, further curl options as shell text) of a request to the artifact's main route."""
    if config["task"] == "classify":
        shape = config["data_info"].get("image_shape")
        if shape:  # a mid-grey PNG of the trained size: a short body whatever the size
            return "/v1/classify", {"image_b64": base64.b64encode(png_bytes(torch.full(shape, 0.5))).decode()}, ""
        return "/v1/classify", {"text": "an example sentence to classify"}, ""
    if config["task"] == "images":  # a class-conditional model needs a class: its first one, by name
        prompt = {"prompt": config["data_info"]["class_names"][0]} if config["model"].get("class_conditional") else {}
        return "/v1/images/generations", {**prompt, "seed": 0}, " -H 'accept: image/png' -o image.png"
    body = {"model": model_name(artifact, settings.served_model_name), "prompt": "Once upon a time", "max_tokens": min(16, settings.max_tokens_limit)}
    key = f' -H "authorization: Bearer ${settings.api_key_env}"' if settings.api_key_env else ""  # the shell fills in the key
    return "/v1/completions", body, key


def serve_config(artifact: str, overrides: dict | None = None) -> dict:
    """A Serve config file (the `serve deploy` / RayService `serveConfigV2` format) for an artifact."""
    overrides = overrides or {}
    settings = serve_settings(read_artifact_config(artifact), overrides)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [{"name": "dlray", "route_prefix": "/", "import_path": IMPORT_PATH, "args": {"artifact": os.path.abspath(artifact), **overrides}}],
    }
