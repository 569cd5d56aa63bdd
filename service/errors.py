"""One error type with kinds, one table from kind to HTTP status, one renderer per surface."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import orjson
from starlette.responses import Response


class ErrorKind(Enum):
    """Kinds of failure; the value is TEI's PascalCase `error_type` name."""

    EMPTY = "Empty"
    VALIDATION = "Validation"
    TOKENIZER = "Tokenizer"
    BACKEND = "Backend"
    OVERLOADED = "Overloaded"
    UNHEALTHY = "Unhealthy"
    NOT_FOUND = "NotFound"
    UNAUTHORIZED = "Unauthorized"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    UNSUPPORTED_MEDIA_TYPE = "UnsupportedMediaType"
    WRONG_TASK = "WrongTask"
    CANCELLED = "Cancelled"
    BAD_GATEWAY = "BadGateway"
    GATEWAY_TIMEOUT = "GatewayTimeout"


STATUS: dict[ErrorKind, int] = {
    ErrorKind.EMPTY: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.PAYLOAD_TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorKind.VALIDATION: 422,
    ErrorKind.TOKENIZER: 422,
    ErrorKind.BACKEND: 424,
    ErrorKind.WRONG_TASK: 424,
    ErrorKind.OVERLOADED: 429,
    ErrorKind.CANCELLED: 499,
    ErrorKind.BAD_GATEWAY: 502,
    ErrorKind.UNHEALTHY: 503,
    ErrorKind.GATEWAY_TIMEOUT: 504,
}

# OpenAI's `type` field for each kind.
OPENAI_TYPE: dict[ErrorKind, str] = {
    ErrorKind.EMPTY: "invalid_request_error",
    ErrorKind.VALIDATION: "invalid_request_error",
    ErrorKind.TOKENIZER: "invalid_request_error",
    ErrorKind.NOT_FOUND: "invalid_request_error",
    ErrorKind.PAYLOAD_TOO_LARGE: "invalid_request_error",
    ErrorKind.UNSUPPORTED_MEDIA_TYPE: "invalid_request_error",
    ErrorKind.WRONG_TASK: "invalid_request_error",
    ErrorKind.UNAUTHORIZED: "authentication_error",
    ErrorKind.OVERLOADED: "rate_limit_error",
    ErrorKind.BACKEND: "server_error",
    ErrorKind.UNHEALTHY: "server_error",
    ErrorKind.CANCELLED: "server_error",
    ErrorKind.BAD_GATEWAY: "server_error",
    ErrorKind.GATEWAY_TIMEOUT: "timeout_error",
}


@dataclass
class ApiError(Exception):
    kind: ErrorKind
    message: str
    param: str | None = None
    retry_after: int | None = None

    def __str__(self) -> str:
        return self.message

    @property
    def status(self) -> int:
        return STATUS[self.kind]


def _headers(error: ApiError) -> dict[str, str]:
    return {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}


# TEI's error_type names where ours differ: TEI answers a route the model cannot serve as Backend.
TEI_TYPE: dict[ErrorKind, str] = {ErrorKind.WRONG_TASK: "Backend"}


def render_tei(error: ApiError) -> Response:
    body = {"error": error.message, "error_type": TEI_TYPE.get(error.kind, error.kind.value)}
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json",
                    headers=_headers(error))


def render_openai(error: ApiError) -> Response:
    body = {"error": {"message": error.message, "type": OPENAI_TYPE[error.kind], "param": error.param,
                      "code": error.status}}
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json",
                    headers=_headers(error))


def render_cohere(error: ApiError) -> Response:
    """Cohere's error body (`{"message": ...}`), used on /v1/rerank and /v2/rerank."""
    return Response(orjson.dumps({"message": error.message}), status_code=error.status,
                    media_type="application/json", headers=_headers(error))


COHERE_PATHS = ("/v1/rerank", "/v2/rerank")
OPENAI_PATHS = ("/v1/", "/embeddings", "/classify", "/models")
RENDERERS = {"tei": render_tei, "openai": render_openai, "cohere": render_cohere}


def render_for_path(path: str, error: ApiError, surface: str | None = None) -> Response:
    """Choose the surface's envelope: by the route's declared surface when it set one (TEI and
    Infinity share /rerank), else by path: Cohere's rerank paths, OpenAI-style paths, then TEI."""
    if surface is not None:
        return RENDERERS[surface](error)
    if path.startswith(COHERE_PATHS):
        return render_cohere(error)
    if path.startswith(OPENAI_PATHS):
        return render_openai(error)
    return render_tei(error)


def openapi_responses(*kinds: ErrorKind) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the statuses a route can return, from the same table."""
    return {STATUS[kind]: {"description": kind.value} for kind in kinds}
