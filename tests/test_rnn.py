"""The rnn family in one process (no Ray, no process group): the debug LSTM and a two-layer bidirectional
GRU learn the bundled digits read row by row, the classify endpoint's JSON sequences give the exported
model's answers (Ray Serve over HTTP on 127.0.0.1 in the one slow test), and the config's rnn keys
are checked. The sequences source reads labelled sequences from .jsonl / .csv / .parquet files, in
memory and streamed (through the session's Ray), and names a bad row. The strategy matrix (tests/test_strategies.py) trains it under DDP, FSDP and ZeRO-3.

Measured on 2 CPU cores, one thread: 150 steps of 32 digits take about 1 s per variant and reach 76%
(LSTM, one layer of 16) and 85% (GRU, 2 bidirectional layers of 16) validation accuracy (chance: 10%).
"""

import asyncio
import functools
import json
import re

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlray.artifact import load_artifact
from dlray.config import ConfigError, config_from_dict
from dlray.data import build_data, data_config
from dlray.models import FAMILIES
from dlray.models.rnn import RecurrentLayer
from dlray.serve.classify import SequenceInput
from dlray.serve.errors import RequestError

from single_process import evaluate, export_trained, train

DEBUG = {"model": {"family": "rnn", "flavor": "debug", "dropout": 0.0}, "data": {"augment": False}, "optim": {"lr": 0.01}}
VARIANTS = {  # model keys on top of DEBUG's, and the validation accuracy 150 steps must reach
    "lstm": ({"cell": "lstm"}, 0.6),
    "gru-2-bidirectional": ({"cell": "gru", "num_layers": 2, "bidirectional": True, "dropout": 0.1}, 0.6),
}
STEPS = 150


@functools.cache
def trained_variant(name: str):
    """(name, cfg, data, model) of VARIANTS[name], trained once per session."""
    cfg = config_from_dict({**DEBUG, "model": {**DEBUG["model"], **VARIANTS[name][0]}})
    return name, cfg, *train(cfg, STEPS, batch_size=32)


@pytest.fixture(params=list(VARIANTS))
def trained(request):
    return trained_variant(request.param)


def test_debug_model_learns_the_digits_read_row_by_row(trained):
    name, cfg, data, model = trained
    accuracy = evaluate(FAMILIES["rnn"], model, data.val)["accuracy"]
    assert accuracy >= VARIANTS[name][1], f"{name}: validation accuracy {accuracy:.3f}"
    layers = [module for module in model.modules() if isinstance(module, RecurrentLayer)]
    assert len(layers) == (cfg.model.num_layers or 1)  # FSDP's blocks: one per layer
    assert all(isinstance(layer.rnn, torch.nn.GRU if cfg.model.cell == "gru" else torch.nn.LSTM) for layer in layers)
    assert all(layer.rnn.bidirectional == cfg.model.bidirectional for layer in layers)


