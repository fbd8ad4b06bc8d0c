"""Text generation endpoint over a causal LM in Hugging Face layout, in the shape of OpenAI's
completions and chat completions APIs.

    GET  /v1/models
    POST /v1/completions        {"model", "prompt", "max_tokens": 16, "temperature": 1, "top_p": 1,
                                 "stop": str | [up to 4], "seed", "n": 1, "stream": false,
                                 "stream_options": {"include_usage": false}, "user"}
    POST /v1/chat/completions   the same with "messages": [{"role": "system"|"user"|"assistant", "content"}]
                                in place of "prompt" ("max_completion_tokens" or "max_tokens": default,
                                the rest of the context up to serve.max_tokens_limit)
    GET  /healthz

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ["DLRAY_API_KEY"])
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "Hi"}], stream=True)

Responses, stream chunks (server-sent events ending in `data: [DONE]`) and errors are OpenAI's.
Concurrent requests are decoded together by dlray.serve.engine, driven by a streaming
@serve.batch method that hands each request its text step by step; a whole response is that
stream joined. Choice i of a request with a `seed` samples from seed + i alone, so it is the same
batched or not. With serve.adapters, `model="<served name>:<adapter>"` picks a LoRA adapter per
request, and requests for different adapters still decode in one batch. With serve.api_key_env set, every /v1 route wants `Authorization: Bearer <key>`,
the key being the value of that environment variable in the replica.
(No `from __future__ import annotations` here: FastAPI must see the real `Request` type.)
"""

import asyncio
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Annotated, AsyncIterator, Literal, Optional, Union

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from ray import serve
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dlray.export import load_artifact
from dlray.serve.engine import Delta, Engine, SamplingParams, Sequence
from dlray.serve.errors import RequestError, install_error_handlers, parse_json, read_body
from dlray.serve.openapi import event_stream, json_content, request_body, responses
from dlray.serve.replica import replica_device

api = FastAPI(title="dlray text generation")
install_error_handlers(api)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1)]


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None  # None: the served model, as vLLM allows
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[StopString] = Field([], max_length=4)
    seed: Optional[int] = Field(None, ge=0, lt=2**63 - 2**16)  # room for seed + i, i < n
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted for client compatibility; unused

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data):
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

    @field_validator("stop", mode="before", json_schema_input_type=Union[StopString, Annotated[list[StopString], Field(max_length=4)]])
    @classmethod
    def _one_stop_string_or_several(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value


class CompletionRequest(SamplingRequest):
    prompt: str
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens


# What the routes answer, for their OpenAPI description (Reply builds the same as dicts).
class ModelCard(BaseModel):
    id: str = Field(description="What requests name as `model`: the served model, or <model>:<adapter>")
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    index: int
    logprobs: None
    finish_reason: Optional[Literal["stop", "length"]] = Field(description="null until the choice's last chunk of a stream")


class CompletionChoice(Choice):
    text: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(Choice):
    message: AssistantMessage


class ChatDelta(BaseModel):
    role: Literal["assistant"] = Field(None, description="In each choice's first chunk only")
    content: str = Field(None, description="The text added (absent from a choice's last chunk when it adds none)")


class ChatChunkChoice(Choice):
    delta: ChatDelta


class Header(BaseModel):
    id: str
    created: int
    model: str


class Completion(Header):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(Header):
    object: Literal["text_completion"]
    choices: list[CompletionChoice] = Field(description="One choice's new text; none in the usage chunk")
    usage: Usage = Field(None, description="In the chunk before [DONE], where stream_options.include_usage is true")


class ChatCompletion(Header):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(Header):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice] = Field(description="One choice's delta; none in the usage chunk")
    usage: Usage = Field(None, description="In the chunk before [DONE], where stream_options.include_usage is true")


def check_chat_template(tokenizer: PreTrainedTokenizerBase, artifact: str, chat: bool) -> None:
    """Refuse to start a chat endpoint whose tokenizer cannot turn messages into a prompt.
    dlray.serve.app calls it where the app is built, so `dlray serve` and `serve deploy` say why
    at once instead of a replica failing to start."""
    if chat and tokenizer.chat_template is None:
        raise ValueError(
            f"{artifact}: the tokenizer has no chat template, so /v1/chat/completions cannot render messages. "
            "Give it one (tokenizer.chat_template = '<jinja>'; tokenizer.save_pretrained(artifact)), "
            "or serve /v1/completions only with serve.chat=false"
        )


def read_api_key(api_key_env: Optional[str]) -> Optional[str]:
    """The API key clients must send, from the environment variable serve.api_key_env names."""
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise ValueError(
            f"serve.api_key_env is {api_key_env!r} but that environment variable is unset or empty in the replica: "
            "set it where the replicas run (every node's environment, or the RayService pod spec from a Secret), "
            "or drop serve.api_key_env to serve without a key"
        )
    return key


