"""The hot POST routes, dispatched without the framework's per-request machinery.

FastAPI spends more of the event loop on an embedding request than the request itself needs: route
matching, dependency solving, the body decoded with the standard library's json, exception and
exit-stack wrappers around every send. On a 2-core machine that loop time is taken from the engine.
`DirectRoutes` is the last of our middlewares, which run in front of the framework (see `EmbedRankApp`),
and handles the hottest paths itself: it reads the body, validates it with the route's own pydantic
model straight from bytes (pydantic-core), calls the route's own handler, and sends its response. So
neither the framework's middleware stack nor its router runs for them. Everything observable stays
the same: the handler, the response, the error envelopes, metrics and access log (our middlewares in
front of it still run), and the route label in metrics.

Anything unusual goes to the framework unchanged, with the body replayed: a body that fails validation
(so the error message is the framework's own), a content type other than JSON, or a route this lane
does not know.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, ErrorKind, render_for_path
from service.observability import Metrics

logger = logging.getLogger("embedrank.app")

Handler = Callable[..., Awaitable[Response]]


@dataclass(frozen=True)
class DirectRoute:
    route: APIRoute
    handler: Handler
    body_model: type[BaseModel] | None  # None: the handler reads the body itself


def direct_routes(routers: list[APIRouter], paths: list[str]) -> dict[str, DirectRoute]:
    """The POST routes at `paths`, with the handler and body model FastAPI would use."""
    table: dict[str, DirectRoute] = {}
    for route in (route for router in routers for route in router.routes):
        if isinstance(route, APIRoute) and route.path in paths and "POST" in (route.methods or ()):
            body_fields = route.dependant.body_params
            if len(body_fields) > 1 or route.dependant.dependencies:
                continue  # a shape this lane does not reproduce: the framework keeps it
            model = body_fields[0].field_info.annotation if body_fields else None
            if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
                continue
            table[route.path] = DirectRoute(route, route.endpoint, model)
    return table


def content_type_is_json(value: bytes) -> bool:
    """A Content-Type the framework parses as JSON."""
    kind = value.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return content_type_is_json(value)
    return True  # no content type: parsed as JSON, as the framework does


class DirectRoutes:
    """ASGI middleware: serve the routes in `table` directly, pass everything else on."""

    def __init__(self, app: ASGIApp, table: dict[str, DirectRoute], metrics: Metrics) -> None:
        self.app = app
        self.table = table
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        entry = self.table.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if entry is None or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
        except ApiError as error:  # the payload limit, raised while the body streams in
            await self._error(scope, error)(scope, receive, send)
            return
        if body is None:
            return  # the client went away before it finished sending
        replay = _replaying(body, receive)
        response = await respond(entry, scope, replay, body, self.metrics)
        if response is None:
            await self.app(scope, replay, send)  # the framework words the error
            return
        await response(scope, replay, send)

    def _error(self, scope: Scope, error: ApiError) -> Response:
        return error_response(scope, error, self.metrics)


async def respond(entry: DirectRoute, scope: Scope, receive: Receive, body: bytes, metrics: Metrics) -> Response | None:
    """The route's response to `body` (its errors rendered as the app renders them), or None when the body fails
    the route's model, whose error the framework words."""
    arguments: dict[str, Any] = {}
    if entry.body_model is not None:
        try:
            arguments["body"] = entry.body_model.model_validate_json(body)
        except ValidationError:
            return None
    scope["route"] = entry.route
    try:
        return await entry.handler(request=Request(scope, receive), **arguments)
    except ApiError as error:
        return error_response(scope, error, metrics)
    except Exception as error:
        logger.error("unhandled error on %s", scope["path"], exc_info=error)
        return render_for_path(scope["path"], ApiError(ErrorKind.BACKEND, "internal error"))


def error_response(scope: Scope, error: ApiError, metrics: Metrics) -> Response:
    metrics.errors.labels(error.kind.value).inc()
    return render_for_path(scope["path"], error, scope.get("state", {}).get("surface"))


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the already-read body once, then whatever the connection says next."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
