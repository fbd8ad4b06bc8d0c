"""The OpenAPI description (/openapi.json, /docs) of routes that read their own request bodies.

The routes take the raw `Request`: they cap the body's size before reading it, take images as well
as JSON, and answer bad requests in OpenAI's error shape, so FastAPI sees no body parameter to
document. These helpers give the decorators `openapi_extra` and `responses` built from the very
pydantic models that parse the bodies, so the description cannot drift from what is parsed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from dlray.serve.errors import ErrorResponse

ERRORS = {
    400: "Malformed body, or a value outside this model's limits; `error.param` names the field",
    401: "Missing or wrong `Authorization: Bearer <key>` (only where serve.api_key_env is set; code `invalid_api_key`)",
    404: "`model` names no model served here (code `model_not_found`), or chat is switched off (serve.chat false; code `chat_disabled`)",
    413: "Body larger than serve.max_body_bytes",
    415: "Unsupported Content-Type",
    429: "The replica's queue is full (serve.max_queue_len requests wait already; code `queue_full`): retry after the `Retry-After` header's seconds",
}
# Ray Serve's proxy answers it before the request reaches a replica, in plain text.
UNAVAILABLE = {"description": "No replica is ready (starting up, or all failed): retry later", "content": {"text/plain": {"schema": {"type": "string"}}}}
BINARY = {"schema": {"type": "string", "format": "binary"}}


def json_schema(model: type[BaseModel], mode: JsonSchemaMode = "validation") -> dict:
    """The model's JSON schema with its `$defs` inlined: a `$ref` in an OpenAPI document is resolved
    against the whole document, which has no `$defs`."""
    schema = model.model_json_schema(mode=mode)
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:  # pydantic's refs are "#/$defs/<name>", maybe beside a description
                return inline({**definitions[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}})
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return inline(schema)


def json_content(*models: type[BaseModel]) -> dict:
    """A JSON body that is one of `models`."""
    schemas = [json_schema(model) for model in models]
    return {"application/json": {"schema": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}}}


def request_body(content: dict) -> dict:
    """`openapi_extra` for a route's required body: {media type: {"schema": ...}}."""
    return {"requestBody": {"required": True, "content": content}}


def responses(ok: type[BaseModel], *errors: int, content: dict | None = None) -> dict:
    """`responses=` for a route answering `ok` as JSON (and in the other media types of `content`),
    the `errors` in OpenAI's shape, and 503 from Serve."""
    success = {"model": ok, "description": "Success", **({"content": content} if content else {})}
    return {200: success, **{status: {"model": ErrorResponse, "description": ERRORS[status]} for status in errors}, 503: UNAVAILABLE}


def event_stream(chunk: type[BaseModel]) -> dict:
    """Server-sent events as OpenAI streams them: each event's data one JSON chunk, the last `[DONE]`."""
    data = {"anyOf": [{"type": "string", "contentMediaType": "application/json", "contentSchema": json_schema(chunk, "serialization")}, {"const": "[DONE]"}]}
    return {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": data}}}
