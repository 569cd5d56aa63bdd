"""Helpers shared by route handlers: model lookup, disconnect-aware waiting, fast JSON responses."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import Receive

from service.batching.batcher import PendingRequest
from service.core.embed import Limits, Timings, Usage, WaitHook
from service.core.registry import ModelRegistry, ServedModel
from service.errors import ApiError, ErrorKind

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
ITEMS_HEADER = "x-embedrank-items"
T = TypeVar("T", bound=BaseModel)


def registry(request: Request) -> ModelRegistry:
    value: ModelRegistry = request.app.state.registry
    return value


def limits(request: Request) -> Limits:
    value: Limits = request.app.state.limits
    return value


def model_for(request: Request, name: str | None, task: str, accepts_any: bool = False) -> ServedModel:
    return registry(request).get(name, task, accepts_any)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (once the body is read, uvicorn's receive blocks until then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def until_disconnect(request: Request) -> WaitHook:
    """Wait for the batcher, but drop the request's queued items if the client goes away."""

    async def wait(pending: PendingRequest) -> list[Any]:
        watcher: asyncio.Future[Any] = asyncio.ensure_future(wait_for_disconnect(request.receive))
        waiting: set[asyncio.Future[Any]] = {pending.future, watcher}
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if pending.future in done:
            return pending.future.result()
        pending.cancel()
        raise ApiError(ErrorKind.CANCELLED, "client disconnected")

    return wait


def parse_body(request: Request, data: Any, schema: type[T], surface: str | None = None) -> T:
    """Validate decoded JSON against `schema` by hand (for routes whose schema depends on the body);
    errors from here on are rendered in `surface`'s format."""
    if surface is not None:
        request.state.surface = surface
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        details = "; ".join(f"{'.'.join(str(p) for p in d['loc']) or 'body'}: {d['msg']}" for d in error.errors()[:5])
        raise ApiError(ErrorKind.VALIDATION, details or "invalid request") from None


def json_response(body: Any, timings: Timings | None = None, usage: Usage | None = None,
                  model: ServedModel | None = None, status_code: int = 200) -> Response:
    """orjson straight from numpy, with TEI's timing headers and `x-model` naming the model that answered."""
    headers: dict[str, str] = {}
    if model is not None:
        headers["x-model"] = model.name
    if timings is not None:
        total = timings.total
        headers |= {
            "x-compute-type": compute_type(model) if model is not None else "cpu",
            "x-compute-time": f"{total:.3f}",
            "x-total-time": f"{total:.3f}",
            "x-tokenization-time": f"{timings.tokenization:.3f}",
            "x-queue-time": f"{timings.queue:.3f}",
            "x-inference-time": f"{timings.inference:.3f}",
        }
    if usage is not None:
        headers[ITEMS_HEADER] = str(usage.items)  # for the access log; removed before the response leaves
        headers["x-compute-characters"] = str(usage.characters)
        headers["x-compute-tokens"] = str(usage.tokens)
        if usage.truncated:
            headers["x-truncated-inputs"] = str(usage.truncated)
    return Response(orjson.dumps(body, option=_JSON_OPTIONS), status_code=status_code,
                    media_type="application/json", headers=headers)


def compute_type(model: ServedModel) -> str:
    return f"{'gpu' if model.device == 'cuda' else 'cpu'}+{model.variant}"
