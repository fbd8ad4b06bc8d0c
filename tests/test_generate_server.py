"""The generate endpoint over real HTTP on 127.0.0.1 (Ray Serve, continuous batching), through
the official `openai` client, lm-evaluation-harness's local-completions model and, for the error
cases and timings, raw httpx.

The artifact is built here (tiny_llm.write_llm_artifact: a tiny random Llama, a
byte-level BPE tokenizer trained in the test with a chat template, and a dlray.json naming the
task) because the export of trained LMs is not final yet; once `dlray export` writes LM artifacts,
an exported debug LM can take its place.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dlray.serve.engine import Engine, SamplingParams, Sequence

from helpers import settled_metrics
from tiny_llm import MAX_CONTEXT, PROMPTS, write_llm_artifact, write_lora_adapter

pytestmark = pytest.mark.slow

API_KEY_ENV, API_KEY = "DLRAY_TEST_API_KEY", "sk-dlray-test"
# Set at import, i.e. at collection, before the session's Ray starts: the replicas inherit the
# environment the local raylet started with, as they would a node's on a cluster.
os.environ[API_KEY_ENV] = API_KEY
MODEL = "tiny-llama"  # the artifact directory's name: the default served_model_name


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return write_llm_artifact(tmp_path_factory.mktemp("llm") / MODEL)


@pytest.fixture(scope="module")
def adapter(artifact, tmp_path_factory):
    return write_lora_adapter(artifact, tmp_path_factory.mktemp("adapter") / "sql", seed=0)


@pytest.fixture(scope="module")
def server(serve_artifact, artifact, adapter):
    return serve_artifact(artifact, engine="dlray", api_key_env=API_KEY_ENV, max_tokens_limit=64, max_completions_per_request=3, max_num_seqs=8, adapters={"sql": adapter})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(artifact):
    """The same model in the test process, to check what the server says against."""
    return Engine.from_pretrained(str(artifact))


def local_greedy(engine: Engine, prompt_ids: list[int], max_tokens: int) -> Sequence:
    seq = Sequence(prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0))
    for _ in engine.generate([seq]):
        pass
    return seq


def test_models_lists_the_served_model_and_its_adapters(client):
    base, adapter = client.models.list().data
    assert (base.id, base.object, base.owned_by, adapter.id) == (MODEL, "model", "dlray", f"{MODEL}:sql") and base.created > 0


def test_a_request_picks_its_lora_adapter_by_model_name(client, artifact, adapter):
    engine = Engine.from_pretrained(str(artifact))
    engine.load_adapters({"sql": adapter})
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    local = Sequence(prompt_ids, SamplingParams(max_tokens=12, temperature=0), adapter="sql")
    for _ in engine.generate([local]):
        pass
    with ThreadPoolExecutor(2) as pool:  # the base and the adapter in flight together
        base, tuned = pool.map(lambda model: client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0),
                               [MODEL, f"{MODEL}:sql"])
    assert tuned.choices[0].text == local.text != base.choices[0].text and tuned.model == f"{MODEL}:sql"


def test_completion_is_the_engines_and_streams_the_same_text(client, engine):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    expected = local_greedy(engine, prompt_ids, 12)
    assert whole.id.startswith("cmpl-") and whole.object == "text_completion" and whole.model == MODEL
    [choice] = whole.choices
    assert (choice.index, choice.text, choice.finish_reason, choice.logprobs) == (0, expected.text, "length", None)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (len(prompt_ids), 12, len(prompt_ids) + 12)

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_chat_completion_and_its_stream(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    expected = local_greedy(engine, prompt_ids, 10)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    [choice] = whole.choices
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", expected.text, "length")
    assert whole.usage.prompt_tokens == len(prompt_ids) and whole.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_the_event_stream_on_the_wire(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_seeded_choices_are_the_same_alone_and_under_16_concurrent_streams(client):
    def complete(seed: int, n: int = 1):
        return client.completions.create(model=MODEL, prompt=PROMPTS[seed % 3], max_tokens=16, temperature=1.0, top_p=0.95, seed=seed, n=n)

    def streamed(seed: int) -> str:
        chunks = client.completions.create(model=MODEL, prompt=PROMPTS[seed % 3], max_tokens=16, temperature=1.0, top_p=0.95, seed=seed, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks)

    seeds = range(10, 26)
    alone = {seed: complete(seed).choices[0].text for seed in seeds}  # one at a time
    with ThreadPoolExecutor(16) as pool:  # 16 streams at once: 8 decode (serve.max_num_seqs), 8 wait and join as rows free
        together = dict(zip(seeds, pool.map(streamed, seeds)))
    assert together == alone and len(set(alone.values())) == 16
    two = complete(10, n=2)  # choice i samples from seed + i
    assert [c.text for c in two.choices] == [alone[10], alone[11]] and two.usage.completion_tokens == 32


def test_stop_strings(client):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0).choices[0].text
    stop = next(free[i : i + 3] for i in range(8, len(free) - 3) if "\ufffd" not in free[i : i + 3])
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=[stop, "\x00never"])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (free[: free.find(stop)], "stop")
    assert stopped.usage.completion_tokens < 30


AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("route, kwargs, status, param, code", [
    ("completions", {"json": {"prompt": "x"}, "headers": {}}, 401, None, "invalid_api_key"),
    ("completions", {"json": {"prompt": "x"}, "headers": {"Authorization": "Bearer wrong"}}, 401, None, "invalid_api_key"),
    ("completions", {"json": {"prompt": "x", "temperature": 3}}, 400, "temperature", None),
    ("completions", {"json": {"prompt": "x", "top_p": 0}}, 400, "top_p", None),
    ("completions", {"json": {"prompt": "x", "n": 4}}, 400, "n", None),  # above max_completions_per_request 3
    ("completions", {"json": {"prompt": "x", "max_tokens": 65}}, 400, "max_tokens", None),  # above max_tokens_limit 64
    ("completions", {"json": {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}}, 400, "stop", None),
    ("completions", {"json": {"prompt": "x", "logit_bias": {"1": 5}}}, 400, "logit_bias", "unsupported_field"),  # vLLM has it
    ("completions", {"json": {"prompt": "x", "stream_options": {"include_usage": True}}}, 400, "stream_options", None),
    ("completions", {"content": b'{"prompt": "x",', "headers": {**AUTH, "content-type": "application/json"}}, 400, "body", None),
    ("completions", {"json": {"prompt": "x", "model": "gpt-4o"}}, 404, "model", "model_not_found"),
    ("completions", {"json": {"prompt": " ab" * MAX_CONTEXT}}, 400, "prompt", "context_length_exceeded"),
    ("chat/completions", {"json": {"messages": [{"role": "robot", "content": "x"}]}}, 400, "messages.0.role", None),
    ("chat/completions", {"json": {"messages": []}}, 400, "messages", None),
    ("chat/completions", {"json": {"messages": [{"role": "user", "content": " ab" * MAX_CONTEXT}]}}, 400, "messages", "context_length_exceeded"),
])
def test_bad_requests_get_openai_errors_and_the_replica_keeps_serving(server, client, route, kwargs, status, param, code):
    response = httpx.post(f"{server}/v1/{route}", **{"headers": AUTH, **kwargs}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error") and error["message"], error
    if code == "context_length_exceeded":
        assert f"maximum context length is {MAX_CONTEXT} tokens" in error["message"]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_a_client_that_leaves_mid_stream_does_not_break_the_replica(server, client):
    body = {"prompt": PROMPTS[0], "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=AUTH, timeout=60) as response:
        next(response.iter_lines())
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_the_openai_client_raises_its_own_errors(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4o", prompt="x")
    assert (err.value.code, err.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=2.5)
    assert err.value.param == "temperature"


@pytest.fixture(scope="module")
def plain(serve_artifact, tmp_path_factory):
    """A second app beside the module's server, over an artifact whose tokenizer has no chat
    template, with room for one decoding sequence and one waiting request."""
    artifact = write_llm_artifact(tmp_path_factory.mktemp("plain") / "plain", chat_template=None)
    return serve_artifact(artifact, chat=False, max_num_seqs=1, max_queue_len=1, max_tokens_limit=120)


def test_without_a_chat_template_chat_is_switched_off(plain):
    chat = httpx.post(f"{plain}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=60)
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "chat_disabled", chat.text
    completion = httpx.post(f"{plain}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)  # no key here
    assert completion.status_code == 200 and completion.json()["model"] == "plain"


def test_a_full_queue_answers_429_and_the_replica_keeps_serving(plain):
    def complete(_):
        return httpx.post(f"{plain}/v1/completions", json={"prompt": "Hi", "max_tokens": 120, "temperature": 0}, timeout=120)

    with ThreadPoolExecutor(4) as pool:  # one decodes, one waits, the others find the queue full
        answers = list(pool.map(complete, range(4)))
    refused = [a for a in answers if a.status_code == 429]
    assert refused and all(a.status_code == 200 and a.json()["usage"]["completion_tokens"] >= 1 for a in answers if a not in refused)
    for answer in refused:
        assert answer.headers["retry-after"] == "1"
        error = answer.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("rate_limit_error", "queue_full", None) and "serve.max_queue_len" in error["message"]
    assert complete(0).status_code == 200  # the replica serves on


def timed_chunks(server: str, body: dict) -> list[tuple[float, dict]]:
    """(time.perf_counter() on arrival, chunk) of each chunk of a streamed completion that has a choice."""
    chunks = []
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append((time.perf_counter(), json.loads(line.removeprefix("data: "))))
    return chunks


def test_a_request_sent_during_a_long_generation_gets_its_first_token_before_that_one_ends(server, engine):
    """With a batch run to its end, the second request would wait for the whole first generation."""
    long_body, short_body = {"prompt": PROMPTS[0], "max_tokens": 64, "temperature": 0}, {"prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0}
    long_times, long_text = [], ""
    with ThreadPoolExecutor(1) as pool, httpx.stream("POST", f"{server}/v1/completions", json={**long_body, "stream": True}, headers=AUTH, timeout=60) as response:
        short = None
        for line in response.iter_lines():
            if line.startswith("data: {"):
                long_times.append(time.perf_counter())
                long_text += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
                short = short or pool.submit(timed_chunks, server, short_body)  # sent once the long one streams
        short_chunks = short.result()
    assert short_chunks[0][0] < long_times[-1], "the short request's first token came only after the long generation ended"
    print(f"the long generation streamed {sum(t > short_chunks[0][0] for t in long_times)} of its {len(long_times)} chunks after the short one's first token")
    for body, text in ((long_body, long_text), (short_body, "".join(chunk["choices"][0]["text"] for _, chunk in short_chunks))):
        expected = local_greedy(engine, engine.tokenizer.encode(body["prompt"]), body["max_tokens"])
        assert text == expected.text and expected.finish_reason == "length"


@pytest.fixture(scope="module")
def model(artifact):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(artifact).eval()


def transformers_logprobs(model, token_ids: list[int]) -> list[float]:
    """Plain transformers: the logprob of each token after the first, given the ones before it."""
    import torch

    with torch.no_grad():
        logprobs = model(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)
    return [float(logprobs[i - 1, token]) for i, token in enumerate(token_ids) if i]


TOLERANCE = 1e-4  # float32: the replica computes in a padded batch, the reference alone


def test_the_openai_client_reads_logprobs_from_both_routes(client, engine, model):
    completion = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=2)
    prompt_ids = engine.tokenizer.encode(PROMPTS[1])
    completion_ids = local_greedy(engine, prompt_ids, 6).token_ids
    expected = transformers_logprobs(model, prompt_ids + completion_ids)[len(prompt_ids) - 1 :]
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [engine.tokenizer.decode([token]) for token in completion_ids]
    assert logprobs.token_logprobs == pytest.approx(expected, abs=TOLERANCE)
    # greedy: each token is the most likely, so the top two hold it; the top dict also names the token itself
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(lp) for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(6)]

    messages = [{"role": "user", "content": "Hi!"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    chat_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    answer_ids = local_greedy(engine, chat_ids, 5).token_ids
    content = chat.choices[0].logprobs.content
    assert [entry.token for entry in content] == [engine.tokenizer.decode([token]) for token in answer_ids]
    assert [entry.logprob for entry in content] == pytest.approx(transformers_logprobs(model, chat_ids + answer_ids)[len(chat_ids) - 1 :], abs=TOLERANCE)
    assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob) for entry in content)
    assert content[0].bytes == list(content[0].token.encode())

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, stream=True))
    assert [entry.token for chunk in chunks if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content] == [e.token for e in content]


def test_echo_with_max_tokens_0_returns_the_prompts_logprobs(client, engine, model):
    prompt_ids = engine.tokenizer.encode(PROMPTS[2])
    scored = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=1)
    [choice] = scored.choices
    assert (choice.text, choice.finish_reason, scored.usage.completion_tokens, scored.usage.prompt_tokens) == (PROMPTS[2], "length", 0, len(prompt_ids))
    assert choice.logprobs.tokens == [engine.tokenizer.decode([token]) for token in prompt_ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None  # nothing predicts the first token
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(transformers_logprobs(model, prompt_ids), abs=TOLERANCE)
    # token ids in, as evaluation harnesses send them, several prompts in one request
    by_ids = client.completions.create(model=MODEL, prompt=[prompt_ids, prompt_ids[:5]], max_tokens=0, echo=True, logprobs=0)
    assert [c.index for c in by_ids.choices] == [0, 1] and by_ids.choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs
    assert by_ids.choices[1].logprobs.token_logprobs == pytest.approx(choice.logprobs.token_logprobs[:5], abs=TOLERANCE)


def test_lm_evaluation_harness_scores_a_loglikelihood_against_the_server(server, artifact, engine, model, monkeypatch):
    """lm-eval's own `local-completions` client (what `lm_eval --model local-completions` runs): it
    tokenizes with the artifact's tokenizer and sends token ids with echo, max_tokens 1 and logprobs 1."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # the key lm-eval sends
    lm = LocalCompletionsAPI(base_url=f"{server}/v1/completions", model=MODEL, tokenizer_backend="huggingface", tokenizer=str(artifact),
                             max_length=MAX_CONTEXT, max_retries=1)
    context, continuation = "The quick brown fox", " jumps over the lazy dog"
    [(loglikelihood, is_greedy)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)], disable_tqdm=True)
    ids, context_ids = engine.tokenizer.encode(context + continuation), engine.tokenizer.encode(context)
    assert ids[: len(context_ids)] == context_ids
    expected = transformers_logprobs(model, ids)[len(context_ids) - 1 :]
    assert loglikelihood == pytest.approx(sum(expected), abs=TOLERANCE * len(expected)) and loglikelihood < 0
    assert is_greedy is False  # a random model does not predict this sentence


def test_the_replicas_metrics_reach_rays_prometheus_endpoint(ray_cluster, client):
    """Ray Serve's metrics of the replica (earlier tests in this module sent it requests), scraped
    from the node's metrics export port as Prometheus would; the export runs every few seconds."""
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3)
    wanted = ["ray_dlray_num_requests_running", "ray_dlray_num_requests_waiting", "ray_dlray_time_to_first_token_seconds_count",
              "ray_dlray_inter_token_latency_seconds_count", "ray_dlray_prompt_tokens_total", "ray_dlray_generation_tokens_total"]
    found = settled_metrics(ray_cluster, wanted, gauges=["ray_dlray_num_requests_running", "ray_dlray_num_requests_waiting"])
    assert found["ray_dlray_time_to_first_token_seconds_count"] >= 1 and found["ray_dlray_inter_token_latency_seconds_count"] >= 2
    assert found["ray_dlray_prompt_tokens_total"] >= 1 and found["ray_dlray_generation_tokens_total"] >= 3
