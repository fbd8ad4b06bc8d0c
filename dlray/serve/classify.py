"""Classification endpoint over an exported image classifier (cnn, vit), text classifier (bert) or sequence classifier (rnn).

    POST /v1/classify
      image classifiers:
      Content-Type: image/png | image/jpeg     raw image bytes
      Content-Type: application/json          {"image": [[...]]}      pixels in [0, 1], (H, W) or (C, H, W)
                                              {"image_b64": "<base64 PNG/JPEG>"}
      text classifiers:
      Content-Type: application/json          {"text": "..."}         its first data.max_seq_len tokens count
      sequence classifiers:
      Content-Type: application/json          {"sequence": [[...], ...]}  (steps, features) numbers, or (steps,) for one feature
      -> {"label": "7", "label_index": 7, "probabilities": {"0": 0.001, ...}}
    GET /healthz

The family says what its requests carry (ModelFamily.inputs: "image", "text" or "sequence"). Concurrent requests are
folded into one forward pass by @serve.batch; texts are tokenized together there, with the artifact's
own tokenizer, padded to the longest of the batch.
(No `from __future__ import annotations` here: FastAPI must see the real `Request` type.)
"""


import base64
import binascii
import json
from typing import Annotated, Union

import torch
from fastapi import Request
from pydantic import BaseModel, Field
from ray import serve

from dlray.config.serve import ClassifySettings
from dlray.models import FAMILIES
from dlray.models.rnn import sequence_shape
from dlray.png import decode_image, png_bytes
from dlray.serve.endpoint import Endpoint, ExampleRequest, endpoint_api
from dlray.serve.errors import RequestError, read_body
from dlray.serve.openapi import BINARY, json_content, request_body, responses
from dlray.serve.replica import load_replica_model

Pixel = Annotated[float, Field(ge=0, le=1)]


# The JSON bodies /v1/classify takes, for its OpenAPI description: ImageInput and TextInput parse
# them by hand, to keep their error messages. Other keys are ignored.
class PixelsBody(BaseModel):
    image: Union[list[list[Pixel]], list[list[list[Pixel]]]] = Field(description="An image classifier's input: pixels in [0, 1], (H, W) for one channel or (C, H, W)")


class Base64Body(BaseModel):
    image_b64: str = Field(description="An image classifier's input: a base64-encoded PNG or JPEG (taken over `image` when both are sent)")


class TextBody(BaseModel):
    text: str = Field(min_length=1, description="A text classifier's input; its first data.max_seq_len tokens count")


class SequenceBody(BaseModel):
    sequence: Union[list[list[float]], list[float]] = Field(description="A sequence classifier's input: (steps, features) numbers as trained, (steps,) for one feature")


class Classification(BaseModel):
    label: str
    label_index: int
    probabilities: dict[str, float] = Field(description="Every class's probability, by class name")


def parse_json(body: bytes):
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None


