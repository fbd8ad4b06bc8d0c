"""Each endpoint's OpenAPI description (/openapi.json, what /docs shows) fuzzed against the endpoint
served on 127.0.0.1: schemathesis draws bodies from each route's request schema, and bodies that
break it, and checks that no answer is a server error and that every answer's status, Content-Type
and body are the ones the description documents. Afterwards the replica still answers a normal request.

The apps are cheap to stand up: the session's digits CNN, an untrained debug diffusion UNet and the
tiny random Llama of test_generation_engine, with limits low enough that a fuzzed request which
passes them samples in milliseconds.
"""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode, checks
from schemathesis.core import NOT_SET

from dlray.artifact import write_artifact
from dlray.config import load_config
from dlray.models import diffusion

from helpers import REPO
from tiny_llm import write_llm_artifact

pytestmark = pytest.mark.slow

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance]
# Requests per operation: 100 as the schema allows, 40 breaking it (each a 400: fewer suffice, and
# the suite's time is shared). Hypothesis stops early only for an operation with fewer distinct requests (GET /healthz has one).
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 40}


def diffusion_artifact(directory):
    cfg = load_config(REPO / "jobs/debug/diffusion_cpu.yaml")
    info = {"image_shape": [1, 16, 16], "class_names": [str(i) for i in range(10)], "mean": [0.5], "std": [0.25]}
    model_cfg = cfg.model.model_dump()
    return write_artifact(diffusion.build(model_cfg, info), {"task": "images", "model": model_cfg, "data_info": info, "serve": {}}, directory)


@pytest.fixture(scope="module")
def endpoints(digits_run, serve_artifact, tmp_path_factory):
    """name -> (base URL, a normal request) of each endpoint. The three deploy at once, each in a thread of its
    own: a replica's start (a worker process importing torch and dlray) is most of a deploy's time, and they
    overlap. One replica each (1 CPU), beside each other while the module runs."""
    directory = tmp_path_factory.mktemp("openapi")
    apps = {
        "classify": (digits_run[3], {}, ("/v1/classify", {"image": [[0.5] * 8] * 8})),
        "images": (diffusion_artifact(directory / "unet"), {"max_images_per_request": 2, "max_inference_steps": 3, "num_inference_steps": 2},
                   ("/v1/images/generations", {"seed": 0})),
        "generate": (write_llm_artifact(directory / "llm"), {"max_tokens_limit": 16, "max_completions_per_request": 2},
                     ("/v1/completions", {"prompt": "x", "max_tokens": 2})),
    }
    with ThreadPoolExecutor(len(apps)) as pool:
        bases = dict(zip(apps, pool.map(lambda name: serve_artifact(apps[name][0], name=name, **apps[name][1]), apps)))
    return {name: (bases[name], normal) for name, (_, _, normal) in apps.items()}


def fuzz(operation, base: str, mode: GenerationMode) -> Counter:
    """Run the CHECKS on EXAMPLES[mode] requests drawn (seeded) from the operation's schema, as it allows
    (positive mode) or breaking it (negative); the statuses of those that had a body."""
    statuses: Counter = Counter()

    @hypothesis.seed(0)
    @hypothesis.settings(max_examples=EXAMPLES[mode], database=None, deadline=None, phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink],
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(case=operation.as_strategy(mode))
    def run(case):
        response = case.call_and_validate(base_url=base, checks=CHECKS, timeout=60)
        if case.body is not NOT_SET:
            statuses[response.status_code] += 1

    run()
    return statuses


@pytest.mark.parametrize("name", ["classify", "images", "generate"])
def test_every_route_answers_as_its_openapi_description_says(endpoints, name):
    base, (route, body) = endpoints[name]
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if operation.body else [GenerationMode.POSITIVE]:  # negative: a body to break
            statuses = fuzz(operation, base, mode)
            print(f"{operation.label} ({mode.value}): {statuses.total()} requests with a body, by status {dict(sorted(statuses.items()))}")
            if operation.body:
                assert statuses.total() >= EXAMPLES[mode], (operation.label, mode)
    assert httpx.post(f"{base}{route}", json=body, timeout=60).status_code == 200
