"""The text-generation engine and the OpenAI request/response side of the generate endpoint, without Ray.

The model is tests/tiny_llm.py's tiny random LlamaForCausalLM and byte-level BPE tokenizer with a small
chat template; both go through save_pretrained / from_pretrained, the path the endpoint loads artifacts by.
"""

import asyncio
import json

import pytest
import torch
from ray.serve import Application
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from dlray.serve.app import build_app
from dlray.serve.engine import Delta, Engine, SamplingParams, Sequence, sample
from dlray.serve.errors import RequestError, parse_json
from dlray.serve.openai_text import ChatCompletionRequest, CompletionRequest, OpenAITextAPI, Reply, read_api_key
from dlray.serve.scheduler import QueueFull, Scheduler

from tiny_llm import MAX_CONTEXT, PROMPTS, write_llm_artifact, write_lora_adapter


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return write_llm_artifact(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def engine(artifact):
    return Engine.from_pretrained(str(artifact))


@pytest.fixture(scope="module")
def openai_api(engine):
    return OpenAITextAPI(engine, "tiny", max_tokens_limit=100, max_completions_per_request=3)


def run(engine: Engine, sequences: list[Sequence]) -> list[list]:
    """Every step's deltas, sequences decoded together."""
    return list(engine.generate(sequences))


def greedy(engine: Engine, prompt: str, max_tokens: int = 24, **params) -> Sequence:
    return Sequence(engine.tokenizer.encode(prompt), SamplingParams(max_tokens=max_tokens, temperature=0, **params))


def test_greedy_batched_equals_alone_equals_model_generate(engine):
    batch = [greedy(engine, p) for p in PROMPTS]
    assert len({len(seq.prompt_ids) for seq in batch}) == 3
    run(engine, batch)
    for seq in batch:
        alone = Sequence(seq.prompt_ids, seq.params)
        run(engine, [alone])
        reference = engine.model.generate(torch.tensor([seq.prompt_ids]), attention_mask=torch.ones(1, len(seq.prompt_ids), dtype=torch.long),
                                          do_sample=False, max_new_tokens=24)[0, len(seq.prompt_ids):].tolist()
        assert seq.token_ids == alone.token_ids == reference
        assert seq.finish_reason == "length" and len(seq.token_ids) == 24


def test_seeded_sampling_is_the_same_alone_and_batched(engine):
    def sampled(seed: int, prompt: str = PROMPTS[1]) -> Sequence:
        return Sequence(engine.tokenizer.encode(prompt), SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=seed))

    alone = sampled(7)
    run(engine, [alone])
    batch = [sampled(3, PROMPTS[2]), greedy(engine, PROMPTS[0]), sampled(7), sampled(8)]
    run(engine, batch)
    assert batch[2].token_ids == alone.token_ids and batch[2].text == alone.text
    assert batch[3].token_ids != alone.token_ids  # the seed matters
    greedy_seq = greedy(engine, PROMPTS[1], max_tokens=20)
    run(engine, [greedy_seq])
    assert greedy_seq.token_ids != alone.token_ids  # it samples


@pytest.mark.parametrize("temperature, top_p", [(5e-324, 1.0), (1.0, 5e-324), (1e-40, 0.5)])
def test_temperature_or_top_p_below_float32s_range_samples_the_most_likely_token(temperature, top_p):
    """Both are valid above 0; schemathesis found top_p=5e-324 a 500 (float32 rounded it to 0, dropping every token)."""
    logits = torch.randn(384, generator=torch.Generator().manual_seed(0))
    assert int(sample(logits[None], [Sequence([1], SamplingParams(temperature=temperature, top_p=top_p, seed=0))])[0]) == int(logits.argmax())


