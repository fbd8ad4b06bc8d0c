"""One error shape for every endpoint (OpenAI's): {"error": {"message", "type", "param", "code"}}.

A bad request raises RequestError; the handler turns it into a 4xx JSON response and the
replica carries on serving.
"""

from __future__ import annotations

from typing import Literal, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "rate_limit_error", "server_error"]
    param: Optional[str]  # the request field at fault, "messages.0.role" for a nested one
    code: Optional[str]  # a stable name for errors clients act on: "model_not_found", "context_length_exceeded", ...


class ErrorResponse(BaseModel):
    error: ErrorDetail


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    content = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()
    return JSONResponse(status_code=status, content=content, headers=headers)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        return error_response(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", param=str(first["loc"][-1]))


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing more than `max_bytes` before and after reading it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    body = await request.body()
    if len(body) > max_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds the limit of {max_bytes} bytes")
    if not body:
        raise RequestError(400, "request body is empty")
    return body


def parse_json(model: type[Model], body: bytes) -> Model:
    """`body` as `model`; malformed JSON, unknown fields and bad values get a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(map(str, first["loc"])) or "body"
        raise RequestError(400, f"{field}: {first['msg']}", param=field) from None
