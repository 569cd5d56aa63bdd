"""The application factory: routes, error rendering, limits and the model lifecycle."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.datastructures import State
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import service
from service.batching.policy import inline_pass_tokens, pass_token_budget
from service.config import Settings
from service.core.cache import ResultCache
from service.core.embed import Limits
from service.core.loading import load_configured
from service.core.registry import ModelRegistry, batch_observer
from service.deps import FACTS, ResponseFacts, authorized, raw_header
from service.engines.layout import thread_layout
from service.engines.ort_engine import default_intra_op_threads
from service.errors import ApiError, ErrorKind, render_for_path
from service.lane import Lane
from service.observability import REQUEST_ID, Metrics, request_id_for
from service.proxy.forward import ROUTES as LLM_ROUTES
from service.proxy.forward import LlmProxy, ProxySettings
from service.proxy.upstreams import load_upstreams
from service.routes import llm as llm_routes
from service.routes import openai as openai_routes
from service.routes import rerank as rerank_routes
from service.routes import tei as tei_routes
from service.routes.direct import DirectRoutes, direct_routes

logger = logging.getLogger("embedrank.app")
access_logger = logging.getLogger("embedrank.access")


class PayloadLimit:
    """Refuse bodies over the limit with 413 before they are read whole (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = False
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit():
                if int(value) > self.limit:
                    await render_for_path(scope["path"], self._error())(scope, receive, send)
                    return
                declared = True
            elif name == b"transfer-encoding":
                declared = False
                break
        if declared:
            # The server reads no more than the declared length, so there is nothing left to count.
            await self.app(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)

    def _error(self) -> ApiError:
        return ApiError(ErrorKind.PAYLOAD_TOO_LARGE, f"request body is larger than the {self.limit}-byte limit")


class BearerAuth:
    """With API keys set, every path but the public ones needs `Authorization: Bearer KEY`."""

    def __init__(self, app: ASGIApp, keys: list[bytes], public: list[str]) -> None:
        self.app = app
        self.expected = [b"Bearer " + key for key in keys]
        self.public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope.get("headers", []) if name == b"authorization"), b"")
        if not authorized(given, self.expected):
            error = ApiError(ErrorKind.UNAUTHORIZED, "missing or invalid API key")
            await render_for_path(scope["path"], error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


ROUTERS = [tei_routes.router, openai_routes.router, rerank_routes.router, llm_routes.router]
# The routes served by DirectRoutes (the rest go through the framework's router).
DIRECT_PATHS = ["/embed", "/v1/embeddings", "/embeddings", "/rerank", "/v1/rerank", "/v2/rerank", "/predict",
                "/classify", "/similarity"]

_GENERATION_PATHS = tuple("/v1" + route for route in LLM_ROUTES)


class EarlyRefusal:
    """Under overload, answer 429 before reading or parsing the body: when every served model holds
    all the requests it admits, no inference request can be admitted, so refusing costs almost nothing
    and the event loop stays free for /health and the requests already admitted."""

    def __init__(self, app: ASGIApp, limit: int, state: Any) -> None:
        self.app = app
        self.limit = limit
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] not in _GENERATION_PATHS:
            registry = getattr(self.state, "registry", None)
            if registry is not None and registry.saturated(self.limit):
                error = ApiError(ErrorKind.OVERLOADED, "Model is overloaded", retry_after=1)
                await render_for_path(scope["path"], error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestObserver:
    """Per request: an id (X-Request-ID accepted or made, echoed, on every log line), metrics by route
    template, model and status, and one access-log line. Pure ASGI, so bodies are never buffered."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_requests: bool) -> None:
        self.app = app
        self.requests = metrics.requests
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_for(raw_header(scope, b"x-request-id"))
        token = REQUEST_ID.set(request_id)
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        status = 500
        facts: ResponseFacts | None = None

        async def capture(message: Message) -> None:
            nonlocal status, facts
            if message["type"] == "http.response.start":
                status = message["status"]
                facts = message.get(FACTS)
                if facts is not None:  # our JSON answers: the header list is this answer's own
                    message["headers"].append(id_header)
                else:
                    message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.record(scope, status, facts, time.perf_counter() - started)
            REQUEST_ID.reset(token)

    def record(self, scope: Scope, status: int, facts: ResponseFacts | None, elapsed: float) -> None:
        """A finished request's metrics and access-log line (also for those the HTTP lane answers)."""
        route = getattr(scope.get("route"), "path", "unmatched")
        timings = facts.timings if facts is not None else None
        self.requests.count(route, facts.model if facts is not None else "", status)
        self.requests.observe(route, "total", elapsed)
        if timings is not None:
            self.requests.observe(route, "queue", timings.queue / 1000)
            self.requests.observe(route, "tokenization", timings.tokenization / 1000)
            self.requests.observe(route, "inference", timings.inference / 1000)
        if self.log_requests and access_logger.isEnabledFor(logging.INFO):
            model = facts.model if facts is not None else ""
            fields = {"method": scope["method"], "route": route, "status": status, "model": model or None,
                      "items": facts.items if facts is not None else 0,
                      "tokens": facts.tokens if facts is not None else 0, "total_ms": round(elapsed * 1000, 3),
                      "queue_ms": round(timings.queue, 3) if timings is not None else 0.0,
                      "inference_ms": round(timings.inference, 3) if timings is not None else 0.0}
            access_logger.info("%s %s %s %.1fms model=%s items=%s tokens=%s", scope["method"], scope["path"],
                               status, elapsed * 1000, model or "-", fields["items"], fields["tokens"],
                               extra={"fields": fields})


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for detail in error.errors()[:5]:
        location = ".".join(str(part) for part in detail.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {detail.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class AppState(State):
    """`app.state` whose values plain attribute lookup finds. Starlette's `State` keeps them in a dict that its
    `__getattr__` reads, which Python calls only after the ordinary lookup has failed: about 0.45 us a read, where
    a request reads three or four (its registry, limits, executor)."""

    def __setattr__(self, key: Any, value: Any) -> None:
        super().__setattr__(key, value)
        object.__setattr__(self, key, value)

    def __delattr__(self, key: Any) -> None:
        super().__delattr__(key)
        object.__delattr__(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__delattr__(key)


class EmbedRankApp(FastAPI):
    """The app, with our middlewares in front of the framework's own stack rather than inside it: a request
    the direct routes answer passes only through them, not through the framework's error, telemetry and
    body-limit layers (about a tenth of the event loop's time per request); every other request goes on
    into the framework as before."""

    outer: ASGIApp | None = None
    lane: Lane | None = None  # the hot routes as embedrank's HTTP protocol answers them (service.lane)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.outer is not None and scope["type"] == "http":
            scope["app"] = self  # handlers reach the app's state through their request
            await self.outer(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The framework itself, behind our middlewares."""
        await super().__call__(scope, receive, send)

    def layers(self) -> list[type]:
        """Our middlewares a request passes, outermost first (in front of the framework, or inside it)."""
        found: list[type] = []
        layer = self.outer
        while layer is not None and hasattr(layer, "app"):
            found.append(type(layer))
            layer = layer.app
        return found + [middleware.cls for middleware in self.user_middleware]  # type: ignore[misc]


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the app. With `registry` given (tests), those models are served as they are."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models = registry
        if models is None and not settings.model_id and proxy is not None:
            models = ModelRegistry([])  # a generation-only server
        if models is None:
            models = load_configured(settings)
        start_batchers(models)
        app.state.registry = models
        if proxy is not None:
            await proxy.start()
        app.state.ready = True
        logger.info("ready: %s", ", ".join(models.names()))
        try:
            yield
        finally:
            app.state.ready = False
            models.stop()
            if proxy is not None:
                await proxy.stop()
            provider = getattr(app.state, "tracer_provider", None)
            if provider is not None:
                provider.shutdown()  # flushes the spans still batched
            app.state.executor.shutdown(wait=False, cancel_futures=True)

    # The framework's own OpenTelemetry hooks stay off (they check the environment on every request);
    # --otlp-endpoint sets up tracing itself.
    app = EmbedRankApp(title="embedrank", version=service.__version__, lifespan=lifespan,
                       telemetry={"tracing": False, "metrics": False, "logs": False},
                       description="Embeddings and rerank on ONNX Runtime, compatible with TEI, Infinity, "
                       "OpenAI, Cohere and Jina clients.")
    app.state = AppState()
    proxy = None
    if settings.llm or settings.llm_config:
        proxy = LlmProxy(load_upstreams(settings.llm, settings.llm_config),
                         ProxySettings(settings.llm_connect_timeout, settings.llm_read_timeout,
                                       settings.llm_max_response_bytes, settings.llm_max_concurrent_requests,
                                       settings.llm_health_check_seconds), metrics)
    app.state.llm = proxy
    workers = settings.tokenization_workers or default_intra_op_threads()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    app.state.started_at = time.time()
    app.state.tokenization_workers = workers
    app.state.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
    app.state.limits = Limits(settings.max_client_batch_size, settings.auto_truncate, settings.default_prompt,
                              settings.default_prompt_name, settings.max_concurrent_requests,
                              settings.split_oversized_batches, settings.max_input_characters,
                              settings.queue_timeout_seconds)

    def start_batchers(models: ModelRegistry) -> None:
        for model in models.models:
            if model.batcher is None:
                layout = model.layout or thread_layout(model.variant, model.device, default_intra_op_threads(),
                                                       settings.intra_op_threads, settings.engine_workers,
                                                       sessions=settings.engine_sessions)
                model.start(settings.max_batch_tokens, settings.max_batch_requests, batch_observer(metrics, model.name),
                            workers=layout.workers, nice=settings.inference_nice,
                            overlap_tokens=layout.overlap_tokens or settings.max_batch_tokens,
                            target_tokens=pass_token_budget(model.device, settings.max_batch_tokens,
                                                            settings.target_batch_tokens),
                            release_idle_seconds=settings.release_memory_idle_seconds,
                            inline_tokens=inline_pass_tokens(model.device, settings.inline_pass_tokens),
                            keep_requests_whole=model.device == "cuda")
            if settings.result_cache_size and model.cache is None:
                model.cache = ResultCache(settings.result_cache_size)
                metrics.caches.add(model.name, model.cache)

    if registry is not None:
        start_batchers(registry)
        app.state.registry = registry

    def surface(request: Request) -> str | None:
        return getattr(request.state, "surface", None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        metrics.errors.labels(error.kind.value).inc()
        return render_for_path(request.url.path, error, surface(request))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        metrics.errors.labels(ErrorKind.VALIDATION.value).inc()
        return render_for_path(request.url.path, ApiError(ErrorKind.VALIDATION, _validation_message(error)),
                               surface(request))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        logger.error("unhandled error on %s", request.url.path, exc_info=error)
        return render_for_path(request.url.path, ApiError(ErrorKind.BACKEND, "internal error"))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for router in ROUTERS:
        app.include_router(router)
    # Our middlewares, outermost first.
    layers: list[tuple[Any, dict[str, Any]]] = [
        (RequestObserver, {"metrics": metrics, "log_requests": settings.log_requests})]
    if settings.cors_allow_origin:
        from starlette.middleware.cors import CORSMiddleware

        layers.append((CORSMiddleware, {"allow_origins": settings.cors_allow_origin, "allow_methods": ["GET", "POST"],
                                        "allow_headers": ["*"], "expose_headers": ["*"]}))
    keys = settings.api_keys()
    if keys:
        layers.append((BearerAuth, {"keys": [key.encode() for key in keys], "public": settings.public_paths}))
    layers += [(EarlyRefusal, {"limit": settings.max_concurrent_requests, "state": app.state}),
               (PayloadLimit, {"limit": settings.payload_limit})]
    if settings.otlp_endpoint:
        # Tracing instruments the framework's stack, so everything stays inside it (no direct routes).
        from service.observability import setup_tracing

        for middleware, options in reversed(layers):
            app.add_middleware(middleware, **options)
        setup_tracing(app, settings.otlp_endpoint, settings.otlp_service_name)
        return app
    table = direct_routes(ROUTERS, DIRECT_PATHS)
    if settings.direct_routes:
        layers.append((DirectRoutes, {"table": table, "metrics": metrics}))
    inner: ASGIApp = app.framework
    for middleware, options in reversed(layers):
        inner = middleware(inner, **options)
    app.outer = inner
    if settings.direct_routes and not settings.cors_allow_origin:
        assert isinstance(inner, RequestObserver)
        app.lane = Lane({path.encode(): route for path, route in table.items()}, app, metrics, inner.record,
                        settings.payload_limit, settings.max_concurrent_requests,
                        tuple(b"Bearer " + key.encode() for key in keys), frozenset(settings.public_paths))
    return app
