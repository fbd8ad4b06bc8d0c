"""The generate endpoint over real HTTP on 127.0.0.1 (Ray Serve, streaming @serve.batch), through
the official `openai` client and, for the error cases, raw httpx.

The artifact is built here (test_generation_engine.write_llm_artifact: a tiny random Llama, a
byte-level BPE tokenizer trained in the test with a chat template, and a dlray.json naming the
task) because the export of trained LMs is not final yet; once `dlray export` writes LM artifacts,
an exported debug LM can take its place.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_generation_engine import MAX_CONTEXT, PROMPTS, write_llm_artifact, write_lora_adapter

from dlray.local_cluster import free_port
from dlray.serve.engine import Engine, SamplingParams, Sequence

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
def server(ray_cluster, artifact, adapter):
    from ray import serve

    from dlray.serve.app import run

    serve.shutdown()  # Serve keeps the port it first started on; this module picks its own
    port = free_port()
    run(str(artifact), {"port": port, "api_key_env": API_KEY_ENV, "max_tokens_limit": 64, "max_completions_per_request": 3,
                        "max_batch_size": 8, "batch_wait_timeout_s": 0.05, "adapters": {"sql": adapter}})
    yield f"http://127.0.0.1:{port}"
    serve.delete("dlray")


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


def test_seeded_choices_are_the_same_batched_or_alone(client):
    def complete(seed: int, n: int = 1):
        return client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=1.0, top_p=0.95, seed=seed, n=n)

    alone = {seed: complete(seed).choices[0].text for seed in (10, 11, 12)}
    with ThreadPoolExecutor(6) as pool:  # concurrent: decoded together in one batch
        together = list(pool.map(complete, [12, 20, 21, 22, 23, 24]))
    assert together[0].choices[0].text == alone[12]
    two = complete(10, n=2)  # choice i samples from seed + i
    assert [c.text for c in two.choices] == [alone[10], alone[11]] and two.usage.completion_tokens == 32
    assert len(set(alone.values())) == 3


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
    ("completions", {"json": {"prompt": "x", "logit_bias": {"1": 5}}}, 400, "logit_bias", None),
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


def test_without_a_chat_template_chat_fails_at_start_up_or_is_switched_off(server, tmp_path):
    """Two more apps beside the module's server, over an artifact whose tokenizer has no template."""
    from ray import serve

    from dlray.serve.app import build_app

    plain = write_llm_artifact(tmp_path / "plain", chat_template=None)
    with pytest.raises(ValueError, match="no chat template.*serve.chat=false"):
        build_app({"artifact": str(plain)})  # before any replica starts
    serve.run(build_app({"artifact": str(plain), "chat": False}), name="plain", route_prefix="/plain")
    try:
        chat = httpx.post(f"{server}/plain/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}, timeout=60)
        assert chat.status_code == 404 and chat.json()["error"]["code"] == "chat_disabled", chat.text
        completion = httpx.post(f"{server}/plain/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)  # no key here
        assert completion.status_code == 200 and completion.json()["model"] == "plain"
    finally:
        serve.delete("plain")