def model_name(artifact: str, served_model_name: Optional[str]) -> str:
    """The name clients give as `model`: serve.served_model_name, else the artifact directory's name."""
    return served_model_name or Path(artifact).name


class OpenAITextAPI:
    """OpenAI requests in, engine sequences out; no Ray, so it is tested on its own."""

    def __init__(self, engine: Engine, model_name: str, max_tokens_limit: int, max_completions_per_request: int):
        self.engine, self.model_name = engine, model_name
        # What clients may name: the model, and "<model>:<adapter>" for each adapter the engine holds.
        self.adapters = {model_name: None} | {f"{model_name}:{name}": name for name in sorted(engine.adapters)}
        self.max_tokens_limit, self.max_completions = max_tokens_limit, max_completions_per_request
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created, "owned_by": "dlray"} for name in self.adapters]}

    def completion_prompt(self, params: CompletionRequest) -> list[int]:
        self.check_model(params)
        prompt_ids = self.engine.tokenizer.encode(params.prompt)
        if not prompt_ids:
            raise RequestError(400, "prompt is empty", param="prompt")
        return prompt_ids

    def chat_prompt(self, params: ChatCompletionRequest) -> list[int]:
        self.check_model(params)
        try:
            # Control tokens inside the messages (a "<|system|>" a user typed) stay plain text.
            return self.engine.tokenizer.apply_chat_template(
                [m.model_dump() for m in params.messages], add_generation_prompt=True, tokenize=True,
                return_dict=False, sanitize_control_tokens=True)
        except jinja2.TemplateError as err:  # templates raise on e.g. roles out of order
            raise RequestError(400, f"messages: the model's chat template refuses them: {err}", param="messages") from None

    def check_model(self, params: SamplingRequest) -> None:
        if params.model is not None and params.model not in self.adapters:
            raise RequestError(404, f"The model `{params.model}` does not exist; this server serves {', '.join(f'`{m}`' for m in self.adapters)}",
                               param="model", code="model_not_found")

    def sequences(self, params: SamplingRequest, prompt_ids: list[int]) -> list[Sequence]:
        """One engine sequence per choice, once the request fits this model and the limits."""
        if params.n > self.max_completions:
            raise RequestError(400, f"n must be at most {self.max_completions} (serve.max_completions_per_request), got {params.n}", param="n")
        context, prompt_tokens = self.engine.max_context, len(prompt_ids)
        chat = isinstance(params, ChatCompletionRequest)
        max_tokens = (params.max_completion_tokens or params.max_tokens) if chat else params.max_tokens
        if max_tokens is None:  # chat: as much as the context leaves, up to the limit
            max_tokens = max(1, min(self.max_tokens_limit, context - prompt_tokens))
        if max_tokens > self.max_tokens_limit:
            raise RequestError(400, f"max_tokens must be at most {self.max_tokens_limit} (serve.max_tokens_limit), got {max_tokens}", param="max_tokens")
        if prompt_tokens + max_tokens > context:
            raise RequestError(
                400, f"This model's maximum context length is {context} tokens, but {prompt_tokens + max_tokens} were requested "
                f"({prompt_tokens} in the prompt, {max_tokens} for the completion): shorten the prompt or lower max_tokens",
                param="messages" if chat else "prompt", code="context_length_exceeded")
        return [
            Sequence(prompt_ids, SamplingParams(max_tokens, params.temperature, params.top_p, tuple(params.stop),
                                                None if params.seed is None else params.seed + i), adapter=self.adapters.get(params.model))
            for i in range(params.n)
        ]


