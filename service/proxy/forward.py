"""Forward OpenAI generation requests to the configured upstream pools, streaming passed through.

A request picks its pool by `model`, then the member with the fewest outstanding requests. Only a
connection that could not be made is retried on another member: once bytes went upstream the model
may be generating, and a second try could bill or act twice. Streams are forwarded event by event as
they arrive; the client going away closes the upstream connection, which cancels the generation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import service
from service.deps import wait_for_disconnect
from service.errors import OPENAI_TYPE, STATUS, ApiError, ErrorKind
from service.observability import Metrics
from service.proxy.pool import Member, Pool
from service.proxy.upstreams import UpstreamConfigError, UpstreamSpec

if TYPE_CHECKING:
    import httpx

# httpx is imported where it is used, not here: only a server started with --llm needs it, and
# importing it (with its dependencies) is about a sixth of the server's import time.

logger = logging.getLogger("embedrank.proxy")

ROUTES = ("/chat/completions", "/completions")


@dataclass
class ProxySettings:
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    max_response_bytes: int = 64 * 1024 * 1024
    max_concurrent_requests: int = 1024
    health_check_seconds: float = 5.0


@dataclass
class Outcome:
    """What one forwarded request came to, for metrics and the log."""

    status: int = 0
    error: str | None = None
    first_byte: float | None = None
    usage: dict[str, Any] | None = None


class LlmProxy:
    def __init__(self, specs: list[UpstreamSpec], settings: ProxySettings, metrics: Metrics) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.served = {served: spec.name for spec in specs for served in (spec.name, *spec.aliases)}
        self.pools = {spec.name: Pool.of(spec.name, spec.urls) for spec in specs}
        self.settings = settings
        self.metrics = metrics
        self.keys: dict[str, str] = {}
        for spec in specs:
            if spec.api_key_env:
                key = os.environ.get(spec.api_key_env)
                if not key:
                    raise UpstreamConfigError(f"upstream {spec.name}: environment variable {spec.api_key_env} "
                                              "(its api_key_env) is not set")
                self.keys[spec.name] = key
        self.active = 0
        self.client: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None
        for spec in specs:
            for url in spec.urls:
                metrics.llm_up.labels(spec.name, url).set(1)

    # lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        import httpx
        limits = httpx.Limits(max_connections=self.settings.max_concurrent_requests + 16,
                              max_keepalive_connections=64)
        # trust_env=False: upstreams are called directly, never through HTTP(S)_PROXY from the environment
        self.client = httpx.AsyncClient(limits=limits, trust_env=False, follow_redirects=False,
                                        headers={"user-agent": f"embedrank/{service.__version__}"})
        self._health = asyncio.create_task(self._check_health_forever(), name="llm-health")

    async def stop(self) -> None:
        if self._health is not None:
            self._health.cancel()
        if self.client is not None:
            await self.client.aclose()

    # lookup ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self.specs)

    def resolve(self, model: object) -> UpstreamSpec:
        if model is None and len(self.specs) == 1:
            return next(iter(self.specs.values()))
        if not isinstance(model, str) or not model:
            raise ApiError(ErrorKind.VALIDATION, "`model` is required: the name of a generation model; served: "
                           f"{', '.join(self.specs) or 'none'}", param="model")
        name = self.served.get(model)
        if name is None:
            raise ApiError(ErrorKind.NOT_FOUND, f"model '{model}' is not a generation model served here; "
                           f"generation models: {', '.join(self.specs) or 'none (start with --llm NAME=URL)'}",
                           param="model")
        return self.specs[name]

    # forwarding ------------------------------------------------------------------------------

    async def forward(self, route: str, payload: dict[str, Any], request_id: str) -> Response:
        """Send `payload` to `route` (/chat/completions or /completions) of the model's pool."""
        import httpx
        if route not in ROUTES:
            raise ValueError(route)
        spec = self.resolve(payload.get("model"))
        if self.active >= self.settings.max_concurrent_requests:
            raise ApiError(ErrorKind.OVERLOADED, "too many generation requests in flight", retry_after=1)
        stream = payload.get("stream") is True
        content = orjson.dumps({**payload, "model": spec.model})
        headers = {"content-type": "application/json", "accept-encoding": "identity", "x-request-id": request_id,
                   "accept": "text/event-stream" if stream else "application/json"}
        if spec.name in self.keys:
            headers["authorization"] = f"Bearer {self.keys[spec.name]}"
        timeout = httpx.Timeout(connect=spec.connect_timeout or self.settings.connect_timeout,
                                read=spec.read_timeout or self.settings.read_timeout,
                                write=spec.read_timeout or self.settings.read_timeout,
                                pool=spec.connect_timeout or self.settings.connect_timeout)
        pool = self.pools[spec.name]
        started = time.perf_counter()
        self.active += 1
        member, response = await self._connect(pool, route, content, headers, timeout)
        finish = self._finisher(spec.name, member, started)
        try:
            if response.status_code >= 400:
                body = await self._read(response)
                finish(Outcome(response.status_code, f"upstream answered {response.status_code}"))
                return _upstream_error(response.status_code, body, spec.name)
            if stream and response.headers.get("content-type", "").startswith("text/event-stream"):
                return EventStream(response, finish, started, self.settings.max_response_bytes)
            body = await self._read(response)
        except ApiError as error:
            finish(Outcome(error.status, error.message))
            raise
        except BaseException:
            await response.aclose()
            finish(Outcome(499, "cancelled"))
            raise
        usage = _usage_of(body)
        finish(Outcome(response.status_code, None, None, usage))
        return Response(body, status_code=response.status_code,
                        media_type=response.headers.get("content-type", "application/json"))

    async def _connect(self, pool: Pool, route: str, content: bytes, headers: dict[str, str],
                       timeout: httpx.Timeout) -> tuple[Member, httpx.Response]:
        import httpx
        assert self.client is not None, "proxy not started"
        tried: set[str] = set()
        reasons: list[str] = []
        while True:
            member = pool.pick(tried)
            if member is None:
                self.active -= 1
                raise ApiError(ErrorKind.BAD_GATEWAY, f"upstream for '{pool.name}' is unreachable: "
                               f"{'; '.join(reasons)}")
            tried.add(member.url)
            request = self.client.build_request("POST", member.url + route, content=content, headers=headers,
                                                timeout=timeout)
            member.outstanding += 1
            try:
                return member, await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                # Nothing reached the upstream: safe to try another member.
                member.outstanding -= 1
                reason = f"{member.url}: {_describe(error)}"
                reasons.append(reason)
                if member.up:
                    logger.warning("upstream %s member %s is down: %s", pool.name, member.url, _describe(error))
                pool.mark_down(member, reason)
                self.metrics.llm_up.labels(pool.name, member.url).set(0)
                self.metrics.llm_errors.labels(pool.name, "connect").inc()
            except BaseException as error:
                member.outstanding -= 1
                self.active -= 1
                self.metrics.llm_requests.labels(pool.name, member.url, "error").inc()
                if isinstance(error, httpx.TimeoutException):
                    self.metrics.llm_errors.labels(pool.name, "timeout").inc()
                    raise ApiError(ErrorKind.GATEWAY_TIMEOUT, f"upstream '{pool.name}' did not answer within "
                                   f"{timeout.read:g} s") from None
                if isinstance(error, httpx.HTTPError):
                    self.metrics.llm_errors.labels(pool.name, "protocol").inc()
                    raise ApiError(ErrorKind.BAD_GATEWAY,
                                   f"upstream '{pool.name}' failed: {_describe(error)}") from None
                raise

    def _finisher(self, name: str, member: Member, started: float) -> Callable[[Outcome], None]:
        finished = False

        def finish(outcome: Outcome) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            member.outstanding -= 1
            self.active -= 1
            elapsed = time.perf_counter() - started
            self.metrics.llm_requests.labels(name, member.url, str(outcome.status)).inc()
            self.metrics.llm_seconds.labels(name).observe(elapsed)
            if outcome.first_byte is not None:
                self.metrics.llm_first_token.labels(name).observe(outcome.first_byte - started)
            if outcome.status >= 500:
                self.metrics.llm_errors.labels(name, "timeout" if outcome.status == 504 else "upstream").inc()
            if outcome.usage:
                for kind in ("prompt_tokens", "completion_tokens"):
                    value = outcome.usage.get(kind)
                    if isinstance(value, int) and value > 0:
                        self.metrics.llm_tokens.labels(name, kind.removesuffix("_tokens")).inc(value)
            # The access log already has one line per request; this one adds the upstream's side, at debug
            # level unless the upstream failed.
            level = logging.WARNING if outcome.status >= 500 else logging.DEBUG
            logger.log(level, "llm %s via %s: %s in %.1f ms%s", name, member.url, outcome.status, elapsed * 1000,
                        f" ({outcome.error})" if outcome.error else "",
                        extra={"fields": {"upstream": name, "url": member.url, "upstream_status": outcome.status,
                                          "upstream_ms": round(elapsed * 1000, 3), "error": outcome.error}})

        return finish

    async def _read(self, response: httpx.Response) -> bytes:
        import httpx
        parts = []
        size = 0
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.settings.max_response_bytes:
                    raise ApiError(ErrorKind.BAD_GATEWAY, f"upstream response is larger than the "
                                   f"{self.settings.max_response_bytes}-byte limit")
                parts.append(chunk)
        except httpx.TimeoutException:
            raise ApiError(ErrorKind.GATEWAY_TIMEOUT, "upstream stopped answering (read timeout)") from None
        except httpx.HTTPError as error:
            raise ApiError(ErrorKind.BAD_GATEWAY, f"upstream failed mid-response: {_describe(error)}") from None
        finally:
            await response.aclose()
        return b"".join(parts)

    async def _check_health_forever(self) -> None:
        """Probe members that are out (GET {url}/models); any answer below 500 puts them back."""
        while True:
            await asyncio.sleep(self.settings.health_check_seconds)
            for pool in self.pools.values():
                for member in pool.down():
                    await self._probe(pool, member)

    async def _probe(self, pool: Pool, member: Member) -> None:
        import httpx
        assert self.client is not None
        headers = {"authorization": f"Bearer {self.keys[pool.name]}"} if pool.name in self.keys else {}
        try:
            response = await self.client.get(member.url + "/models", headers=headers,
                                             timeout=self.settings.connect_timeout)
        except httpx.HTTPError:
            return
        if response.status_code < 500:
            logger.info("upstream %s member %s is back", pool.name, member.url)
            pool.mark_up(member)
            self.metrics.llm_up.labels(pool.name, member.url).set(1)


