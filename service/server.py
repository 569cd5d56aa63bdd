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
    """uvicorn's httptools protocol writing through `CoalescingTransport` ("auto" where httptools is missing)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    from service.deps import CONNECTION

    class CoalescingHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = CoalescingTransport(transport, self.loop)  # type: ignore[assignment]

        def on_message_begin(self) -> None:
            super().on_message_begin()
            # A request waiting for its results looks here to see whether its client went away.
            self.scope[CONNECTION] = self.transport  # type: ignore[literal-required]

    return CoalescingHttpProtocol


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
