"""An endpoint added the way the README's recipe says, to show the recipe works: this file and one
registry line (made by tests/test_toy_endpoint.py, where dlray.serve.app.ENDPOINTS would hold it).

    POST /v1/logits  {"images": [[[pixel, ...], ...], ...]}  single-channel (H, W) images, pixels in [0, 1]
      -> {"logits": [[...], ...]}                            an image classifier's raw outputs, one row per image
    GET  /healthz

It serves artifacts whose dlray.json names the task "logits" (an image classifier's weights).
"""

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from dlray.config.serve import EndpointSettings
from dlray.serve.endpoint import Endpoint, ExampleRequest, endpoint_api
from dlray.serve.errors import RequestError, parse_json, read_body
from dlray.serve.replica import load_replica_model


class LogitsSettings(EndpointSettings):
    """Its `serve:` keys beside every endpoint's (max_body_bytes, dtype): a request's limit."""

    max_images_per_request: int = Field(4, ge=1)


class LogitsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[list[list[float]]] = Field(min_length=1)


class Logits(BaseModel):
    logits: list[list[float]]


api = endpoint_api("toy logits")


@serve.deployment
@serve.ingress(api)
class LogitsServer:
    def __init__(self, artifact: str, settings: LogitsSettings):
        self.model, config, self.dtype = load_replica_model(artifact, settings.dtype)
        self.shape = tuple(config["data_info"]["image_shape"])  # (1, H, W)
        self.settings = settings

    def health(self) -> dict:
        return {"input_shape": list(self.shape)}

    @api.post("/v1/logits", response_model=Logits)
    async def logits(self, request: Request) -> dict:
        body = parse_json(LogitsRequest, await read_body(request, self.settings.max_body_bytes))
        if len(body.images) > self.settings.max_images_per_request:
            raise RequestError(400, f"images: at most {self.settings.max_images_per_request} (serve.max_images_per_request), got {len(body.images)}",
                               param="images")
        try:
            images = torch.tensor(body.images)
        except ValueError:
            raise RequestError(400, "images must be rectangular", param="images") from None
        if tuple(images.shape[1:]) != self.shape[1:]:
            raise RequestError(400, f"each image must have shape {list(self.shape[1:])}, got {list(images.shape[1:])}", param="images")
        with torch.inference_mode():
            logits = self.model(images.unsqueeze(1).to(next(self.model.parameters()).dtype))
        return Logits(logits=logits.float().tolist()).model_dump()


def example_request(artifact: str, config: dict, settings: LogitsSettings) -> ExampleRequest:
    _, height, width = config["data_info"]["image_shape"]
    return "/v1/logits", {"images": [[[0.5] * width] * height]}, ""


TOY = Endpoint(LogitsServer, LogitsSettings, api, example_request)