class EventStream(Response):
    """Server-sent events from the upstream to the client, one complete event at a time as they arrive
    (never split mid-event, so a failure can be reported as a clean error event). A client disconnect
    closes the upstream connection at once, which makes the upstream stop generating."""

    def __init__(self, upstream: httpx.Response, finish: Callable[[Outcome], None], started: float,
                 max_bytes: int) -> None:
        self.upstream = upstream
        self.finish = finish
        self.started = started
        self.max_bytes = max_bytes
        self.status_code = 200
        self.background = None
        # no Content-Length: the body is as long as the upstream makes it
        self.raw_headers = [(b"content-type", upstream.headers.get("content-type", "text/event-stream").encode()),
                            (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = Outcome(200)
        pump = asyncio.ensure_future(self._pump(send, outcome))
        watch = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                outcome.status, outcome.error = 499, "client disconnected"
        finally:
            for task in (pump, watch):
                task.cancel()
            results = await asyncio.gather(pump, watch, return_exceptions=True)
            await self.upstream.aclose()
            if isinstance(results[0], Exception):
                logger.error("stream forwarding failed", exc_info=results[0])
            self.finish(outcome)

    async def _pump(self, send: Send, outcome: Outcome) -> None:
        import httpx
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pending = b""
        total = 0
        try:
            try:
                async for chunk in self.upstream.aiter_raw():
                    if outcome.first_byte is None:
                        outcome.first_byte = time.perf_counter()
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise _StreamFailure(ErrorKind.BAD_GATEWAY, "upstream stream is larger than the "
                                             f"{self.max_bytes}-byte limit")
                    pending += chunk
                    end = _last_event_end(pending)
                    if end:
                        events, pending = pending[:end], pending[end:]
                        _scan_usage(events, outcome)
                        await send({"type": "http.response.body", "body": events, "more_body": True})
            except httpx.TimeoutException:
                raise _StreamFailure(ErrorKind.GATEWAY_TIMEOUT, "upstream stopped sending (read timeout)") from None
            except httpx.HTTPError as error:
                raise _StreamFailure(ErrorKind.BAD_GATEWAY,
                                     f"upstream connection broke mid-stream: {_describe(error)}") from None
            if pending:
                _scan_usage(pending, outcome)
            await send({"type": "http.response.body", "body": pending, "more_body": False})
        except _StreamFailure as failure:
            # The status line is gone already: report in-band as OpenAI-compatible servers do; an
            # unfinished event is dropped so the client never parses half a JSON object.
            outcome.status, outcome.error = STATUS[failure.kind], failure.message
            event = {"error": {"message": failure.message, "type": OPENAI_TYPE[failure.kind],
                               "param": None, "code": STATUS[failure.kind]}}
            await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(event) + b"\n\n",
                        "more_body": False})