def test_an_image_is_read_as_its_rows(trained):
    _, _, data, model = trained
    images = data.val.columns["image"][:16]  # (16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(images), model(images[:, 0]))  # 8 steps of the 8 pixels of each row


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bf16_autocast_computes_what_fp32_does(cell):
    """DDP's and DeepSpeed's bf16 autocast on a CPU (oneDNN's bf16 LSTM kernel fails where bf16 is not native)."""
    cfg = config_from_dict({**DEBUG, "model": {**DEBUG["model"], "cell": cell, "num_layers": 2, "bidirectional": True}})
    info = {"image_shape": [1, 8, 8], "class_names": [str(c) for c in range(10)], "mean": [0.3], "std": [0.4]}
    torch.manual_seed(0)
    model, images = FAMILIES["rnn"].build(cfg.model.model_dump(), info), torch.rand(4, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(images)
    mixed.float().sum().backward()
    assert mixed.dtype == torch.bfloat16 and all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert torch.allclose(mixed.float(), model(images), atol=0.05)


def test_served_sequences_classify_as_the_trained_model(trained, tmp_path):
    """The exported model behind the endpoint's sequence input: JSON rows of the validation digits give the trained model's logits."""
    _, cfg, data, model = trained
    artifact = export_trained(cfg, data, model, tmp_path)
    served, config = load_artifact(artifact)
    inputs = SequenceInput.from_artifact(str(artifact), config["data_info"])
    assert inputs.describe() == {"input_shape": [8, 8]}
    images = data.val.columns["image"][:16]
    parsed = [inputs.parse("application/json", json.dumps({"sequence": image[0].tolist()}).encode()) for image in images]
    with torch.no_grad():
        assert torch.allclose(inputs.logits(served, parsed, torch.device("cpu")), model(images), atol=1e-5)


@pytest.mark.parametrize(
    "content_type, body, status, message",
    [
        ("application/json", {"sequence": [[0.5] * 8] * 7}, 400, "sequence must have shape [8, 8], got [7, 8]"),
        ("application/json", {"sequence": [0.5] * 8}, 400, "sequence must have shape [8, 8], got [8]"),
        ("application/json", {"sequence": [[0.5] * 8, [0.5] * 3]}, 400, "rectangular nested list"),
        ("application/json", {"sequence": [["a"] * 8] * 8}, 400, "rectangular nested list"),
        ("application/json", {"sequence": [[float("nan")] * 8] * 8}, 400, "finite"),
        ("application/json", {"image": [[0.5] * 8] * 8}, 400, '"sequence"'),
        ("text/plain", "hello", 415, "unsupported Content-Type 'text/plain'"),
    ],
    ids=["steps", "flat", "ragged", "strings", "nan", "no-sequence", "content-type"],
)
def test_bad_sequence_requests_name_the_problem(content_type, body, status, message):
    inputs = SequenceInput.from_artifact("", {"image_shape": [1, 8, 8]})
    with pytest.raises(RequestError) as err:
        inputs.parse(content_type, (json.dumps(body) if isinstance(body, dict) else body).encode())
    assert err.value.status == status and message in err.value.message, err.value.message


def test_one_feature_sequences_may_be_flat_lists():
    inputs = SequenceInput.from_artifact("", {"sequence_shape": [3, 1]})
    assert inputs.parse("application/json", b'{"sequence": [1, 2.5, -3]}').tolist() == [[1.0], [2.5], [-3.0]]


@pytest.mark.parametrize(
    "job, message",
    [
        ({"model": {"family": "cnn", "cell": "gru"}}, "model.cell applies only to model.family 'rnn', got model.family 'cnn'"),
        ({"model": {"family": "vit", "bidirectional": True}}, "model.bidirectional applies only to model.family 'rnn'"),
        ({"model": {"family": "rnn", "cell": "rnn_tanh"}}, "model.cell"),
        ({"model": {"family": "rnn", "num_layers": 0}}, "model.num_layers"),
        ({"model": {"family": "rnn"}, "data": {"name": "text_classification"}}, "model.family 'rnn' trains on image or sequence data"),
    ],
    ids=["cell-for-cnn", "bidirectional-for-vit", "unknown-cell", "no-layers", "text-data"],
)
def test_rnn_keys_are_checked(job, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_from_dict(job)


@pytest.mark.slow
def test_served_over_http(serve_artifact, tmp_path):
    """The exported LSTM: POST /v1/classify with JSON sequences, all at once (through @serve.batch), a bad one, and /healthz."""
    _, cfg, data, model = trained_variant("lstm")
    base = serve_artifact(export_trained(cfg, data, model, tmp_path), name="rnn")
    images = data.val.columns["image"][:32]

    async def classify_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{base}/v1/classify", json={"sequence": image[0].tolist()}) for image in images))

    served = [response.json() for response in asyncio.run(classify_all())]
    with torch.no_grad():
        expected = torch.softmax(model(images), -1)
    probabilities = torch.tensor([[answer["probabilities"][str(c)] for c in range(10)] for answer in served])
    assert torch.allclose(probabilities, expected, atol=1e-5)
    bad = httpx.post(f"{base}/v1/classify", json={"sequence": [[0.5] * 8] * 7})
    assert bad.status_code == 400 and "sequence must have shape [8, 8]" in bad.json()["error"]["message"]
    assert httpx.get(f"{base}/healthz").json()["input_shape"] == [8, 8]


def digits_as_sequence_files(directory, suffix: str, count: int | None = None) -> str:
    """The bundled digits (the first `count`) written as rows of a sequences file: 8 steps of 8 numbers and a label
    (a .csv cell holds the steps as JSON)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = [{"sequence": (image / 16).tolist(), "label": int(label)} for image, label in zip(digits.images[:count], digits.target[:count])]
    path = directory / f"digits{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(map(json.dumps, rows)))
    elif suffix == ".csv":
        path.write_text("sequence,label\n" + "\n".join(f'"{json.dumps(row["sequence"])}",{row["label"]}' for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_sequences_from_files_train_the_rnn(suffix, tmp_path):
    """Rows with a sequence column and a label, from each kind of file, give the same samples; the debug LSTM learns them."""
    cfg = config_from_dict({**DEBUG, "data": {"name": "sequences", "path": digits_as_sequence_files(tmp_path, suffix)}})
    data = build_data(cfg.data, seed=cfg.train.seed)
    assert data.columns == ("sequence", "label") and data.info["sequence_shape"] == [8, 8]
    assert data.info["class_names"] == [str(c) for c in range(10)]
    assert sum(map(len, (data.train, data.val, data.test))) == 1797 and data.train.columns["sequence"].shape[1:] == (8, 8)
    if suffix == ".parquet":  # one format trains: the others give the same samples (the split hashes the values)
        data, model = train(cfg, STEPS, batch_size=32)
        assert evaluate(FAMILIES["rnn"], model, data.val)["accuracy"] >= VARIANTS["lstm"][1]


def test_one_feature_sequences_and_bad_rows(tmp_path):
    path = tmp_path / "series.jsonl"
    path.write_text("\n".join(json.dumps({"values": [i, i + 1, i + 2], "kind": "up" if i % 2 else "down"}) for i in range(40)))
    data = build_data(data_config(name="sequences", path=str(path), sequence_field="values", label_field="kind"), seed=0)
    assert data.info["sequence_shape"] == [3, 1] and data.info["class_names"] == ["down", "up"]
    for rows, message in [([{"sequence": [1, 2, 3], "label": 0}, {"sequence": [1, 2], "label": 1}], "row 2: a sequence of shape [2, 1]"),
                          ([{"sequence": [[1, 2], [3]], "label": 0}], "row 1: data.sequence_field 'sequence' holds"),
                          ([{"sequence": "1 2 3", "label": 0}], "not a JSON list of numbers"),
                          ([{"values": [1, 2], "label": 0}], "data.sequence_field 'sequence' is not a column")]:
        path.write_text("\n".join(map(json.dumps, rows * 20)))
        with pytest.raises(ValueError, match=re.escape(message)):
            build_data(data_config(name="sequences", path=str(path), test_fraction=0.0, val_fraction=0.0), seed=0)


def test_sequences_stream_as_they_load(ray_cluster, tmp_path):
    """Streamed (Ray Data), the same splits and samples as in memory."""
    from dlray.streaming import build_streamed_data

    path = digits_as_sequence_files(tmp_path, ".parquet", count=300)
    in_memory = build_data(data_config(name="sequences", path=path), seed=0)
    streamed = build_streamed_data(data_config(name="sequences", path=path, streaming=True), seed=0, num_workers=2)
    assert streamed.info == in_memory.info and streamed.columns == ("sequence", "label")
    assert streamed.rows["test"] == len(in_memory.test)
    batch = streamed.datasets["test"].take_batch(len(in_memory.test))
    assert np.array_equal(batch["sequence"], in_memory.test.columns["sequence"].numpy())
    assert np.array_equal(batch["label"], in_memory.test.columns["label"].numpy())