def test_deltas_join_to_the_text_and_end_with_the_finish_reason(engine):
    batch = [greedy(engine, PROMPTS[0], max_tokens=5), greedy(engine, PROMPTS[1], max_tokens=12)]
    steps = run(engine, batch)
    assert len(steps) == 12
    for index, seq in enumerate(batch):
        deltas = [step[index] for step in steps if step[index] is not None]
        assert len(deltas) == len(seq.token_ids) == seq.params.max_tokens
        assert "".join(d.text for d in deltas) == seq.text == engine.tokenizer.decode(seq.token_ids, skip_special_tokens=True)
        assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
        assert [d.completion_tokens for d in deltas] == list(range(1, len(deltas) + 1))


def test_stop_strings_cut_the_text_and_finish_with_stop(engine):
    free = greedy(engine, PROMPTS[1], max_tokens=40)
    run(engine, [free])
    # a stop string from the middle of what the model writes anyway, free of undecodable bytes
    start = next(i for i in range(8, len(free.text) - 3) if "\ufffd" not in free.text[i : i + 3])
    stop = free.text[start : start + 3]
    expected = free.text[: free.text.find(stop)]
    stopped = greedy(engine, PROMPTS[1], max_tokens=40, stop=("never in this text \x00", stop))
    steps = run(engine, [stopped])
    assert stopped.text == expected and stopped.finish_reason == "stop"
    assert "".join(step[0].text for step in steps) == expected
    # counted up to the token that completed the stop string, and no further
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert stop in engine.tokenizer.decode(stopped.token_ids) and stop not in engine.tokenizer.decode(stopped.token_ids[:-1])
    assert steps[-1][0].completion_tokens == len(stopped.token_ids) < 40


def test_text_is_held_back_until_it_can_no_longer_change(engine):
    """Tokens of a known text fed one at a time: a multi-byte character comes out whole, and a
    possible start of a stop string waits until it turns out not to be one."""
    text = "héllo wörld, say hello to the world"
    seq = Sequence([1], SamplingParams(max_tokens=100, stop=("world",)))
    deltas = [engine.append(seq, token) for token in engine.tokenizer.encode(text)]
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == seq.text == "héllo wörld, say hello to the "
    assert seq.finish_reason == "stop" and deltas[-1].finish_reason == "stop"
    assert any(d.text == "" for d in deltas)  # something was held back on the way


def test_eos_finishes_with_stop_and_counts(artifact, engine):
    free = greedy(engine, PROMPTS[2], max_tokens=10)
    run(engine, [free])
    model = AutoModelForCausalLM.from_pretrained(artifact)
    model.generation_config.eos_token_id = free.token_ids[4]  # the model "ends" with its 5th token
    ending = greedy(engine, PROMPTS[2], max_tokens=10)
    run(Engine(model, engine.tokenizer), [ending])
    assert ending.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[4]) + 1]
    assert ending.finish_reason == "stop"


async def replay(steps):
    """Engine steps as the scheduler hands them out: one step at a time, in a list."""
    for deltas in steps:
        yield [deltas]


def test_whole_reply_has_openai_shape_and_exact_usage(engine, openai_api):
    params = CompletionRequest(prompt=PROMPTS[1], max_tokens=6, n=2, seed=1)
    [prompt_ids] = openai_api.completion_prompts(params)
    sequences = openai_api.sequences(params, [prompt_ids])
    reply = Reply(False, "tiny", sequences, engine.tokenizer)
    body = asyncio.run(reply.whole(replay(engine.generate(sequences))))
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "tiny" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": i, "text": seq.text, "logprobs": None, "finish_reason": "length"} for i, seq in enumerate(sequences)]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 12, "total_tokens": len(prompt_ids) + 12}
    assert sequences[0].text != sequences[1].text  # choice i samples from seed + i


def parse_events(events: list[str]) -> list:
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_chat_stream_chunks(engine, openai_api):
    params = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
                                   stream=True, stream_options={"include_usage": True})
    prompt_ids = openai_api.chat_prompt(params)
    [seq] = openai_api.sequences(params, [prompt_ids])

    async def collect():
        return [e async for e in Reply(True, "tiny", [seq], engine.tokenizer).events(replay(engine.generate([seq])), include_usage=True)]

    chunks = parse_events(asyncio.run(collect()))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == seq.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 8, "total_tokens": len(prompt_ids) + 8}


