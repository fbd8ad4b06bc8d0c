"""What an endpoint is to dlray.serve.app (an `Endpoint`, one per artifact task in ENDPOINTS), and what
every endpoint's FastAPI app has: OpenAI-shaped errors and GET /healthz.

Adding an endpoint: a file in dlray/serve/ holding its settings model (a dlray.config.serve.EndpointSettings;
also the deployment's constructor argument), its app from `endpoint_api`, a @serve.deployment class taking
`(artifact, settings)` with a `health()`, and an `Endpoint`; then a line in dlray.serve.app.ENDPOINTS.
tests/toy_endpoint.py is one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from dlray.config.serve import EndpointSettings
from dlray.serve.errors import install_error_handlers

# (path, JSON body, further curl options as shell text) of a request to an endpoint's main route.
ExampleRequest = tuple[str, dict, str]


@dataclass(frozen=True)
class Endpoint:
    deployment: Any  # a ray.serve Deployment whose class takes (artifact: str, settings)
    settings: type[EndpointSettings]
    api: FastAPI  # its routes, which `dlray serve` lists
    # What `dlray serve` prints as an example: example_request(artifact, artifact_config, settings).
    example_request: Callable[[str, dict, Any], ExampleRequest]
    # Run where the app is built, before any replica starts: refuses an artifact the endpoint cannot serve with
    # these settings, and returns the settings the replicas get (paths made absolute: replicas run elsewhere).
    prepare: Callable[[str, dict, Any], Any] | None = None


def endpoint_api(title: str) -> FastAPI:
    """An endpoint's FastAPI app: errors in OpenAI's shape (4xx for bad requests, the replica serving on),
    and GET /healthz, which answers {"status": "ok", "dtype": <the replica's>, **replica.health()}."""
    api = FastAPI(title=title)
    install_error_handlers(api)

    @api.get("/healthz")
    async def healthz() -> dict:
        from ray import serve

        replica = serve.get_replica_context().servable_object  # the deployment's instance on this replica
        return {"status": "ok", "dtype": replica.dtype, **replica.health()}

    return api