class ImageInput:
    """An image classifier's requests: PNG/JPEG bytes, or JSON with pixels or base64 PNG/JPEG."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = shape  # (C, H, W)

    @classmethod
    def from_artifact(cls, artifact: str, info: dict) -> "ImageInput":
        return cls(tuple(info["image_shape"]))

    @staticmethod
    def example(info: dict) -> dict:
        """A mid-grey PNG of the trained size: a short body whatever the size."""
        return {"image_b64": base64.b64encode(png_bytes(torch.zeros(info["image_shape"]))).decode()}

    def describe(self) -> dict:
        return {"input_shape": list(self.shape)}

    def logits(self, model, images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        weight = next(model.parameters())  # pixels in the replica's dtype (serve.dtype), as its weights
        return model(torch.stack(images).to(device, weight.dtype))

    def parse(self, content_type: str, body: bytes) -> torch.Tensor:
        if content_type.startswith("application/json"):
            payload = parse_json(body)
            if not isinstance(payload, dict) or not ({"image", "image_b64"} & payload.keys()):
                raise RequestError(400, 'JSON body must be an object with "image" (nested list of pixels in [0, 1]) or "image_b64" (base64 PNG/JPEG)', param="image")
            if "image_b64" in payload:
                try:
                    return self.decode(base64.b64decode(payload["image_b64"], validate=True))
                except (binascii.Error, TypeError, ValueError):
                    raise RequestError(400, "image_b64 is not valid base64", param="image_b64") from None
            return self.from_pixels(payload["image"])
        if content_type.startswith(("image/", "application/octet-stream")):
            return self.decode(body)
        raise RequestError(415, f"unsupported Content-Type {content_type!r}; send image/png, image/jpeg or application/json")

    def decode(self, data: bytes) -> torch.Tensor:
        try:
            return decode_image(data, self.shape[1], self.shape[0])
        except Exception:  # PIL raises a zoo of types for non-image bytes
            raise RequestError(400, "body is not a decodable PNG/JPEG image", param="image") from None

    def from_pixels(self, pixels) -> torch.Tensor:
        try:
            image = torch.tensor(pixels, dtype=torch.float32)
        except (TypeError, ValueError):
            raise RequestError(400, "image must be a rectangular nested list of numbers", param="image") from None
        if image.dim() == 2 and self.shape[0] == 1:
            image = image.unsqueeze(0)
        if tuple(image.shape) != self.shape:
            raise RequestError(400, f"image must have shape {list(self.shape)} (or {list(self.shape[1:])} for one channel), got {list(image.shape)}", param="image")
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise RequestError(400, "image pixels must be finite and within [0, 1]", param="image")
        return image


class TextInput:
    """A text classifier's requests: JSON {"text": "..."}, tokenized in batches by the artifact's tokenizer."""

    def __init__(self, tokenizer, max_seq_len: int):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len

    @classmethod
    def from_artifact(cls, artifact: str, info: dict) -> "TextInput":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(artifact), info["max_seq_len"])

    @staticmethod
    def example(info: dict) -> dict:
        return {"text": "an example sentence to classify"}

    def describe(self) -> dict:
        return {"max_seq_len": self.max_seq_len}

    def logits(self, model, texts: list[str], device: torch.device) -> torch.Tensor:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_seq_len, return_tensors="pt").to(device)
        return model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits

    def parse(self, content_type: str, body: bytes) -> str:
        if not content_type.startswith("application/json"):
            raise RequestError(415, f'unsupported Content-Type {content_type!r}; send application/json {{"text": "..."}}')
        payload = parse_json(body)
        if not isinstance(payload, dict) or "text" not in payload:
            raise RequestError(400, 'JSON body must be an object with "text" (the string to classify)', param="text")
        if not isinstance(payload["text"], str) or not payload["text"].strip():
            raise RequestError(400, f"text must be a non-empty string, got {payload['text']!r:.80}", param="text")
        return payload["text"]


class SequenceInput:
    """A sequence classifier's requests: JSON {"sequence": [[...], ...]} of the trained (steps, features)."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape  # (steps, features)

    @classmethod
    def from_artifact(cls, artifact: str, info: dict) -> "SequenceInput":
        return cls(sequence_shape(info))

    @staticmethod
    def example(info: dict) -> dict:
        steps, features = sequence_shape(info)
        return {"sequence": [[0.5] * features] * steps}

    def describe(self) -> dict:
        return {"input_shape": list(self.shape)}

    def logits(self, model, sequences: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        weight = next(model.parameters())  # in the replica's dtype (serve.dtype), as its weights
        return model(torch.stack(sequences).to(device, weight.dtype))

    def parse(self, content_type: str, body: bytes) -> torch.Tensor:
        if not content_type.startswith("application/json"):
            raise RequestError(415, f'unsupported Content-Type {content_type!r}; send application/json {{"sequence": [[...], ...]}}')
        payload = parse_json(body)
        if not isinstance(payload, dict) or "sequence" not in payload:
            raise RequestError(400, 'JSON body must be an object with "sequence" (a list of steps, each a list of numbers)', param="sequence")
        try:
            sequence = torch.tensor(payload["sequence"], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise RequestError(400, "sequence must be a rectangular nested list of numbers", param="sequence") from None
        if sequence.dim() == 1 and self.shape[1] == 1:
            sequence = sequence.unsqueeze(1)
        if tuple(sequence.shape) != self.shape:
            one = f" (or [{self.shape[0]}] for one feature)" if self.shape[1] == 1 else ""
            raise RequestError(400, f"sequence must have shape {list(self.shape)}{one}, got {list(sequence.shape)}", param="sequence")
        if not torch.isfinite(sequence).all():
            raise RequestError(400, "sequence values must be finite numbers", param="sequence")
        return sequence


INPUTS = {"image": ImageInput, "text": TextInput, "sequence": SequenceInput}  # by ModelFamily.inputs
api = endpoint_api("dlray classifier")


@serve.deployment
@serve.ingress(api)
class Classifier:
    def __init__(self, artifact: str, settings: ClassifySettings):
        self.model, config, self.dtype = load_replica_model(artifact, settings.dtype)
        self.device = next(self.model.parameters()).device
        self.class_names = config["data_info"]["class_names"]
        self.inputs = INPUTS[FAMILIES[config["model"]["family"]].inputs].from_artifact(artifact, config["data_info"])
        self.max_body_bytes = settings.max_body_bytes
        self.predict.set_max_batch_size(settings.max_batch_size)
        self.predict.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def health(self) -> dict:
        return {"classes": len(self.class_names), **self.inputs.describe()}

    @api.post("/v1/classify", response_model=None, responses=responses(Classification, 400, 413, 415), openapi_extra=request_body(
        {**json_content(PixelsBody, Base64Body, TextBody, SequenceBody), "image/png": BINARY, "image/jpeg": BINARY, "application/octet-stream": BINARY}))
    async def classify(self, request: Request) -> dict:
        item = self.inputs.parse(request.headers.get("content-type", ""), await read_body(request, self.max_body_bytes))
        probabilities = await self.predict(item)
        index = int(probabilities.argmax())
        return Classification(label=self.class_names[index], label_index=index,
                              probabilities={name: round(float(p), 6) for name, p in zip(self.class_names, probabilities)}).model_dump()

    @serve.batch  # its size and wait are the settings', set above
    async def predict(self, items: list) -> list[torch.Tensor]:
        with torch.inference_mode():
            return list(torch.softmax(self.inputs.logits(self.model, items, self.device).float(), dim=-1).cpu())


def example_request(artifact: str, config: dict, settings: ClassifySettings) -> ExampleRequest:
    return "/v1/classify", INPUTS[FAMILIES[config["model"]["family"]].inputs].example(config["data_info"]), ""


ENDPOINT = Endpoint(Classifier, ClassifySettings, api, example_request)
