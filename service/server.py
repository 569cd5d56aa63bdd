"""Run the app under uvicorn; start-up errors become a clear message and exit code 1."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from types import FrameType
from typing import Any

from service.config import Settings
from service.core.loading import StartupError

logger = logging.getLogger("embedrank.server")


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop leave in one system call.

    uvicorn writes a response's status line and headers, then its body, as two writes: two sends and two
    TCP segments for every answer. Held until the loop's next turn (the same turn's callbacks run first,
    so nothing waits on a timer), the two go out together with one `writelines`. Everything else is the
    transport's own.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if not pending or self._transport.is_closing():
            return  # the connection went away; uvicorn marks the request disconnected
        if len(pending) == 1:
            self._transport.write(pending[0])
        else:
            self._transport.writelines(pending)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def http_protocol() -> Any:
    """uvicorn's httptools protocol writing through `CoalescingTransport`, with the app's HTTP lane (service.lane)
    answering the hot routes itself ("auto" where httptools is missing)."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
    except ImportError:
        return "auto"

    from service.deps import CONNECTION
    from service.lane import Lane, LaneCycle, serve

    class EmbedRankHttpProtocol(HttpToolsProtocol):
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            lane = getattr(config.app, "lane", None)
            # uvicorn's own routing of requests (a root path, a concurrency limit) keeps every request.
            plain = not config.root_path and config.limit_concurrency is None
            self.lane: Lane | None = lane if plain and isinstance(lane, Lane) else None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # A request waiting for its results looks here to see whether its client went away.
            self.scope[CONNECTION] = self.transport  # type: ignore[literal-required]

        def on_headers_complete(self) -> None:
            lane = self.lane
            if lane is not None and (self.cycle is None or self.cycle.response_complete) \
                    and self.parser.get_method() == b"POST":
                route = lane.route_for(self.url, self.headers)
                if route is not None:
                    version = self.parser.get_http_version()
                    scope: Any = self.scope
                    scope["method"] = "POST"
                    if version != "1.1":
                        scope["http_version"] = version
                    scope["path"] = route.route.path
                    scope["raw_path"] = self.url
                    scope["query_string"] = b""
                    self.cycle = LaneCycle(route, scope, version != "1.0" and self.parser.should_keep_alive())  # type: ignore[assignment]
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            cycle: Any = self.cycle
            if type(cycle) is LaneCycle:
                cycle.chunks.append(body)  # at most the payload limit: its Content-Length was checked
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            cycle: Any = self.cycle
            if type(cycle) is LaneCycle:
                assert self.lane is not None
                task = self.loop.create_task(serve(self.lane, self, cycle))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
                return
            super().on_message_complete()

        def write_answer(self, cycle: LaneCycle, status: int, headers: list[tuple[bytes, bytes]],
                         body: bytes) -> None:
            """Write a lane answer as uvicorn writes one: its default headers first, `connection: close`
            when the connection ends with it."""
            if cycle.disconnected:
                return
            content = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                content += (name, b": ", value, b"\r\n")
            for name, value in headers:
                content += (name, b": ", value, b"\r\n")
            if not cycle.keep_alive:
                content.append(b"connection: close\r\n")
            content += (b"\r\n", body)
            self.transport.write(b"".join(content))
            self._lane_answered(cycle)

        def _lane_answered(self, cycle: LaneCycle) -> None:
            cycle.response_complete = True
            if not cycle.keep_alive:
                self.transport.close()
            self.on_response_complete()  # the next pipelined request, or the keep-alive timer

        async def to_app(self, cycle: LaneCycle) -> None:
            """Hand a request the lane took to the app after all, its body read again from memory."""
            fallback = RequestResponseCycle(
                scope=cycle.scope, transport=self.transport, flow=self.flow, logger=self.logger,  # type: ignore[arg-type]
                access_logger=self.access_logger, access_log=self.access_log,
                default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
                expect_100_continue=False, keep_alive=cycle.keep_alive,
                on_response=lambda: self._lane_answered(cycle))
            fallback.body = bytearray(cycle.body())
            fallback.more_body = False
            fallback.message_event.set()  # the whole body is there for its first `receive`
            fallback.disconnected = cycle.disconnected
            cycle.fallback = fallback
            await fallback.run_asgi(self.app)

    return EmbedRankHttpProtocol


# Container allocations, net of those freed, between two young collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_garbage_collector() -> None:
    """Set the cycle collector up for serving, once everything is loaded and warmed up.

    Nearly all a request allocates is freed by reference counting, but with CPython's defaults the
    collector still ran whenever 700 more containers were alive than at its last run, which the objects of
    the requests in flight keep crossing: on 2 cores, at 32 single-text int8 clients, about one young
    collection per 140 requests (0.6 ms each) and every ~10,000 requests a full one of the ~76,000 objects
    that loading left, 30-50 ms during which the event loop does nothing else. Frozen, those objects are
    never examined again, and at 10,000 the young collections did not run once in 20,000 requests; a
    reference cycle still is collected, after at most 10,000 net allocations.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


def server_config(app: Any, settings: Settings) -> Any:
    """uvicorn's settings for serving `app`. X-Forwarded-For is read only with tracing on, whose spans record the
    client's address: nothing else uses it, and rewriting every request's scope for it cost about 2% of the event
    loop's time."""
    import uvicorn

    return uvicorn.Config(app, host=settings.hostname, port=settings.port, log_config=None, access_log=False,
                          loop="auto", http=http_protocol(), lifespan="on", proxy_headers=bool(settings.otlp_endpoint),
                          timeout_graceful_shutdown=settings.graceful_shutdown_seconds)


def run_server(settings: Settings) -> int:
    import uvicorn

    from service.app import create_app
    from service.core.loading import load_configured
    from service.core.registry import ModelRegistry
    from service.observability import configure_logging
    from service.proxy.upstreams import UpstreamConfigError

    configure_logging(settings.log_level, settings.json_output)
    generation_only = not settings.model_id and bool(settings.llm or settings.llm_config)
    try:
        registry = ModelRegistry([]) if generation_only else load_configured(settings)
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        app = create_app(settings, registry)
    except (RuntimeError, UpstreamConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        registry.stop()
        return 1
    config = server_config(app, settings)
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # Readiness drops at once; uvicorn then stops accepting, lets in-flight requests finish
            # (their queued items are still computed) within the grace period, and exits 0.
            app.state.ready = False
            logger.info("shutting down: no longer ready, finishing in-flight requests")
            super().handle_exit(sig, frame)
            # uvicorn re-raises caught signals once drained; a clean SIGTERM shutdown should exit 0.
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    settle_garbage_collector()
    server = Server(config)
    server.run()
    if not server.started:
        return 1
    return 0
