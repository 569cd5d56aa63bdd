"""The HTTP lane: the hot POST routes answered by the HTTP protocol itself, without ASGI in between.

Behind the direct routes (service.routes.direct) a short embedding request still spent most of the event
loop's time outside its handler: uvicorn built an ASGI cycle and a task for it, passed its body through
`receive` and its answer through two `send` calls that check every header with regular expressions, and
four middlewares wrapped each of those calls in coroutines of their own. Counted by callgrind on 2 cores
(loadtests.instructions --http), a request took 586K instructions of the loop, where a bare protocol that
parses, tokenizes, batches and answers took 196K. On a 2-core machine that time is taken from the engine.

So for a plain request to a direct route (POST, a JSON body of known length within the payload limit, no
`Expect`, no upgrade, a valid API key where keys are set, a model not refusing everything), the protocol
(service.server) collects the body itself and this module answers it: the route's own body model validates
it, the route's own handler runs, and its response is written in one piece, with uvicorn's default headers
and the request id, exactly as the full stack would send it. The request observer records its metrics
and access-log line as for any other request. Anything else goes to the app as before, including a body
that fails validation, which the full stack reads again (from memory) so that the framework words the error.
Off with tracing (whose spans instrument the framework), with CORS, and with `--direct-routes false`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from service.deps import ResponseFacts, authorized, raw_header
from service.observability import REQUEST_ID, Metrics, request_id_for
from service.routes.direct import DirectRoute, content_type_is_json, respond

# The request-observer half the lane needs: a finished request's metrics and access-log line.
Recorder = Callable[[dict[str, Any], int, ResponseFacts | None, float], None]


@dataclass(frozen=True)
class Lane:
    """What the protocol needs to answer direct-route requests itself; built by `create_app`."""

    routes: dict[bytes, DirectRoute]  # by the request target exactly as sent (no query string)
    app: Any  # the application, as handlers reach it through `request.app`
    metrics: Metrics
    record: Recorder
    payload_limit: int
    request_limit: int  # --max-concurrent-requests: when every model holds this many, the app refuses
    expected_authorization: tuple[bytes, ...] = ()  # `Bearer KEY` per API key; empty: no keys
    public_paths: frozenset[str] = frozenset()

    def route_for(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> DirectRoute | None:
        """The route when a POST to `target` with these (lower-cased) headers is the lane's to answer."""
        route = self.routes.get(target)
        if route is None:
            return None
        length = -1
        authorization = b""
        for name, value in headers:
            if name == b"content-length":
                if not value.isdigit() or length >= 0:
                    return None
                length = int(value)
            elif name == b"content-type":
                if not content_type_is_json(value):
                    return None
            elif name == b"authorization":
                authorization = value
            elif name in (b"transfer-encoding", b"expect", b"upgrade"):
                return None
        if length < 0 or length > self.payload_limit:
            return None  # the app answers 413, or reads a body of unknown length as it streams in
        if self.expected_authorization and route.route.path not in self.public_paths and \
                not authorized(authorization, self.expected_authorization):
            return None  # the app answers 401
        registry = getattr(self.app.state, "registry", None)
        if registry is None or not registry.models or registry.saturated(self.request_limit):
            return None  # the app answers 429 before reading the body (or finds no model)
        return route


class LaneCycle:
    """One request the lane answers, standing in for uvicorn's request-response cycle on its connection: the
    protocol reads `response_complete`, clears `keep_alive` on shutdown, and on a lost connection sets
    `disconnected` and calls `message_event.set()`. Should the request go to the app after all, uvicorn's own
    cycle (`fallback`) answers it and these reach that one."""

    __slots__ = ("_delivered", "_gone", "_keep_alive", "chunks", "disconnected", "fallback", "message_event",
                 "response_complete", "route", "scope", "started")

    def __init__(self, route: DirectRoute, scope: dict[str, Any], keep_alive: bool) -> None:
        self.route = route
        self.scope = scope
        self.chunks: list[bytes] = []
        self.started = time.perf_counter()  # as the request observer starts: when the headers are complete
        self.response_complete = False
        self.disconnected = False
        self.message_event = self
        self.fallback: Any = None
        self._keep_alive = keep_alive
        self._delivered = False
        self._gone: asyncio.Future[None] | None = None

    @property
    def keep_alive(self) -> bool:
        return self._keep_alive if self.fallback is None else bool(self.fallback.keep_alive)

    @keep_alive.setter
    def keep_alive(self, value: bool) -> None:
        self._keep_alive = value
        if self.fallback is not None:
            self.fallback.keep_alive = value

    def body(self) -> bytes:
        if len(self.chunks) != 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0]

    def set(self) -> None:
        """The connection was lost (uvicorn calls `message_event.set()`)."""
        if self.fallback is not None:
            self.fallback.disconnected = self.fallback.disconnected or self.disconnected
            self.fallback.message_event.set()
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    async def receive(self) -> dict[str, Any]:
        """ASGI `receive` for a handler that reads the body itself: the body, then the disconnect when it comes."""
        if not self._delivered:
            self._delivered = True
            return {"type": "http.request", "body": self.body(), "more_body": False}
        if not self.disconnected:
            self._gone = asyncio.get_running_loop().create_future()
            await self._gone
        return {"type": "http.disconnect"}


class LaneConnection(Protocol):
    """What `serve` needs from the HTTP protocol (service.server)."""

    flow: Any

    def write_answer(self, cycle: LaneCycle, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None: ...

    async def to_app(self, cycle: LaneCycle) -> None: ...


async def serve(lane: Lane, connection: LaneConnection, cycle: LaneCycle) -> None:
    """Answer one request on its connection, as the request observer and the direct routes would."""
    scope = cycle.scope
    request_id = request_id_for(raw_header(scope, b"x-request-id"))
    token = REQUEST_ID.set(request_id)
    status = 500
    facts: ResponseFacts | None = None
    try:
        scope["app"] = lane.app  # as the app sets it for its handlers
        response = await respond(cycle.route, scope, cycle.receive, cycle.body(), lane.metrics)
        if response is None:
            await connection.to_app(cycle)  # the app's observer records it
            return
        status = response.status_code
        facts = getattr(response, "facts", None)
        headers = list(response.raw_headers) if facts is None else response.raw_headers  # ours: made for it alone
        headers.append((b"x-request-id", request_id.encode("latin-1")))
        if connection.flow.write_paused and not cycle.disconnected:
            await connection.flow.drain()
        connection.write_answer(cycle, status, headers, bytes(response.body))
        lane.record(scope, status, facts, time.perf_counter() - cycle.started)
    finally:
        REQUEST_ID.reset(token)
