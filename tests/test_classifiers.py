"""The vit and bert families in one process (no Ray, no process group): each debug model learns its
bundled data, `dlray export` turns it into a plain transformers directory that computes the same
logits, a pretrained base loads through model.name_or_path, gradient checkpointing changes no
gradient, and the classify endpoint's text inputs tokenize as training did.

Measured on 2 CPU cores, one thread: the ViT's 200 steps of 32 digits reach 95.5% validation
accuracy (chance: 10%); BERT's 300 steps of 32 docstrings of 32 tokens reach 72% (8 classes, the
largest with 18% of the texts; a TF-IDF logistic regression reaches 88%). They take about 4 s and
8 s with data and tokenizer on an otherwise idle machine (16 s and 28 s on a busy one).
"""

import json

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    ViTModel,
)

from dlray.artifact import load_artifact
from dlray.config import config_from_dict
from dlray.models import FAMILIES, bert, vit
from dlray.serve.classify import TextInput
from dlray.serve.errors import RequestError

from single_process import checkpointing_gradients, evaluate, export_trained, train

JOBS = {  # job, steps of 32 samples, the validation accuracy it must reach (measured: 0.955, 0.717)
    "vit": ({"model": {"family": "vit", "dropout": 0.0}, "data": {"augment": False}, "optim": {"lr": 0.002}, "scheduler": {"warmup_steps": 20}}, 200, 0.85),
    "bert": ({"model": {"family": "bert", "dropout": 0.0}, "data": {"name": "text_classification", "max_seq_len": 32},
              "optim": {"lr": 0.001}, "scheduler": {"warmup_steps": 20}}, 300, 0.6),
}


def trained_model(family: str):
    job, steps, _ = JOBS[family]
    cfg = config_from_dict(job)
    return (cfg, *train(cfg, steps, batch_size=32))


@pytest.fixture(scope="module")
def trained_vit():
    return trained_model("vit")


@pytest.fixture(scope="module")
def trained_bert():
    return trained_model("bert")


@pytest.fixture(params=list(JOBS))
def trained(request):
    return request.param, request.getfixturevalue(f"trained_{request.param}")


def test_debug_model_learns_its_bundled_data(trained):
    family, (_, data, model) = trained
    accuracy = evaluate(FAMILIES[family], model, data.val)["accuracy"]
    assert accuracy >= JOBS[family][2], f"{family}: validation accuracy {accuracy:.3f}"


def test_vit_export_classifies_with_plain_transformers(trained_vit, tmp_path):
    """As a user would: PNG-like 8-bit images through the exported image processor into
    ViTForImageClassification give the trained wrapper's logits for the same pixels in [0, 1]."""
    cfg, data, model = trained_vit
    artifact = export_trained(cfg, data, model, tmp_path)
    plain = ViTForImageClassification.from_pretrained(artifact).eval()
    pixels = (data.val.columns["image"][:32] * 255).round().to(torch.uint8)
    inputs = AutoImageProcessor.from_pretrained(artifact)(images=[Image.fromarray(p[0].numpy(), mode="L") for p in pixels], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, model(pixels.float() / 255), atol=1e-4)
    assert plain.config.id2label == dict(enumerate(data.info["class_names"]))
    served, _ = load_artifact(artifact)  # what the classify endpoint runs: the wrapper, rebuilt
    assert evaluate(vit, served, data.val) == pytest.approx(evaluate(vit, model, data.val), rel=1e-5)


def test_bert_export_classifies_with_plain_transformers(trained_bert, tmp_path):
    cfg, data, model = trained_bert
    artifact = export_trained(cfg, data, model, tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(artifact).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    texts = ["Return the event loop of the current thread.", "Parse an RFC 2822 message into a Message object. " * 10]
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    assert inputs["input_ids"].shape[1] == data.info["max_seq_len"], "the exported tokenizer truncates to the trained length"
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, model(**inputs).logits, atol=1e-5)
    assert plain.config.id2label == dict(enumerate(data.info["class_names"]))
    assert evaluate(bert, plain, data.val) == pytest.approx(evaluate(bert, model, data.val), rel=1e-5)


def test_served_texts_tokenize_and_classify_as_in_training(trained_bert):
    """The classify endpoint pads a batch to its longest text, training pads every text to
    max_seq_len: the attention mask makes them the same."""
    _, data, model = trained_bert
    inputs = TextInput(data.tokenizer, data.info["max_seq_len"])
    texts = ["Close the transport.", "Return True if the logger is enabled for the given level. " * 20, "x"]
    parsed = [inputs.parse("application/json", json.dumps({"text": text}).encode()) for text in texts]
    assert parsed == texts
    padded = data.tokenizer(texts, padding="max_length", truncation=True, max_length=data.info["max_seq_len"], return_tensors="pt")
    with torch.no_grad():
        trained_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        assert torch.allclose(inputs.logits(model, texts, torch.device("cpu")), trained_logits, atol=1e-5)