def test_completion_stream_without_usage(engine, openai_api):
    params = CompletionRequest(prompt=PROMPTS[0], max_tokens=5, temperature=0, stream=True)
    [seq] = openai_api.sequences(params, openai_api.completion_prompts(params))

    async def collect():
        return [e async for e in Reply(False, "tiny", [seq], engine.tokenizer).events(replay(engine.generate([seq])), include_usage=False)]

    chunks = parse_events(asyncio.run(collect()))
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == seq.text and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_prompt_and_max_tokens_must_fit_the_context(engine, openai_api):
    prompt_ids = engine.tokenizer.encode(PROMPTS[2])
    assert len(prompt_ids) < MAX_CONTEXT
    with pytest.raises(RequestError) as err:
        openai_api.sequences(CompletionRequest(prompt="x", max_tokens=MAX_CONTEXT - len(prompt_ids) + 1), [prompt_ids])
    assert err.value.status == 400 and err.value.code == "context_length_exceeded" and err.value.param == "prompt"
    assert f"maximum context length is {MAX_CONTEXT} tokens, but {MAX_CONTEXT + 1} were requested ({len(prompt_ids)} in the prompt" in err.value.message
    openai_api.sequences(CompletionRequest(prompt="x", max_tokens=MAX_CONTEXT - len(prompt_ids)), [prompt_ids])  # exactly full: fine
    # chat without max_tokens takes what the context leaves (here below serve.max_tokens_limit)
    [seq] = openai_api.sequences(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]), [prompt_ids])
    assert seq.params.max_tokens == MAX_CONTEXT - len(prompt_ids)


@pytest.mark.parametrize("body, param, status", [
    (CompletionRequest(prompt="x", max_tokens=101), "max_tokens", 400),  # above max_tokens_limit 100
    (CompletionRequest(prompt="x", n=4), "n", 400),  # above max_completions_per_request 3
    (CompletionRequest(prompt="x", max_tokens=0), "max_tokens", 400),  # no completion, no echo: nothing to answer
    (ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=101), "max_tokens", 400),
])
def test_limits(openai_api, body, param, status):
    with pytest.raises(RequestError) as err:
        openai_api.sequences(body, [[1, 2, 3]])
    assert (err.value.status, err.value.param) == (status, param)


