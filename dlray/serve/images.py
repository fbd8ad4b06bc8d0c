"""Image generation endpoint over an exported diffusion, VAE or GAN artifact, in the shape of
OpenAI's images API.

    POST /v1/images/generations
      {"n": 4, "seed": 7, "num_inference_steps": 50, "scheduler": "ddim", "class_label": 3,
       "response_format": "b64_json", "size": "16x16", "prompt": "..."}
      -> {"created": 1764000000, "data": [{"b64_json": "<PNG>", "seed": 7}, {"b64_json": ..., "seed": 8}, ...]}
      With `Accept: image/png` and n = 1 the PNG itself comes back.
    GET /healthz

Image i of a request is drawn from seed + i alone (one torch.Generator per image), so it is the
same whether it is sampled alone or batched with other users' images, and the same as
`DDPMPipeline.from_pretrained(artifact)(generator=torch.Generator().manual_seed(seed + i),
num_inference_steps=...)` gives. Concurrent requests with the same scheduler and step count are
denoised together as one batch (@serve.batch). `num_inference_steps` and `scheduler` apply to the
families whose `sample` takes them (ModelFamily.sample_options: diffusion's). `prompt` is accepted for
client compatibility: a class-conditional model takes a class name there (or `class_label`); others ignore it.
"""


import base64
import secrets
import time
from typing import Literal, Optional, Union

import torch
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from dlray.config.serve import ImagesSettings
from dlray.models import FAMILIES
from dlray.png import png_bytes
from dlray.serve.endpoint import Endpoint, ExampleRequest, endpoint_api
from dlray.serve.errors import RequestError, parse_json, read_body
from dlray.serve.openapi import BINARY, json_content, request_body, responses
from dlray.serve.replica import load_replica_model

api = endpoint_api("dlray image generation")


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Optional[str] = None
    model: Optional[str] = None
    user: Optional[str] = None
    n: int = Field(1, ge=1)
    response_format: Literal["b64_json"] = "b64_json"
    size: Optional[str] = None  # "<H>x<W>": only the trained size
    seed: Optional[int] = Field(None, ge=0, lt=2**63 - 2**16)
    num_inference_steps: Optional[int] = Field(None, ge=1)
    scheduler: Optional[Literal["ddpm", "ddim"]] = None
    class_label: Optional[Union[int, str]] = None


class GeneratedImage(BaseModel):
    b64_json: str = Field(description="A PNG, base64-encoded")
    seed: int = Field(description="The seed that alone draws this image")


class ImagesResponse(BaseModel):
    created: int
    data: list[GeneratedImage]


@serve.deployment
@serve.ingress(api)
class ImageGenerator:
    def __init__(self, artifact: str, settings: ImagesSettings):
        self.model, config, self.dtype = load_replica_model(artifact, settings.dtype)
        self.family = FAMILIES[config["model"]["family"]]
        self.class_names = config["data_info"]["class_names"]
        self.conditional = bool(config["model"].get("class_conditional"))
        self.shape = tuple(config["data_info"]["image_shape"])  # (C, H, W)
        self.settings = settings
        self.sample.set_max_batch_size(settings.max_batch_size)
        self.sample.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def health(self) -> dict:
        return {"family": self.family.name, "image_shape": list(self.shape), "class_conditional": self.conditional}

    @api.post("/v1/images/generations", response_model=None, openapi_extra=request_body(json_content(GenerationRequest)),
              responses=responses(ImagesResponse, 400, 413, content={"image/png": BINARY}))
    async def generations(self, request: Request):
        params = parse_json(GenerationRequest, await read_body(request, self.settings.max_body_bytes))
        job = self.job(params)
        images = await self.sample(job)
        pngs = [png_bytes(image) for image in images]
        if "image/png" in request.headers.get("accept", "") and len(pngs) == 1:
            return Response(pngs[0], media_type="image/png")
        data = [GeneratedImage(b64_json=base64.b64encode(png).decode(), seed=job["seed"] + i) for i, png in enumerate(pngs)]
        return ImagesResponse(created=int(time.time()), data=data).model_dump()

    def job(self, params: GenerationRequest) -> dict:
        """Check a request against this model and the configured limits; what `sample` needs."""
        limits = self.settings
        if params.n > limits.max_images_per_request:
            raise RequestError(400, f"n must be at most {limits.max_images_per_request} (serve.max_images_per_request), got {params.n}", param="n")
        _, height, width = self.shape
        if params.size not in (None, f"{height}x{width}"):
            raise RequestError(400, f"size must be '{height}x{width}' (the size this model was trained at), got {params.size!r}", param="size")
        for name in ("num_inference_steps", "scheduler"):
            if getattr(params, name) is not None and name not in self.family.sample_options:
                able = " or ".join(family.name for family in FAMILIES.values() if name in family.sample_options)
                raise RequestError(400, f"{name} applies to {able} models only; this is a {self.family.name}", param=name)
        options = {"num_inference_steps": params.num_inference_steps or limits.num_inference_steps, "scheduler": params.scheduler or limits.scheduler}
        options = {name: value for name, value in options.items() if name in self.family.sample_options}
        if options.get("num_inference_steps", 0) > limits.max_inference_steps:
            raise RequestError(400, f"num_inference_steps must be at most {limits.max_inference_steps} (serve.max_inference_steps), "
                               f"got {options['num_inference_steps']}", param="num_inference_steps")
        seed = params.seed if params.seed is not None else secrets.randbits(31)
        return {"seed": seed, "n": params.n, "options": options, "class_label": self.class_label(params)}

    def class_label(self, params: GenerationRequest) -> Optional[int]:
        if not self.conditional:
            if params.class_label is not None:
                raise RequestError(400, "class_label applies to class-conditional models only", param="class_label")
            return None
        wanted = params.class_label if params.class_label is not None else params.prompt
        if isinstance(wanted, int) and 0 <= wanted < len(self.class_names):
            return wanted
        if isinstance(wanted, str) and wanted.strip() in self.class_names:
            return self.class_names.index(wanted.strip())
        raise RequestError(400, f"this model is class-conditional: class_label (or prompt) must be one of {self.class_names} "
                           f"or an index below {len(self.class_names)}, got {wanted!r}", param="class_label")

    @serve.batch  # its size and wait are the settings', set above
    async def sample(self, jobs: list[dict]) -> list[list[torch.Tensor]]:
        """Every image of every request in the batch; one denoising loop per (scheduler, steps)."""
        results: list[list[torch.Tensor]] = [[] for _ in jobs]
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(tuple(sorted(job["options"].items())), []).append(index)
        for key, members in groups.items():
            generators, labels, owners = [], [], []
            for index in members:
                job = jobs[index]
                generators += [torch.Generator().manual_seed(job["seed"] + i) for i in range(job["n"])]
                labels += [job["class_label"]] * job["n"]
                owners += [index] * job["n"]
            options = dict(key) | ({"class_labels": labels} if self.conditional else {})
            with torch.inference_mode():  # CPU generators on any device: a seed gives the same image on a GPU replica
                images = self.family.sample(self.model, generators, **options).cpu()
            for owner, image in zip(owners, images):
                results[owner].append(image)
        return results


def example_request(artifact: str, config: dict, settings: ImagesSettings) -> ExampleRequest:
    """A class-conditional model needs a class: its first one, by name."""
    prompt = {"prompt": config["data_info"]["class_names"][0]} if config["model"].get("class_conditional") else {}
    return "/v1/images/generations", {**prompt, "seed": 0}, " -H 'accept: image/png' -o image.png"


ENDPOINT = Endpoint(ImageGenerator, ImagesSettings, api, example_request)