class Reply:
    """One response to a completion or chat completion request, whole or as server-sent events,
    from the per-step Deltas of its choices."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, n: int):
        self.chat, self.prompt_tokens, self.n = chat, prompt_tokens, n
        self.header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}

    async def whole(self, steps: AsyncIterator[list[Optional[Delta]]]) -> dict:
        texts, last = [""] * self.n, [None] * self.n
        async for deltas in steps:
            for index, delta in enumerate(deltas):
                if delta is not None:
                    texts[index] += delta.text
                    last[index] = delta
        choices = [self.choice(i, texts[i], last[i].finish_reason) for i in range(self.n)]
        return {**self.header, "object": "chat.completion" if self.chat else "text_completion", "choices": choices, "usage": self.usage(last)}

    async def events(self, steps: AsyncIterator[list[Optional[Delta]]], include_usage: bool) -> AsyncIterator[str]:
        def event(choices: list[dict], **extra) -> str:
            chunk = {**self.header, "object": "chat.completion.chunk" if self.chat else "text_completion", "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        if self.chat:  # as OpenAI: each choice's first chunk names the role
            for index in range(self.n):
                yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        last = [None] * self.n
        async for deltas in steps:
            for index, delta in enumerate(deltas):
                if delta is not None and (delta.text or delta.finish_reason):
                    yield event([self.choice(index, delta.text, delta.finish_reason, streaming=True)])
                last[index] = delta or last[index]
        if include_usage:
            yield event([], usage=self.usage(last))
        yield "data: [DONE]\n\n"

    def choice(self, index: int, text: str, finish_reason: Optional[str], streaming: bool = False) -> dict:
        if not self.chat:
            body = {"text": text}
        elif streaming:
            body = {"delta": {"content": text} if text else {}}
        else:
            body = {"message": {"role": "assistant", "content": text}}
        return {"index": index, **body, "logprobs": None, "finish_reason": finish_reason}

    def usage(self, last: list[Delta]) -> dict:
        completion_tokens = sum(delta.completion_tokens for delta in last)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": self.prompt_tokens + completion_tokens}


@serve.deployment
@serve.ingress(api)
class TextGenerator:
    def __init__(self, artifact: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, max_body_bytes: int = 2_000_000,
                 max_tokens_limit: int = 1024, max_completions_per_request: int = 4, chat: bool = True,
                 api_key_env: Optional[str] = None, served_model_name: Optional[str] = None, adapters: Optional[dict[str, str]] = None):
        model = load_artifact(artifact)[0].to(replica_device())  # an adapter: with its base
        self.engine = Engine(model, AutoTokenizer.from_pretrained(artifact))
        self.engine.load_adapters(adapters or {})
        self.api_key, self.chat, self.max_body_bytes = read_api_key(api_key_env), chat, max_body_bytes
        self.openai = OpenAITextAPI(self.engine, model_name(artifact, served_model_name), max_tokens_limit, max_completions_per_request)
        self.decode.set_max_batch_size(max_batch_size)
        self.decode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "model": self.openai.model_name, "max_context": self.engine.max_context, "chat": self.chat}

    @api.get("/v1/models", response_model=None, responses=responses(ModelList, 401))
    def models(self, request: Request) -> dict:
        self.authorize(request)
        return self.openai.models()

    @api.post("/v1/completions", response_model=None, openapi_extra=request_body(json_content(CompletionRequest)),
              responses=responses(Completion, 400, 401, 404, 413, content={"text/event-stream": event_stream(CompletionChunk)}))
    async def completions(self, request: Request):
        self.authorize(request)
        params = parse_json(CompletionRequest, await read_body(request, self.max_body_bytes))
        return await self.respond(params, self.openai.completion_prompt(params), chat=False)

    @api.post("/v1/chat/completions", response_model=None, openapi_extra=request_body(json_content(ChatCompletionRequest)),
              responses=responses(ChatCompletion, 400, 401, 404, 413, content={"text/event-stream": event_stream(ChatCompletionChunk)}))
    async def chat_completions(self, request: Request):
        self.authorize(request)
        if not self.chat:
            raise RequestError(404, "this server serves completions only (serve.chat is false): use /v1/completions", code="chat_disabled")
        params = parse_json(ChatCompletionRequest, await read_body(request, self.max_body_bytes))
        return await self.respond(params, self.openai.chat_prompt(params), chat=True)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise RequestError(401, "missing API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):  # constant time: no timing hints
            raise RequestError(401, "incorrect API key", code="invalid_api_key")

    async def respond(self, params: SamplingRequest, prompt_ids: list[int], chat: bool):
        sequences = self.openai.sequences(params, prompt_ids)
        reply = Reply(chat, params.model or self.openai.model_name, len(prompt_ids), params.n)
        if params.stream:
            include_usage = params.stream_options is not None and params.stream_options.include_usage
            return StreamingResponse(reply.events(self.decode(sequences), include_usage), media_type="text/event-stream")
        return await reply.whole(self.decode(sequences))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def decode(self, requests: list[list[Sequence]]) -> AsyncIterator[list]:
        """Decode the choices of every request in the batch together. Per step Serve hands each
        request its list of per-choice Deltas, or ends its stream (StopIteration) once all its
        choices have finished."""
        steps = self.engine.generate([seq for choices in requests for seq in choices])
        # Each step computes in a worker thread, so the replica's event loop goes on streaming
        # chunks and queueing new requests (for the next batch) meanwhile.
        while (deltas := await asyncio.to_thread(next, steps, None)) is not None:
            parts, start = [], 0
            for choices in requests:
                part = deltas[start : start + len(choices)]
                parts.append(StopIteration if all(delta is None for delta in part) else part)
                start += len(choices)
            yield parts
