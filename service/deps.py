"""Helpers shared by route handlers: model lookup, disconnect-aware waiting, fast JSON responses."""

from __future__ import annotations

import asyncio
import hmac
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.batching.batcher import PendingRequest
from service.core.embed import Limits, Timings, Usage, WaitHook
from service.core.registry import ModelRegistry, ServedModel
from service.errors import ApiError, ErrorKind

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
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


# A request still waiting this long starts watching its connection. Most requests are answered sooner
# and never pay for a watch; a client that leaves earlier has little queued behind others.
WATCH_DISCONNECT_AFTER_SECONDS = 0.05

# The scope key under which embedrank's HTTP protocol (service.server) puts the request's transport. Behind
# it a waiting request looks at `transport.is_closing()` every WATCH_DISCONNECT_AFTER_SECONDS instead of
# running a task that awaits `http.disconnect` from `receive` (that task and its cancellation cost the event
# loop 15-30 us a request, about a tenth of its time, wherever most requests wait longer than 50 ms, as at
# 128 single-text clients). Without it (another ASGI server, in-process tests) the task watches.
CONNECTION = "embedrank.connection"

# The shared timer fires at most this often: at each firing it scans every waiting request.
_TIMER_TICK_SECONDS = 0.01


class _Waiting:
    """The requests of one event loop waiting for their results, with one timer for all of them: at its deadline
    a request still waiting calls its `watch`, which starts watching its connection, or looks at it and returns
    True to be called again after the same delay. (A timer of its own for every request, set and cancelled, cost
    the loop about 2 us a request.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.deadlines: dict[object, tuple[float, float, Callable[[], bool]]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = float("inf")

    def add(self, key: object, after: float, watch: Callable[[], bool]) -> None:
        deadline = self.loop.time() + after
        self.deadlines[key] = (deadline, after, watch)
        if deadline < self.timer_due:
            self._arm(deadline)

    def discard(self, key: object) -> None:
        self.deadlines.pop(key, None)  # the timer stays: it finds nothing due and is not set again

    def _arm(self, due: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.timer_due = self.loop.call_at(due, self._expire), due

    def _expire(self) -> None:
        self.timer, self.timer_due = None, float("inf")
        now = self.loop.time()
        expired = [key for key, (deadline, _, _) in self.deadlines.items() if deadline <= now]
        for key in expired:
            _, after, watch = self.deadlines.pop(key)
            if watch():
                self.deadlines[key] = (now + after, after, watch)
        if self.deadlines:
            soonest = min(deadline for deadline, _, _ in self.deadlines.values())
            self._arm(max(soonest, now + _TIMER_TICK_SECONDS))


_WAITING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waiting] = weakref.WeakKeyDictionary()
_last_waiting: _Waiting | None = None  # the one used last: in a server, always that of its only loop


def waiting_on(loop: asyncio.AbstractEventLoop) -> _Waiting:
    """The requests waiting for results on `loop`."""
    global _last_waiting
    waiting = _last_waiting
    if waiting is None or waiting.loop is not loop:
        waiting = _WAITING.get(loop)
        if waiting is None:
            waiting = _WAITING[loop] = _Waiting(loop)
        _last_waiting = waiting
    return waiting


def until_disconnect(request: Request, after: float = WATCH_DISCONNECT_AFTER_SECONDS) -> WaitHook:
    """Wait for the batcher, but drop the request's queued items if the client goes away (noticed from
    `after` seconds on)."""

    async def wait(pending: PendingRequest) -> list[Any]:
        result = pending.future
        watcher: asyncio.Future[None] | None = None

        def gone() -> None:
            if not result.done():
                pending.cancel()
                result.set_exception(ApiError(ErrorKind.CANCELLED, "client disconnected"))

        def left(task: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is None:
                gone()

        def watch() -> bool:
            """At the deadline: True to be called again later."""
            nonlocal watcher
            if result.done():
                return False
            if connection is None:
                watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
                watcher.add_done_callback(left)
                return False
            if connection.is_closing():
                gone()
                return False
            return True

        connection: asyncio.BaseTransport | None = request.scope.get(CONNECTION)
        waiting = waiting_on(pending.loop)
        waiting.add(pending, after, watch)
        try:
            return await result
        finally:
            waiting.discard(pending)
            if watcher is not None:
                watcher.cancel()
            if result.cancelled():  # the handler itself was cancelled: its queued items are not needed
                pending.cancel()

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


# The key of a JSON answer's `http.response.start` message that carries its `ResponseFacts`.
FACTS = "embedrank.facts"


class ResponseFacts(NamedTuple):
    """What an answer tells the request observer (metrics, access log), so it need not read headers back."""

    model: str
    items: int
    tokens: int
    timings: Timings | None


class JsonResponse(Response):
    """A JSON answer whose headers arrive already encoded (the base class would encode a dict again). Its start
    message carries its `ResponseFacts` and a header list made for this answer alone, which the layers in front
    may extend in place."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int, raw_headers: list[tuple[bytes, bytes]],
                 facts: ResponseFacts) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        raw_headers.append((b"content-length", b"%d" % len(body)))
        raw_headers.append((b"content-type", b"application/json"))
        self.raw_headers = raw_headers
        self.facts = facts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers,
                    FACTS: self.facts})
        await send({"type": "http.response.body", "body": self.body})


def authorized(given: bytes, expected: tuple[bytes, ...] | list[bytes]) -> bool:
    """`given` (an Authorization header) is one of `expected`; compared against every one in constant time, so
    the time taken does not tell which one nearly matched."""
    return any([hmac.compare_digest(given, candidate) for candidate in expected])


def raw_header(scope: Scope, name: bytes) -> str:
    """A request header's value ("" when absent) from the raw ASGI scope, without building a headers object."""
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def json_response(body: Any, timings: Timings | None = None, usage: Usage | None = None,
                  model: ServedModel | None = None, status_code: int = 200) -> Response:
    """orjson straight from numpy, with TEI's timing headers and `x-model` naming the model that answered."""
    headers: list[tuple[bytes, bytes]] = []
    if model is not None:
        headers.append((b"x-model", model.name.encode("latin-1")))
    if timings is not None:
        total = b"%.3f" % timings.total
        headers += [
            (b"x-compute-type", compute_type(model).encode() if model is not None else b"cpu"),
            (b"x-compute-time", total),
            (b"x-total-time", total),
            (b"x-tokenization-time", b"%.3f" % timings.tokenization),
            (b"x-queue-time", b"%.3f" % timings.queue),
            (b"x-inference-time", b"%.3f" % timings.inference),
        ]
    if usage is not None:
        headers += [(b"x-compute-characters", b"%d" % usage.characters), (b"x-compute-tokens", b"%d" % usage.tokens)]
        if usage.truncated:
            headers.append((b"x-truncated-inputs", b"%d" % usage.truncated))
    facts = ResponseFacts(model.name if model is not None else "", usage.items if usage is not None else 0,
                          usage.tokens if usage is not None else 0, timings)
    return JsonResponse(orjson.dumps(body, option=_JSON_OPTIONS), status_code, headers, facts)


def compute_type(model: ServedModel) -> str:
    return f"{'gpu' if model.device == 'cuda' else 'cpu'}+{model.variant}"
