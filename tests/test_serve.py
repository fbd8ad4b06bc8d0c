"""Serving the exported digits CNN over real HTTP on 127.0.0.1 (Ray Serve, @serve.batch)."""

import asyncio
import base64

import httpx
import pytest
import torch
import yaml
from ray.serve.schema import ServeDeploySchema

from dlray.artifact import load_artifact
from dlray.data import build_data
from dlray.png import png_bytes
from dlray.serve.app import serve_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(digits_run, serve_artifact):
    cfg, _, _, artifact = digits_run
    return serve_artifact(artifact, max_batch_size=16), artifact, build_data(cfg.data, seed=cfg.train.seed).test


def test_served_model_gives_the_trained_models_answers(server):
    base, artifact, test = server
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.stack([test[i][1] for i in range(len(test))])

    async def classify_all():
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{base}/v1/classify", json={"image": im.tolist()}) for im in images))
        return [r.json() for r in responses]

    served = asyncio.run(classify_all())  # all at once: exercised through @serve.batch
    model, _ = load_artifact(artifact)
    with torch.no_grad():
        expected = torch.softmax(model(images), -1)
    served_probs = torch.tensor([[r["probabilities"][name] for name in map(str, range(10))] for r in served])
    assert torch.allclose(served_probs, expected, atol=1e-5)
    assert [r["label_index"] for r in served] == expected.argmax(-1).tolist()
    accuracy = (torch.tensor([r["label_index"] for r in served]) == labels).float().mean().item()
    assert accuracy >= 0.97


def test_png_and_base64_inputs_agree_with_pixel_lists(server):
    base, _, test = server
    for i in range(5):
        image = test[i][0]
        from_list = httpx.post(f"{base}/v1/classify", json={"image": image[0].tolist()}).json()
        png = png_bytes(image * 2 - 1)  # png_bytes takes [-1, 1]
        from_png = httpx.post(f"{base}/v1/classify", content=png, headers={"content-type": "image/png"}).json()
        from_b64 = httpx.post(f"{base}/v1/classify", json={"image_b64": base64.b64encode(png).decode()}).json()
        assert from_list["label"] == from_png["label"] == from_b64["label"]


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"json": {"image": [[0.5] * 7] * 8}}, 400, "image must have shape [1, 8, 8]"),
        ({"json": {"image": [[0.5] * 8, [0.5] * 3]}}, 400, "rectangular nested list"),
        ({"json": {"image": [[255] * 8] * 8}}, 400, "within [0, 1]"),
        ({"json": {"pixels": []}}, 400, '"image"'),
        ({"json": ["not", "an", "object"]}, 400, '"image"'),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"\x89PNG garbage", "headers": {"content-type": "image/png"}}, 400, "not a decodable PNG/JPEG"),
        ({"json": {"image_b64": "%%%"}}, 400, "not valid base64"),
        ({"content": b"x" * 3_000_000, "headers": {"content-type": "image/png"}}, 413, "exceeds the limit"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported Content-Type"),
        ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ],
    ids=["shape", "ragged", "range", "missing-key", "not-object", "bad-json", "not-image", "bad-base64", "too-big", "content-type", "empty"],
)
def test_bad_requests_get_4xx_json_and_the_replica_keeps_serving(server, kwargs, status, message):
    base, _, test = server
    response = httpx.post(f"{base}/v1/classify", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    good = httpx.post(f"{base}/v1/classify", json={"image": test[0][0].tolist()})
    assert good.status_code == 200 and good.json()["label"] in map(str, range(10))


def test_healthz(server):
    base, _, _ = server
    response = httpx.get(f"{base}/healthz")
    assert response.status_code == 200 and response.json()["input_shape"] == [1, 8, 8]
    assert response.json()["dtype"] == "fp32"  # serve.dtype auto on a CPU replica


def test_a_bf16_replica_casts_the_pixels_and_answers_as_the_model_does(server, serve_artifact):
    """serve.dtype bf16 (what `auto` takes on GPUs; a CPU replica only when asked): the model and each
    batch of pixels in bf16, the probabilities the fp32 model's within bf16 rounding."""
    _, artifact, test = server
    images = torch.stack([test[i][0] for i in range(32)])

    async def classify_all(base):
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{base}/v1/classify", json={"image": im.tolist()}) for im in images))
        return [r.json() for r in responses]

    base = serve_artifact(artifact, name="bf16", dtype="bf16")  # beside the fp32 app
    assert httpx.get(f"{base}/healthz").json()["dtype"] == "bf16"
    served = asyncio.run(classify_all(base))
    model, _ = load_artifact(artifact)
    with torch.no_grad():
        expected = torch.softmax(model(images), -1)
    served_probs = torch.tensor([[r["probabilities"][name] for name in map(str, range(10))] for r in served])
    difference = (served_probs - expected).abs().max()
    # In fp32 the replica agrees to 1e-5 (test_served_model_gives_the_trained_models_answers); bf16 rounding moved a
    # debug CNN's probabilities by up to 0.007.
    assert 1e-5 < difference < 0.03, difference


def test_serve_config_is_a_valid_serve_deploy_file(server):
    _, artifact, _ = server
    config = serve_config(str(artifact), {"num_replicas": 2})
    ServeDeploySchema.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    assert config["applications"][0]["import_path"] == "dlray.serve.app:build_app"
    assert config["applications"][0]["args"]["num_replicas"] == 2