@pytest.mark.parametrize(
    "content_type, body, status, message",
    [
        ("application/json", b'{"text": ""}', 400, "text must be a non-empty string"),
        ("application/json", b'{"text": ["a", "b"]}', 400, "text must be a non-empty string"),
        ("application/json", b'{"image": [[0.5]]}', 400, '"text"'),
        ("application/json", b"{not json", 400, "not valid JSON"),
        ("text/plain", b"hello", 415, "unsupported Content-Type 'text/plain'"),
    ],
    ids=["empty", "list", "no-text", "bad-json", "content-type"],
)
def test_bad_text_requests_name_the_problem(trained_bert, content_type, body, status, message):
    _, data, _ = trained_bert
    with pytest.raises(RequestError) as err:
        TextInput(data.tokenizer, data.info["max_seq_len"]).parse(content_type, body)
    assert err.value.status == status and message in err.value.message


def test_gradient_checkpointing_computes_the_same_gradients(trained):
    family, (_, data, _) = trained
    models, grads = checkpointing_gradients(JOBS[family][0], data)
    assert [getattr(model, "model", model).is_gradient_checkpointing for model in models] == [False, True]  # vit: the wrapped model
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


DIGITS_INFO = {"image_shape": (1, 8, 8), "class_names": [str(i) for i in range(10)], "mean": [0.3], "std": [0.4]}
TEXT_INFO = {"vocab_size": 100, "pad_token_id": 0, "max_seq_len": 16, "class_names": ["email", "json", "xml"]}
TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def test_vit_fine_tunes_a_saved_base_with_its_normalisation(tmp_path):
    """A headless ViT with its image processor, as the Hub ships one: its encoder, a new head for
    the data's classes, and the processor's mean and std instead of the data's."""
    base = ViTModel(ViTConfig(image_size=8, num_channels=1, patch_size=2, **TINY), add_pooling_layer=False)
    base.save_pretrained(tmp_path)
    ViTImageProcessorPil(image_mean=[0.5], image_std=[0.25]).save_pretrained(tmp_path)
    model = vit.build({"name_or_path": str(tmp_path), "flavor": "debug", "dropout": 0.0}, DIGITS_INFO)
    assert model.model.config.id2label == dict(enumerate(DIGITS_INFO["class_names"])) and model.model.classifier.out_features == 10
    assert torch.equal(model.model.vit.embeddings.patch_embeddings.projection.weight, base.embeddings.patch_embeddings.projection.weight)
    assert (model.mean.flatten().tolist(), model.std.flatten().tolist()) == ([0.5], [0.25])
    for prefix in vit.HEAD_MODULES:
        assert model.get_submodule(prefix) is model.model.classifier

    with pytest.raises(ValueError, match="takes 1-channel 8 px images, the data has 3-channel 32 px ones: set data.channels 1 and data.image_size 8"):
        vit.build({"name_or_path": str(tmp_path), "flavor": "debug", "dropout": 0.0}, {**DIGITS_INFO, "image_shape": (3, 32, 32)})


def test_bert_fine_tunes_a_saved_classifier_with_a_new_head(tmp_path):
    """A base that is itself a classifier (2 labels) keeps its encoder and gets a head for 3."""
    base = BertForSequenceClassification(BertConfig(vocab_size=120, max_position_embeddings=32, num_labels=2, **TINY))
    base.save_pretrained(tmp_path)
    model = bert.build({"name_or_path": str(tmp_path), "flavor": "debug", "dropout": 0.0}, TEXT_INFO)
    assert model.config.id2label == {0: "email", 1: "json", 2: "xml"} and model.config.label2id == {"email": 0, "json": 1, "xml": 2}
    assert model.classifier.out_features == 3 and model.get_submodule(bert.HEAD_MODULES[0]) is model.classifier
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, base.bert.embeddings.word_embeddings.weight)

    with pytest.raises(ValueError, match="data.max_seq_len 64 exceeds the 32 positions of model.name_or_path"):
        bert.build({"name_or_path": str(tmp_path), "flavor": "debug", "dropout": 0.0}, {**TEXT_INFO, "max_seq_len": 64})


def test_vit_flavor_needs_images_as_large_as_its_patches():
    with pytest.raises(ValueError, match="model.flavor 'small' cuts images into 16x16 patches: the data's 8 px images need data.image_size >= 16"):
        vit.build({"flavor": "small", "dropout": 0.0}, DIGITS_INFO)