def test_unknown_model_is_404_and_empty_prompt_400(openai_api):
    with pytest.raises(RequestError) as err:
        openai_api.completion_prompts(CompletionRequest(prompt="x", model="gpt-4"))
    assert (err.value.status, err.value.code, err.value.param) == (404, "model_not_found", "model") and "tiny" in err.value.message
    with pytest.raises(RequestError) as err:
        openai_api.completion_prompts(CompletionRequest(prompt=""))
    assert (err.value.status, err.value.param) == (400, "prompt")
    assert openai_api.completion_prompts(CompletionRequest(prompt="x", model="tiny"))
    assert openai_api.models()["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("model, body, param", [
    (CompletionRequest, {"prompt": "x", "temperature": 2.5}, "temperature"),
    (CompletionRequest, {"prompt": "x", "temperature": -0.1}, "temperature"),
    (CompletionRequest, {"prompt": "x", "top_p": 0}, "top_p"),
    (CompletionRequest, {"prompt": "x", "top_p": 1.5}, "top_p"),
    (CompletionRequest, {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    (CompletionRequest, {"prompt": "x", "n": 0}, "n"),
    (CompletionRequest, {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (CompletionRequest, {"prompt": "x", "stop": [""]}, "stop.0"),
    (CompletionRequest, {"prompt": "x", "seed": -1}, "seed"),
    (CompletionRequest, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (CompletionRequest, {"prompt": "x", "stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
    (CompletionRequest, {"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    (CompletionRequest, {"prompt": [["x"]]}, "prompt"),
    (CompletionRequest, {"prompt": [1, -2]}, "prompt"),
    (CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    (CompletionRequest, {}, "prompt"),
    (CompletionRequest, {"prompt": None}, "prompt"),
    (CompletionRequest, "{not json", "body"),
    (ChatCompletionRequest, {"messages": []}, "messages"),
    (ChatCompletionRequest, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (ChatCompletionRequest, {"messages": [{"role": "user"}]}, "messages.0.content"),
    (ChatCompletionRequest, {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
])
def test_bad_fields_get_a_400_naming_them(model, body, param):
    with pytest.raises(RequestError) as err:
        parse_json(model, body.encode() if isinstance(body, str) else json.dumps(body).encode())
    assert err.value.status == 400 and err.value.param == param and err.value.message.startswith(param)


def test_one_stop_string_or_a_list_and_null_for_not_given():
    assert parse_json(CompletionRequest, b'{"prompt": "x", "stop": "\\n"}').stop == ["\n"]
    assert parse_json(CompletionRequest, b'{"prompt": "x", "stop": ["a", "b"]}').stop == ["a", "b"]
    defaults = parse_json(CompletionRequest, b'{"prompt": "x", "stop": null, "max_tokens": null, "temperature": null, "n": null, "seed": null}')
    assert (defaults.stop, defaults.max_tokens, defaults.temperature, defaults.n, defaults.seed) == ([], 16, 1.0, 1, None)


def test_chat_template_renders_messages_and_keeps_their_control_tokens_as_text(engine, openai_api):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|end|><|assistant|>"}]
    prompt_ids = openai_api.chat_prompt(ChatCompletionRequest(messages=messages))
    assert engine.tokenizer.decode(prompt_ids) == "<|system|>\nBe brief.<|end|>\n<|user|>\nHi <|end|><|assistant|><|end|>\n<|assistant|>\n"
    end, assistant = engine.tokenizer.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    assert prompt_ids.count(end) == 2 and prompt_ids.count(assistant) == 1  # the template's own, not the user's


def test_a_base_model_without_a_chat_template_answers_chat_with_a_400_and_completions_as_ever(tmp_path):
    plain = Engine.from_pretrained(str(write_llm_artifact(tmp_path / "base", chat_template=None)))
    api = OpenAITextAPI(plain, "base", 64, 4)
    with pytest.raises(RequestError) as err:
        api.chat_prompt(ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}]))
    assert (err.value.status, err.value.param, err.value.code) == (400, "messages", "no_chat_template") and "`base` has no chat template" in err.value.message
    assert api.completion_prompts(CompletionRequest(prompt="Hi")) == [plain.tokenizer.encode("Hi")]


def test_a_field_dlrays_engine_does_not_implement_is_refused_naming_the_engine_that_has_it():
    from dlray.serve.generate import parse_request

    chat = b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}'
    for model, body, field in [(CompletionRequest, b'{"prompt": "x", "top_k": 5}', "top_k"), (ChatCompletionRequest, chat, "response_format")]:
        with pytest.raises(RequestError) as err:
            parse_request(model, body)
        assert (err.value.status, err.value.param, err.value.code) == (400, field, "unsupported_field")
        assert err.value.message.startswith(f"{field}: dlray's engine does not implement this field; vLLM does: serve with serve.engine=vllm")
    with pytest.raises(RequestError, match="^frobnicate: Extra inputs are not permitted"):  # a field no engine has: pydantic's words
        parse_request(CompletionRequest, b'{"prompt": "x", "frobnicate": 1}')


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    assert read_api_key(None) is None
    monkeypatch.delenv("DLRAY_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="'DLRAY_TEST_KEY' but that environment variable is unset"):
        read_api_key("DLRAY_TEST_KEY")
    monkeypatch.setenv("DLRAY_TEST_KEY", "sk-123")
    assert read_api_key("DLRAY_TEST_KEY") == "sk-123"


def test_the_app_builder_takes_the_generate_settings(artifact):
    """dlray.serve.app reads the task from dlray.json and checks the endpoint's `serve:` keys (nothing starts)."""
    app = build_app({"artifact": str(artifact), "chat": False, "max_tokens_limit": 64, "api_key_env": "DLRAY_API_KEY", "stream_interval": 4})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="max_completions_per_request"):
        build_app({"artifact": str(artifact), "max_completions_per_request": 0})
    with pytest.raises(ValueError, match="stream_interval"):
        build_app({"artifact": str(artifact), "stream_interval": 0})


def test_positions_count_from_each_prompts_first_token(engine):
    """Llama's rotary positions are relative, blind to a shifted start; GPT-2's learned absolute
    positions are not, so a row padded on the left decodes as it would alone only if its
    positions start at 0 where its prompt does."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(engine.tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=MAX_CONTEXT,
                        eos_token_id=engine.tokenizer.eos_token_id)
    gpt2 = Engine(GPT2LMHeadModel(config), engine.tokenizer)
    batch = [greedy(gpt2, p, max_tokens=12) for p in PROMPTS]
    run(gpt2, batch)
    for seq in batch:
        alone = Sequence(seq.prompt_ids, seq.params)
        run(gpt2, [alone])
        assert seq.token_ids == alone.token_ids


def test_one_batch_mixes_lora_adapters_and_the_base(artifact, tmp_path):
    """Each row decodes with its own adapter: a mixed batch gives what each sequence gives alone."""
    engine = Engine.from_pretrained(str(artifact))
    engine.load_adapters({name: write_lora_adapter(artifact, tmp_path / name, seed) for seed, name in enumerate(("sql", "poem"))})
    prompt_ids = engine.tokenizer.encode(PROMPTS[0])

    def sequence(adapter):
        return Sequence(prompt_ids, SamplingParams(max_tokens=8, temperature=0), adapter=adapter)

    alone = []
    for adapter in (None, "sql", "poem"):
        run(engine, [seq := sequence(adapter)])
        alone.append(seq.text)
    mixed = [sequence(adapter) for adapter in (None, "sql", "poem")]
    run(engine, mixed)
    assert [seq.text for seq in mixed] == alone and len(set(alone)) == 3

    api = OpenAITextAPI(engine, "tiny", max_tokens_limit=100, max_completions_per_request=3)
    assert [m["id"] for m in api.models()["data"]] == ["tiny", "tiny:poem", "tiny:sql"]
    [seq] = api.sequences(CompletionRequest(model="tiny:sql", prompt="x"), [prompt_ids])
    assert seq.adapter == "sql"
    with pytest.raises(RequestError) as err:
        api.check_model(CompletionRequest(model="tiny:nope", prompt="x"))
    assert err.value.status == 404 and "tiny:sql" in err.value.message


# ---------------------------------------------------------------------------------------------
# Continuous batching: sequences join a running batch and leave it between steps


def gpt2_engine(tokenizer) -> Engine:
    """A GPT-2: learned absolute positions, so a row decodes as it would alone only if its
    positions count from its own first token, wherever it joined the batch."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=MAX_CONTEXT, eos_token_id=tokenizer.eos_token_id)
    return Engine(GPT2LMHeadModel(config), tokenizer)


def alone(engine: Engine, seq: Sequence) -> Sequence:
    fresh = Sequence(seq.prompt_ids, seq.params, adapter=seq.adapter)
    run(engine, [fresh])
    return fresh


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sequences_joining_and_leaving_a_running_batch_decode_as_they_would_alone(engine, family):
    engine = engine if family == "llama" else gpt2_engine(engine.tokenizer)
    tokenize = engine.tokenizer.encode
    long = Sequence(tokenize(PROMPTS[0]), SamplingParams(max_tokens=30, temperature=0))
    seeded = Sequence(tokenize(PROMPTS[1]), SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=5))
    wide = Sequence(tokenize(PROMPTS[2]), SamplingParams(max_tokens=12, temperature=1.0, seed=6))  # a longer prompt than the batch is wide
    late = Sequence(tokenize(PROMPTS[1]), SamplingParams(max_tokens=8, temperature=0))
    dropped = Sequence(tokenize(PROMPTS[0]), SamplingParams(max_tokens=30, temperature=0))
    assert len(wide.prompt_ids) > len(long.prompt_ids) + 4
    schedule = {0: [long, seeded, dropped], 3: [wide], 9: [late]}  # step -> sequences admitted then
    for step in range(40):
        outputs = engine.step(admit=schedule.get(step, ()), abort=[dropped] if step == 5 else ())
        assert all(seq.finish_reason is None for seq in engine.running)  # finished rows left at once
        if step == 3:  # a prefill step: the first token of the one admitted, the running ones wait
            assert [seq for seq, _ in outputs] == [wide]
        if wide.finish_reason and wide in dict(outputs):  # the widest row left: the cache shrinks to what the rest hold
            assert engine.attention_mask.shape[1] == max(len(seq.prompt_ids) + len(seq.token_ids) - 1 for seq in engine.running)
    assert not engine.running and engine.cache is None
    for seq in (long, seeded, wide, late):
        expected = alone(engine, seq)
        assert seq.token_ids == expected.token_ids and seq.text == expected.text and seq.finish_reason == expected.finish_reason
    assert 0 < len(dropped.token_ids) < 30 and dropped.finish_reason is None and wide.finish_reason == "length"


def test_sixteen_seeded_sequences_joining_two_a_step_sample_as_they_would_alone(engine):
    """Sixteen sequences admitted two a step, each seeded: every one samples what it samples alone."""
    sequences = [Sequence(engine.tokenizer.encode(PROMPTS[i % 3]), SamplingParams(max_tokens=10, temperature=1.0, seed=i)) for i in range(16)]
    step = 0
    while step < 8 or engine.running:
        engine.step(admit=sequences[2 * step : 2 * step + 2])
        step += 1
    assert [seq.token_ids for seq in sequences] == [alone(engine, seq).token_ids for seq in sequences]


def reference_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """Plain transformers: log_softmax of the model's logits at every position of `token_ids`, alone."""
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)


def test_logprobs_and_prompt_logprobs_are_transformers_log_softmax(artifact, engine):
    model = AutoModelForCausalLM.from_pretrained(artifact).eval()
    prompt = engine.tokenizer.encode(PROMPTS[1])
    scored = Sequence(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=1, logprobs=3, prompt_logprobs=2))
    other = greedy(engine, PROMPTS[2])  # batched with a longer prompt: `scored` is left-padded
    run(engine, [scored, other])
    reference = reference_logprobs(model, prompt + scored.token_ids)
    assert len(scored.logprobs) == 6 and len(scored.prompt_logprobs) == len(prompt) and scored.prompt_logprobs[0] is None
    for position, logprob in enumerate(scored.prompt_logprobs[1:] + scored.logprobs, start=1):
        expected = reference[position - 1]  # the logits before a token predict it
        token = (prompt + scored.token_ids)[position]
        assert logprob.token_id == token
        assert logprob.logprob == pytest.approx(float(expected[token]), abs=1e-4)  # float32 rounding, batched vs alone
        top = expected.topk(len(logprob.top))
        assert [t for t, _ in logprob.top] == top.indices.tolist() and len(logprob.top) == (2 if position < len(prompt) else 3)
        assert [v for _, v in logprob.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert other.logprobs == [] and other.prompt_logprobs == []  # not asked: not computed


def test_a_bf16_model_decodes_with_float32_logprobs(artifact):
    """A replica's model in bf16 (serve.dtype auto on a GPU): its bf16 KV cache grows as the batch
    decodes, and logprobs are computed in float32 from its logits, near the fp32 model's."""
    model = AutoModelForCausalLM.from_pretrained(artifact).eval()
    engine = Engine(AutoModelForCausalLM.from_pretrained(artifact).to(torch.bfloat16), AutoTokenizer.from_pretrained(artifact))
    prompt = engine.tokenizer.encode(PROMPTS[1])
    scored = Sequence(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=1, prompt_logprobs=1))
    run(engine, [scored, greedy(engine, PROMPTS[2], max_tokens=6)])  # batched with a longer prompt: left padding, a cache that widens
    assert len(scored.token_ids) == 6
    reference = reference_logprobs(model, prompt + scored.token_ids)
    logprobs = [lp.logprob for lp in scored.prompt_logprobs[1:] + scored.logprobs]
    expected = [float(reference[position - 1, token]) for position, token in enumerate(prompt + scored.token_ids) if position > 0]
    assert all(type(value) is float for value in logprobs)
    assert logprobs == pytest.approx(expected, abs=0.05)  # bf16's 8-bit mantissa on logits of a few units
    assert logprobs != pytest.approx(expected, abs=1e-5), "the engine computed in fp32"


def test_max_tokens_0_computes_the_prompt_alone(engine):
    prompt = engine.tokenizer.encode(PROMPTS[2])
    seq = Sequence(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    [deltas] = run(engine, [seq])
    assert deltas == [Delta("", "length", 0)] and seq.token_ids == [] and not engine.running
    assert len(seq.prompt_logprobs) == len(prompt) and all(lp.top == () for lp in seq.prompt_logprobs[1:])


# ---------------------------------------------------------------------------------------------
# The scheduler: a bounded queue in front of the engine's batch


async def drain(steps) -> list:
    """Every step's deltas of a scheduler's stream."""
    return [deltas async for ready in steps for deltas in ready]


def test_scheduler_admits_within_max_num_seqs_and_refuses_beyond_the_queue(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_num_seqs=2, max_batch_total_tokens=None, max_queue_len=2)
        requests = [[greedy(engine, PROMPTS[i % 3], max_tokens=8)] for i in range(4)]
        streams = [scheduler.submit(request) for request in requests[:2]]  # both wait until the loop runs
        with pytest.raises(QueueFull):
            scheduler.submit(requests[2])
        outputs = await asyncio.gather(*(drain(stream) for stream in streams))
        assert [len(steps) for steps in outputs] == [8, 8]
        assert [seq.token_ids for [seq] in requests[:2]] == [alone(engine, seq).token_ids for [seq] in requests[:2]]
        assert scheduler.check([greedy(engine, "x")] * 3)[0] == "n"  # more choices than max_num_seqs: never admitted
        await drain(scheduler.submit(requests[3]))  # the queue has room again
        assert requests[3][0].finish_reason == "length"

    asyncio.run(scenario())


@pytest.mark.parametrize("interval, sizes", [(1, [1] * 10), (4, [1, 4, 4, 1])])
def test_a_stream_gets_its_first_step_at_once_then_stream_interval_steps_a_write(engine, interval, sizes):
    """serve.stream_interval: the first token as soon as it is sampled (time to first token unchanged),
    then that many steps per write, the last write whatever is left. A consumer that keeps up (this
    one) sees exactly these groups; one that falls behind gets bigger ones."""
    async def scenario():
        scheduler = Scheduler(engine, max_num_seqs=1, max_batch_total_tokens=None, max_queue_len=1, stream_interval=interval)
        return [len(ready) async for ready in scheduler.submit(request)]

    [seq] = request = [greedy(engine, PROMPTS[1], max_tokens=10)]
    assert asyncio.run(scenario()) == sizes
    assert seq.finish_reason == "length" and seq.token_ids == alone(engine, greedy(engine, PROMPTS[1], max_tokens=10)).token_ids


def test_a_request_whose_consumer_leaves_is_dropped_from_the_batch(engine):
    async def scenario():
        scheduler = Scheduler(engine, max_num_seqs=4, max_batch_total_tokens=None, max_queue_len=4)
        [leaving], [staying] = request = [greedy(engine, PROMPTS[0], max_tokens=60)], [greedy(engine, PROMPTS[1], max_tokens=20)]
        steps = scheduler.submit(request[0])
        kept = asyncio.ensure_future(drain(scheduler.submit(request[1])))
        await anext(steps)
        await steps.aclose()  # as Starlette does when the client disconnects
        await kept
        assert leaving.finish_reason is None and len(leaving.token_ids) < 60 and staying.finish_reason == "length"
        assert not engine.running and scheduler.loop_task is None

    asyncio.run(scenario())