class _StreamFailure(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _last_event_end(buffer: bytes) -> int:
    """Offset just past the last complete server-sent event (events end with a blank line; sse-starlette,
    used by several upstreams, ends lines with CRLF)."""
    return max(buffer.rfind(b"\n\n") + 2 if b"\n\n" in buffer else 0,
               buffer.rfind(b"\r\n\r\n") + 4 if b"\r\n\r\n" in buffer else 0)


def _scan_usage(events: bytes, outcome: Outcome) -> None:
    if b'"usage"' not in events:
        return
    for line in events.splitlines():
        if line.startswith(b"data:") and b'"usage"' in line:
            usage = _usage_of(line[5:].strip())
            if usage:
                outcome.usage = usage


def _usage_of(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) else None


def _upstream_error(status: int, body: bytes, name: str) -> Response:
    """An upstream 4xx goes back as it was (its OpenAI error body kept, anything else wrapped); a 5xx
    becomes 502 naming the upstream, with its message."""
    message = ""
    try:
        data = orjson.loads(body)
        if isinstance(data, dict):
            error = data.get("error")
            if isinstance(error, dict) and isinstance(error.get("message"), str):
                message = error["message"]
                if 400 <= status < 500:
                    return Response(body, status_code=status, media_type="application/json")
            elif isinstance(error, str):
                message = error
            elif isinstance(data.get("detail"), str):
                message = data["detail"]
    except orjson.JSONDecodeError:
        pass
    message = message or body[:500].decode("utf-8", "replace").strip() or f"HTTP {status}"
    if 400 <= status < 500:
        envelope = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}
        return Response(orjson.dumps(envelope), status_code=status, media_type="application/json")
    envelope = {"error": {"message": f"upstream '{name}' answered {status}: {message}", "type": "server_error",
                          "param": None, "code": 502}}
    return Response(orjson.dumps(envelope), status_code=502, media_type="application/json")


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 300 else text[:300] + "..."
