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
    ErrorKind.UNHEALTHY: 503,
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


def render_tei(error: ApiError) -> Response:
    body = {"error": error.message, "error_type": error.kind.value}
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json",
                    headers=_headers(error))


def render_openai(error: ApiError) -> Response:
    body = {"error": {"message": error.message, "type": OPENAI_TYPE[error.kind], "param": error.param,
                      "code": error.status}}
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json",
                    headers=_headers(error))


OPENAI_PATHS = ("/v1/", "/embeddings")


def render_for_path(path: str, error: ApiError) -> Response:
    """Choose the surface's envelope by route: OpenAI-style paths get OpenAI's, the rest TEI's."""
    if path.startswith(OPENAI_PATHS):
        return render_openai(error)
    return render_tei(error)


def openapi_responses(*kinds: ErrorKind) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the statuses a route can return, from the same table."""
    return {STATUS[kind]: {"description": kind.value} for kind in kinds}
