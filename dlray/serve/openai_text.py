"""OpenAI's text APIs (legacy completions, chat completions) on dlray's engine, without Ray: the
request and response models, requests into engine Sequences (OpenAITextAPI), and Deltas into responses,
whole or streamed (Reply). The models are the one description of the wire format: they parse the
requests, Reply builds every response and stream chunk from them, and they describe the routes in
/openapi.json. dlray.serve.generate serves them.
"""

import os
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, AsyncIterator, Literal, Optional, Union

import jinja2
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from dlray.serve.engine import Delta, Engine, Logprob, SamplingParams, Sequence
from dlray.serve.errors import RequestError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1)]


# Request fields that OpenAI's API or vLLM's has and dlray's engine does not implement: a request naming one gets a 400
# saying so (generate.parse_request) rather than its field ignored.
VLLM_FIELDS = frozenset({
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "structured_outputs",
    "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "ignore_eos",
    "stop_token_ids", "best_of", "suffix", "include_stop_str_in_output", "skip_special_tokens", "bad_words", "prompt_logprobs",
    "truncate_prompt_tokens", "allowed_token_ids", "chat_template", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message", "reasoning_effort", "service_tier", "store", "metadata", "prediction", "modalities", "audio", "web_search_options",
})


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


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# What OpenAI's legacy completions take as `prompt`: one text or token-id list, or a list of them.
PromptInput = Union[str, Annotated[list[str], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]]
MAX_LOGPROBS = 20  # top logprobs per token, as OpenAI's chat API and vLLM's default max_logprobs


class CompletionRequest(SamplingRequest):
    prompt: list[Union[str, list[int]]]  # each prompt a text or token ids; a request answers choice n * i + j for prompt i
    max_tokens: int = Field(16, ge=0, description="0 (with echo): no completion, the prompt's logprobs alone")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="Log-probabilities of each token and of this many most likely")
    echo: bool = Field(False, description="Return the prompt before the completion (and, with logprobs, its tokens' logprobs)")

    @field_validator("prompt", mode="before", json_schema_input_type=PromptInput)
    @classmethod
    def _one_prompt_or_several(cls, value):
        def token_ids(item) -> bool:
            return isinstance(item, list) and bool(item) and all(type(t) is int and t >= 0 for t in item)

        if isinstance(value, str) or token_ids(value):
            return [value]
        if isinstance(value, list) and value and (all(isinstance(v, str) for v in value) or all(token_ids(v) for v in value)):
            return value
        raise ValueError("must be a string, a list of strings, a list of token ids (integers >= 0) or a list of such lists, none of them empty")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = Field(False, description="Log-probabilities of each token of the completion")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="And of this many most likely at each position")

    @field_validator("top_logprobs")
    @classmethod
    def _only_with_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when logprobs is true")
        return value


# What the routes answer: Reply builds them; /openapi.json shows them.
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
    finish_reason: Optional[Literal["stop", "length"]] = Field(description="null until the choice's last chunk of a stream")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token (with echo, the prompt's first)."""

    tokens: list[str]
    token_logprobs: list[Optional[float]] = Field(description="null for the prompt's first token, which nothing predicts")
    top_logprobs: list[Optional[dict[str, float]]] = Field(description="The `logprobs` most likely tokens and the token itself")
    text_offset: list[int] = Field(description="Where each token starts in the choice's text (the tokens' texts laid end to end)")


class CompletionChoice(Choice):
    text: str
    logprobs: Optional[CompletionLogprobs] = Field(description="null unless the request asks for `logprobs`")


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's text in UTF-8")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The `top_logprobs` most likely tokens at this position")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = Field(description="null unless the request sets `logprobs`")


class ChatDelta(BaseModel):
    role: Literal["assistant"] = Field(None, description="In each choice's first chunk only")
    content: str = Field(None, description="The text added (absent from a choice's last chunk when it adds none)")


class ChatChunkChoice(Choice):
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = Field(description="The chunk's tokens', where the request sets `logprobs`")


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


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The token ids of the chat template's prompt for `messages`, control tokens inside them (a "<|system|>" a
    user typed) kept as plain text, never the template's own tokens. (transformers 5.19, the newest vLLM 0.32
    accepts, has no sanitize_control_tokens.) Each control token in a message is swapped for a private-use
    marker, the template renders, and the text between markers is tokenized with its control tokens; at a
    marker, the control token's text is tokenized as text."""
    specials = sorted(tokenizer.all_special_tokens + [t.content for t in tokenizer.added_tokens_decoder.values() if t.special], key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, dict.fromkeys(specials)))) if specials else None
    found: list[str] = []

    def hide(text):
        if not isinstance(text, str) or pattern is None:
            return text
        return pattern.sub(lambda match: f"{MARK}{found.append(match.group()) or len(found) - 1}{MARK}", text)

    rendered = tokenizer.apply_chat_template([{**m, "content": hide(m.get("content"))} for m in messages], add_generation_prompt=True, tokenize=False)
    ids: list[int] = []
    for i, part in enumerate(rendered.split(MARK)):  # odd parts: a marker's index
        if i % 2:
            ids += tokenizer.encode(found[int(part)], add_special_tokens=False, split_special_tokens=True)
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return ids


