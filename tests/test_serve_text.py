"""Serving an exported BERT text classifier over real HTTP on 127.0.0.1 (Ray Serve, @serve.batch):
the same /v1/classify as images, with {"text": ...} bodies tokenized in the replica."""

import asyncio

import httpx
import pytest
import torch

from dlray.config import config_from_dict

from single_process import export_trained, train

pytestmark = pytest.mark.slow
JOB = {"model": {"family": "bert", "dropout": 0.0}, "data": {"name": "text_classification", "max_seq_len": 32}, "optim": {"lr": 0.001}}


@pytest.fixture(scope="module")
def server(serve_artifact, tmp_path_factory):
    cfg = config_from_dict(JOB)
    data, model = train(cfg, steps=100, batch_size=32)
    artifact = export_trained(cfg, data, model, tmp_path_factory.mktemp("bert"))
    return serve_artifact(artifact, name="bert", max_batch_size=16), data, model


def test_served_texts_get_the_trained_models_probabilities(server):
    base, data, model = server
    texts = [data.tokenizer.decode(ids, skip_special_tokens=True) for ids in data.test.columns["input_ids"][:40]]

    async def classify_all():
        async with httpx.AsyncClient(timeout=60) as client:
            responses = await asyncio.gather(*(client.post(f"{base}/v1/classify", json={"text": text}) for text in texts))
        return [r.json() for r in responses]

    served = asyncio.run(classify_all())  # all at once: batched (and padded together) by @serve.batch
    encoded = data.tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits, -1)
    served_probs = torch.tensor([[r["probabilities"][name] for name in data.info["class_names"]] for r in served])
    assert torch.allclose(served_probs, expected, atol=1e-5)
    assert [r["label"] for r in served] == [data.info["class_names"][i] for i in expected.argmax(-1)]


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"json": {"text": ""}}, 400, "text must be a non-empty string"),
        ({"json": {"image": [[0.5]]}}, 400, '"text"'),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported Content-Type"),
        ({"content": b"x" * 3_000_000, "headers": {"content-type": "application/json"}}, 413, "exceeds the limit"),
    ],
    ids=["empty", "no-text", "content-type", "too-big"],
)
def test_bad_text_requests_get_4xx_json_and_the_replica_keeps_serving(server, kwargs, status, message):
    base, data, _ = server
    response = httpx.post(f"{base}/v1/classify", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    good = httpx.post(f"{base}/v1/classify", json={"text": "Return the running event loop."})
    assert good.status_code == 200 and good.json()["label"] in data.info["class_names"]


def test_healthz_reports_the_text_input(server):
    base, data, _ = server
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok", "classes": len(data.info["class_names"]), "dtype": "fp32", "max_seq_len": 32}
