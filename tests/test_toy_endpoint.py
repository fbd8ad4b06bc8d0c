"""The toy endpoint (tests/toy_endpoint.py), added by the README's recipe alone, served over real HTTP
on 127.0.0.1 through dlray.serve.app like the shipped ones: its settings, its route, the shared
/healthz and error shape, and `dlray serve`'s description of it."""

import json
import shlex

import httpx
import pytest
import ray.cloudpickle
import torch

from dlray.artifact import load_artifact, write_artifact
from dlray.config import ConfigError, load_config
from dlray.models import FAMILIES
from dlray.serve import app

import toy_endpoint
from helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """An untrained debug CNN exported for the task "logits"."""
    cfg = load_config(REPO / "jobs/debug/cnn_cpu.yaml")
    info = {"image_shape": [1, 8, 8], "class_names": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}
    model_cfg = cfg.model.model_dump()
    torch.manual_seed(0)
    return write_artifact(FAMILIES["cnn"].build(model_cfg, info), {"task": "logits", "model": model_cfg, "data_info": info, "serve": cfg.serve.model_dump()},
                          tmp_path_factory.mktemp("toy") / "logits")


@pytest.fixture(scope="module")
def server(artifact, serve_artifact):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(app.ENDPOINTS, "logits", toy_endpoint.TOY)  # the registry line
        # Replicas import what they run by module name, and tests/ is on no replica's path: its code travels by value.
        ray.cloudpickle.register_pickle_by_value(toy_endpoint)
        try:
            yield serve_artifact(artifact, max_images_per_request=2)
        finally:
            ray.cloudpickle.unregister_pickle_by_value(toy_endpoint)


def test_the_toy_endpoint_answers_as_its_model_does(server, artifact):
    images = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    response = httpx.post(f"{server}/v1/logits", json={"images": images.tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    model, _ = load_artifact(artifact)
    with torch.no_grad():
        expected = model(images.unsqueeze(1))
    assert torch.allclose(torch.tensor(response.json()["logits"]), expected, atol=1e-5)
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok", "dtype": "fp32", "input_shape": [1, 8, 8]}


@pytest.mark.parametrize("body, message", [
    ({"images": [[[0.5] * 8] * 8] * 3}, "at most 2 (serve.max_images_per_request), got 3"),  # its own setting, from the app builder
    ({"images": [[[0.5] * 7] * 8]}, "each image must have shape [8, 8]"),
    ({"pixels": []}, "pixels: Extra inputs are not permitted"),
])
def test_bad_requests_get_the_shared_4xx_json_and_the_replica_keeps_serving(server, body, message):
    response = httpx.post(f"{server}/v1/logits", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert httpx.post(f"{server}/v1/logits", json={"images": [[[0.5] * 8] * 8]}, timeout=30).status_code == 200


def test_its_settings_are_checked_and_described_by_the_app(server, artifact):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(app.ENDPOINTS, "logits", toy_endpoint.TOY)
        with pytest.raises(ConfigError, match=r"serve.max_images_per_request: must be greater than or equal to 1, got 0"):
            app.build_app({"artifact": str(artifact), "max_images_per_request": 0})
        with pytest.raises(ConfigError, match=r"unknown key serve.chat for the logits endpoint; allowed keys: .*max_images_per_request"):
            app.build_app({"artifact": str(artifact), "chat": False})
        described = app.describe(str(artifact)).splitlines()
    assert "  POST http://127.0.0.1:8000/v1/logits" in described and described[-2] == "example:"
    curl = shlex.split(described[-1])
    body = json.loads(curl[curl.index("-d") + 1])
    assert httpx.post(f"{server}/v1/logits", json=body, timeout=30).status_code == 200  # the example works