MARK = "\ue000"  # Unicode private use: no tokenizer's control token, no text a client means


class OpenAITextAPI:
    """OpenAI requests in, engine sequences out; no Ray, so it is tested on its own."""

    def __init__(self, engine: Engine, model_name: str, max_tokens_limit: int, max_completions_per_request: int):
        self.engine, self.model_name = engine, model_name
        # What clients may name: the model, and "<model>:<adapter>" for each adapter the engine holds.
        self.adapters = {model_name: None} | {f"{model_name}:{name}": name for name in sorted(engine.adapters)}
        self.max_tokens_limit, self.max_completions = max_tokens_limit, max_completions_per_request
        self.created = int(time.time())

    def models(self) -> dict:
        return ModelList(object="list", data=[ModelCard(id=name, object="model", created=self.created, owned_by="dlray") for name in self.adapters]).model_dump()

    def completion_prompts(self, params: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt: texts tokenized, token ids checked against the vocabulary."""
        self.check_model(params)
        vocab = len(self.engine.tokenizer)
        prompts = [self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt for prompt in params.prompt]
        if not all(prompts):
            raise RequestError(400, "prompt is empty", param="prompt")
        if any(token >= vocab for prompt in prompts for token in prompt):
            raise RequestError(400, f"prompt: token ids must be below the vocabulary size, {vocab}", param="prompt")
        return prompts

    def chat_prompt(self, params: ChatCompletionRequest) -> list[int]:
        self.check_model(params)
        if self.engine.tokenizer.chat_template is None:  # a base model: served for completions, as vLLM serves one
            raise RequestError(400, f"The model `{self.model_name}` has no chat template, so chat messages cannot be turned into a prompt: "
                               "use /v1/completions, or give its tokenizer a chat template", param="messages", code="no_chat_template")
        try:
            return render_chat(self.engine.tokenizer, [m.model_dump() for m in params.messages])
        except jinja2.TemplateError as err:  # templates raise on e.g. roles out of order
            raise RequestError(400, f"messages: the model's chat template refuses them: {err}", param="messages") from None

    def check_model(self, params: SamplingRequest) -> None:
        if params.model is not None and params.model not in self.adapters:
            raise RequestError(404, f"The model `{params.model}` does not exist; this server serves {', '.join(f'`{m}`' for m in self.adapters)}",
                               param="model", code="model_not_found")

    def sequences(self, params: SamplingRequest, prompts: list[list[int]]) -> list[Sequence]:
        """The engine sequences of choice j of each prompt i (n * i + j), once the request fits this
        model and the limits."""
        choices = params.n * len(prompts)
        if choices > self.max_completions:
            raise RequestError(400, f"n ({params.n}) times the number of prompts ({len(prompts)}) must be at most {self.max_completions} "
                               "(serve.max_completions_per_request)", param="n")
        chat = isinstance(params, ChatCompletionRequest)
        max_tokens = (params.max_completion_tokens or params.max_tokens) if chat else params.max_tokens
        if max_tokens == 0 and not params.echo:
            raise RequestError(400, "max_tokens 0 asks for no completion: it needs echo true (the prompt and its logprobs)", param="max_tokens")
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise RequestError(400, f"max_tokens must be at most {self.max_tokens_limit} (serve.max_tokens_limit), got {max_tokens}", param="max_tokens")
        if chat:
            logprobs, prompt_logprobs = ((params.top_logprobs or 0) if params.logprobs else None), None
        else:
            logprobs, prompt_logprobs = params.logprobs, (params.logprobs if params.echo else None)
        sequences = []
        for prompt_ids in prompts:
            context, prompt_tokens = self.engine.max_context, len(prompt_ids)
            tokens = max_tokens if max_tokens is not None else max(1, min(self.max_tokens_limit, context - prompt_tokens))  # chat: what the context leaves
            if prompt_tokens + tokens > context:
                raise RequestError(
                    400, f"This model's maximum context length is {context} tokens, but {prompt_tokens + tokens} were requested "
                    f"({prompt_tokens} in the prompt, {tokens} for the completion): shorten the prompt or lower max_tokens",
                    param="messages" if chat else "prompt", code="context_length_exceeded")
            sequences += [
                Sequence(prompt_ids, SamplingParams(tokens, params.temperature, params.top_p, tuple(params.stop), None if params.seed is None else params.seed + i,
                                                    logprobs, prompt_logprobs), adapter=self.adapters.get(params.model))
                for i in range(params.n)
            ]
        return sequences


class Reply:
    """One response to a completion or chat completion request, whole or as server-sent events,
    from the per-step Deltas of its choices' `sequences` (the steps come in lists, Scheduler.submit's). `echo`: per choice, the prompt text that
    goes before its completion (completions' echo), its tokens' logprobs too where they were asked."""

    def __init__(self, chat: bool, model: str, sequences: list[Sequence], tokenizer: PreTrainedTokenizerBase, echo: Optional[list[str]] = None):
        self.chat, self.sequences, self.tokenizer, self.echo = chat, sequences, tokenizer, echo
        self.logprobs = sequences[0].params.logprobs is not None  # the choices of a request all ask the same
        self.offsets = [0] * len(sequences)  # per choice: characters of the tokens given out so far (text_offset)
        self.header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}

    async def whole(self, steps: AsyncIterator[list[list[Optional[Delta]]]]) -> dict:
        async for _ in steps:  # the sequences hold the outcome once the steps are done
            pass
        choices = []
        for index, seq in enumerate(self.sequences):
            prefix, scored = self.echoed(index)
            choices.append(self.choice(index, prefix + seq.text, seq.finish_reason, scored + list(zip(seq.token_ids, seq.logprobs))))
        if self.chat:
            return ChatCompletion(**self.header, object="chat.completion", choices=choices, usage=self.usage()).model_dump()
        return Completion(**self.header, object="text_completion", choices=choices, usage=self.usage()).model_dump()

    async def events(self, steps: AsyncIterator[list[list[Optional[Delta]]]], include_usage: bool) -> AsyncIterator[str]:
        """The server-sent events of the steps, those of steps that came together in one string."""
        def event(choices: list, **usage: Usage) -> str:
            chunk = (ChatCompletionChunk(**self.header, object="chat.completion.chunk", choices=choices, **usage) if self.chat
                     else CompletionChunk(**self.header, object="text_completion", choices=choices, **usage))
            return f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"  # unset: what a chunk leaves out (usage, a delta's role)

        if self.chat:  # as OpenAI: each choice's first chunk names the role
            for index in range(len(self.sequences)):
                yield event([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""), logprobs=None, finish_reason=None)])
        started = [False] * len(self.sequences)
        async for ready in steps:
            events = ""
            for deltas in ready:
                for index, delta in enumerate(deltas):
                    if delta is None:
                        continue
                    text, scored = ("", []) if started[index] else self.echoed(index)  # the echo goes before the first text
                    started[index] = True
                    text += delta.text
                    if delta.logprob is not None:
                        scored.append((delta.logprob.token_id, delta.logprob))
                    if text or delta.finish_reason or scored:
                        events += event([self.choice(index, text, delta.finish_reason, scored, streaming=True)])
            if events:
                yield events
        if include_usage:
            yield event([], usage=self.usage())
        yield "data: [DONE]\n\n"

    def echoed(self, index: int) -> tuple[str, list[tuple[int, Optional[Logprob]]]]:
        """Choice `index`'s echoed prompt and, where logprobs are asked, its (token, logprob) pairs."""
        if self.echo is None:
            return "", []
        seq = self.sequences[index]
        return self.echo[index], list(zip(seq.prompt_ids, seq.prompt_logprobs)) if self.logprobs else []

    def choice(self, index: int, text: str, finish_reason: Optional[str], scored: list[tuple[int, Optional[Logprob]]],
               streaming: bool = False) -> Union[CompletionChoice, ChatChoice, ChatChunkChoice]:
        if not self.chat:
            logprobs = self.completion_logprobs(index, scored) if self.logprobs else None
            return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)
        chat_logprobs = self.chat_logprobs(scored) if self.logprobs else None
        if streaming:
            delta = ChatDelta(content=text) if text else ChatDelta()
            return ChatChunkChoice(index=index, delta=delta, logprobs=chat_logprobs, finish_reason=finish_reason)
        return ChatChoice(index=index, message=AssistantMessage(role="assistant", content=text), logprobs=chat_logprobs, finish_reason=finish_reason)

    def completion_logprobs(self, index: int, scored: list[tuple[int, Optional[Logprob]]]) -> CompletionLogprobs:
        """OpenAI's legacy logprobs of these tokens; the top dict holds the token itself too, as vLLM's."""
        tokens, offsets = [self.token_text(token) for token, _ in scored], []
        for token in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(token)
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp.logprob if lp else None for _, lp in scored],
            top_logprobs=[{**{self.token_text(t): v for t, v in lp.top}, self.token_text(lp.token_id): lp.logprob} if lp else None for _, lp in scored],
            text_offset=offsets)

    def chat_logprobs(self, scored: list[tuple[int, Optional[Logprob]]]) -> ChatLogprobs:
        def entry(token: int, logprob: float) -> dict:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return ChatLogprobs(content=[TokenLogprob(**entry(token, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
                                     for token, lp in scored if lp])

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def usage(self) -> Usage:
        # A prompt counts once, however many choices continue it (OpenAI's count).
        prompt_tokens = sum(len(seq.prompt_ids) for seq in {id(seq.prompt_ids): seq for seq in self.sequences}.values())
        completion_tokens = sum(len(seq.token_ids) for seq in self.sequences)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)
