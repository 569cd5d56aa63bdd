"""The HTTP lane (service.lane): the protocol answers the hot routes itself, exactly as the full stack would.

Every test runs a real uvicorn server on loopback with embedrank's protocol and talks raw HTTP/1.x to it
over sockets, so pipelining, keep-alive and disconnects are the wire's own. Requests that reach the app's
middleware stack are counted at its entry (`app.outer`), which tells the lane's answers from the app's.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from service.app import create_app
from service.config import Settings
from service.core.registry import ModelRegistry, ServedModel
from service.lane import Lane
from service.server import server_config
from tests.api.conftest import fake_model
from tests.api.test_direct_routes import CASES
from tests.helpers.server import free_port

# What differs between two answers to the same request anyway.
VARYING_HEADERS = {"date", "x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"}


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    def comparable(self) -> Any:
        """The body, less what differs on every call anyway (OpenAI-style `id` and `created`)."""
        if not (self.header("content-type") or "").startswith("application/json"):
            return self.body
        body = json.loads(self.body)
        if isinstance(body, dict):
            body = {key: value for key, value in body.items() if key not in ("id", "created")}
        return body


class Connection:
    """One raw HTTP/1.x connection to the server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""

    def send(self, *requests: bytes) -> None:
        self.sock.sendall(b"".join(requests))

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def reply(self) -> Reply:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-answer: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = [(name.lower(), value.strip()) for name, value in (line.split(":", 1) for line in lines)]
        length = int(next(value for name, value in headers if name == "content-length"))
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(int(status_line.split()[1]), headers, body)

    def closed_by_server(self) -> bool:
        """True when the server closes the connection with nothing more to say."""
        return not self.buffer and not self._fill()

    def close(self) -> None:
        self.sock.close()


def post(path: str, body: Any, headers: dict[str, str] | None = None, version: str = "1.1") -> bytes:
    """A raw POST as a JSON client sends it: a dict goes as JSON, bytes as they are."""
    headers = dict(headers or {})
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers.setdefault("content-type", "application/json")
    lines = [f"POST {path} HTTP/{version}", "host: 127.0.0.1", f"content-length: {len(payload)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + payload


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode()


@dataclass
class Served:
    app: Any
    port: int
    server: uvicorn.Server
    to_app: list[str] = field(default_factory=list)  # the paths of requests the app's middleware stack saw

    def ask(self, request: bytes) -> Reply:
        connection = Connection(self.port)
        try:
            connection.send(request)
            return connection.reply()
        finally:
            connection.close()


@contextmanager
def serving(models: list[ServedModel], configure: Any = None, **options: Any) -> Iterator[Served]:
    """A real uvicorn server on 127.0.0.1 with embedrank's protocol, in a thread of this process."""
    settings = Settings(hostname="127.0.0.1", port=free_port(), **options)
    app = create_app(settings, ModelRegistry(models))
    config = server_config(app, settings)
    if configure is not None:
        configure(config)
    served = Served(app, settings.port, uvicorn.Server(config))
    outer = app.outer  # type: ignore[attr-defined]

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        served.to_app.append(scope["path"])
        await outer(scope, receive, send)

    app.outer = counted  # type: ignore[attr-defined]
    thread = threading.Thread(target=served.server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not served.server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield served
    finally:
        served.server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def pair(bge_style_bundle: Path, cross_encoder_bundle: Path,
         classifier_bundle: Path) -> Iterator[tuple[Served, Served]]:
    """The lane on, and the same app with the lane off (its direct routes answered by the ASGI stack)."""
    def models() -> list[ServedModel]:
        return [fake_model(bge_style_bundle, "tiny-bge"), fake_model(cross_encoder_bundle, "tiny-reranker"),
                fake_model(classifier_bundle, "tiny-classifier")]

    with serving(models(), log_requests=False) as lane, \
            serving(models(), log_requests=False) as stack:
        stack.app.lane = None
        yield lane, stack


@pytest.fixture()
def embed_models(bge_style_bundle: Path) -> list[ServedModel]:
    return [fake_model(bge_style_bundle, "tiny-bge")]


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def headers_of(reply: Reply) -> list[tuple[str, str]]:
    return [(name, value) for name, value in reply.headers if name not in VARYING_HEADERS]


@pytest.mark.parametrize(("path", "body", "headers"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_the_lane_answers_as_the_app_does(pair: tuple[Served, Served], path: str, body: Any,
                                                   headers: dict[str, str]) -> None:
    lane, stack = pair
    request = post(path, body, {**headers, "x-request-id": "case-id"})
    lane.to_app.clear()
    ours, theirs = lane.ask(request), stack.ask(request)
    assert (ours.status, ours.comparable()) == (theirs.status, theirs.comparable()), (ours.body, theirs.body)
    assert headers_of(ours) == headers_of(theirs)  # the same headers, in the same order
    assert stack.to_app == [path] * len(stack.to_app) and stack.to_app
    stack.to_app.clear()
    # The lane hands over only what the framework words: a body its route's model rejects, another content type.
    route = lane.app.lane.routes[path.encode()]
    content_type = headers.get("content-type", "application/json")
    rejected = content_type != "application/json" and not content_type.endswith("+json")
    if route.body_model is not None and not rejected:
        try:
            route.body_model.model_validate_json(body if isinstance(body, bytes) else json.dumps(body))
        except ValueError:
            rejected = True
    assert lane.to_app == ([path] if rejected else [])


def test_pipelined_requests_are_answered_in_order_on_a_kept_connection(pair: tuple[Served, Served]) -> None:
    lane, _ = pair
    connection = Connection(lane.port)
    try:
        connection.send(post("/embed", {"inputs": "one"}), get("/health"), post("/embed", {"inputs": 5}),
                        post("/v1/embeddings", {"model": "tiny-bge", "input": "two"}))
        replies = [connection.reply() for _ in range(4)]
        assert [reply.status for reply in replies] == [200, 200, 422, 200]
        assert replies[0].body == lane.ask(post("/embed", {"inputs": "one"})).body
        assert json.loads(replies[3].body)["data"][0]["embedding"]
        # The connection is kept: a lane request after the pipeline, then one that asks to close it.
        connection.send(post("/embed", {"inputs": "three"}))
        third = connection.reply()
        assert third.status == 200 and third.header("connection") is None
        connection.send(post("/embed", {"inputs": "last"}, {"connection": "close"}))
        last = connection.reply()
        assert last.status == 200 and last.header("connection") == "close"
        assert connection.closed_by_server()
    finally:
        connection.close()


def test_http_1_0_is_answered_and_closed_as_the_app_does(pair: tuple[Served, Served]) -> None:
    replies = []
    for served in pair:  # the lane, then the app
        connection = Connection(served.port)
        connection.send(post("/embed", {"inputs": "old client"}, {"x-request-id": "old"}, version="1.0"))
        replies.append(connection.reply())
        assert connection.closed_by_server()
        connection.close()
    assert replies[0].body == replies[1].body and headers_of(replies[0]) == headers_of(replies[1])
    assert replies[0].header("connection") == "close"


def test_api_keys_are_checked_before_the_lane_answers(embed_models: list[ServedModel]) -> None:
    with serving(embed_models, api_key="sesame") as served:
        assert served.ask(post("/embed", {"inputs": "a"})).status == 401
        assert served.ask(post("/embed", {"inputs": "a"}, {"authorization": "Bearer wrong"})).status == 401
        assert served.to_app == ["/embed", "/embed"]  # refused by the app's own layer, in its own words
        refused = served.ask(post("/v1/embeddings", {"model": "tiny-bge", "input": "a"}))
        assert refused.status == 401 and "API key" in json.loads(refused.body)["error"]["message"]
        served.to_app.clear()
        assert served.ask(post("/embed", {"inputs": "a"}, {"authorization": "Bearer sesame"})).status == 200
        assert served.to_app == []


def test_an_oversized_body_gets_the_apps_413(embed_models: list[ServedModel]) -> None:
    with serving(embed_models, payload_limit=1024) as served:
        reply = served.ask(post("/embed", {"inputs": "x" * 2000}))
        assert reply.status == 413 and "1024-byte limit" in json.loads(reply.body)["error"]
        assert served.to_app == ["/embed"]
        assert served.ask(post("/embed", {"inputs": "x" * 900})).status == 200
        assert served.to_app == ["/embed"]


def test_an_overloaded_model_refuses_early_through_the_app(bge_style_bundle: Path) -> None:
    model = fake_model(bge_style_bundle, "tiny-bge", delay_seconds=0.6)
    with serving([model], max_concurrent_requests=1, inline_pass_tokens=0) as served:
        busy = Connection(served.port)
        try:
            busy.send(post("/embed", {"inputs": "slow"}))
            until(lambda: model.in_flight >= 1)
            refused = served.ask(post("/embed", {"inputs": "refused"}))
            assert refused.status == 429 and refused.header("retry-after") == "1"
            assert served.to_app == ["/embed"]
            assert busy.reply().status == 200
        finally:
            busy.close()


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "app"])
def test_a_client_that_leaves_has_its_queued_items_dropped(bge_style_bundle: Path, lane: bool) -> None:
    model = fake_model(bge_style_bundle, "tiny-bge", delay_seconds=0.8)
    engine: Any = model.bundle.engine
    with serving([model], warmup=False, engine_workers=1, inline_pass_tokens=0) as served:  # one pass at a time,
        # on a worker (an inline pass holds the loop)
        if not lane:
            served.app.lane = None
        first = Connection(served.port)
        leaving = Connection(served.port)
        try:
            before = len(engine.batch_sizes)
            first.send(post("/embed", {"inputs": "computed"}))
            until(lambda: len(engine.batch_sizes) > before)  # its batch is running now
            leaving.send(post("/embed", {"inputs": "never computed"}))
            time.sleep(0.2)  # queued behind the running batch, past the disconnect watch's start
            leaving.close()
            assert first.reply().status == 200
            time.sleep(1.0)  # long enough for a second batch to have run
            assert engine.batch_sizes[before:] == [1]
            metrics = served.ask(get("/metrics")).body.decode()
            assert 'embedrank_errors_total{kind="Cancelled"} 1.0' in metrics
            assert 'embedrank_requests_total{model="",route="/embed",status="499"} 1.0' in metrics
        finally:
            first.close()
    assert served.to_app == (["/metrics"] if lane else ["/embed", "/embed", "/metrics"])


def test_metrics_access_log_and_request_ids(embed_models: list[ServedModel], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embedrank.access")
    with serving(embed_models, log_requests=True) as served:
        given = served.ask(post("/embed", {"inputs": "a"}, {"x-request-id": "client-chosen-7"}))
        made = [served.ask(post("/embed", {"inputs": "b"})) for _ in range(2)]
        assert given.header("x-request-id") == "client-chosen-7"
        ids = [reply.header("x-request-id") for reply in made]
        assert all(ids) and ids[0] != ids[1]
        assert served.ask(post("/embed", {"inputs": []})).status == 400  # raised in the handler
        metrics = served.ask(get("/metrics")).body.decode()
        assert served.to_app == ["/metrics"]
    assert 'embedrank_requests_total{model="tiny-bge",route="/embed",status="200"} 3.0' in metrics
    assert 'route="/embed",status="400"' in metrics
    assert 'embedrank_request_duration_seconds_count{phase="inference",route="/embed"} 3.0' in metrics
    lines = [record.getMessage() for record in caplog.records if record.name == "embedrank.access"]
    assert len([line for line in lines if line.startswith("POST /embed 200 ")]) == 3
    assert any(line.startswith("POST /embed 400 ") for line in lines)


def test_shutdown_lets_an_answer_in_flight_finish_and_closes_its_connection(bge_style_bundle: Path) -> None:
    model = fake_model(bge_style_bundle, "tiny-bge", delay_seconds=0.5)
    with serving([model], warmup=False, inline_pass_tokens=0) as served:
        connection = Connection(served.port)
        try:
            connection.send(post("/embed", {"inputs": "in flight"}))
            until(lambda: model.in_flight >= 1)
            served.server.should_exit = True
            reply = connection.reply()
            assert reply.status == 200 and reply.header("connection") == "close"
            assert connection.closed_by_server()
        finally:
            connection.close()


def test_the_lane_is_off_where_the_app_must_see_every_request(embed_models: list[ServedModel],
                                                             bge_style_bundle: Path) -> None:
    assert isinstance(create_app(Settings(), ModelRegistry([])).lane, Lane)  # type: ignore[attr-defined]
    assert create_app(Settings(direct_routes=False), ModelRegistry([])).lane is None  # type: ignore[attr-defined]
    assert create_app(Settings(cors_allow_origin=["*"]), ModelRegistry([])).lane is None  # type: ignore[attr-defined]
    traced = create_app(Settings(otlp_endpoint="http://127.0.0.1:9"), ModelRegistry([]))
    assert traced.lane is None  # type: ignore[attr-defined]
    traced.state.tracer_provider.shutdown()
    with serving(embed_models, cors_allow_origin=["https://app.example"]) as served:
        reply = served.ask(post("/embed", {"inputs": "a"}, {"origin": "https://app.example"}))
        assert reply.status == 200 and reply.header("access-control-allow-origin") == "https://app.example"
        assert served.to_app == ["/embed"]

    def limited(config: Any) -> None:
        config.limit_concurrency = 100  # uvicorn's own admission sees every request

    with serving([fake_model(bge_style_bundle, "tiny-bge")], configure=limited) as served:
        assert served.ask(post("/embed", {"inputs": "a"})).status == 200
        assert served.to_app == ["/embed"]


def test_requests_the_lane_does_not_take_go_to_the_app(pair: tuple[Served, Served]) -> None:
    lane, _ = pair
    lane.to_app.clear()
    assert lane.ask(post("/embed?x=1", {"inputs": "a"})).status == 200  # a query string
    chunked = (b"POST /embed HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"transfer-encoding: chunked\r\n\r\n10\r\n{\"inputs\": \"ab\"}\r\n0\r\n\r\n")
    assert lane.ask(chunked).status == 200
    expect = post("/embed", {"inputs": "a"}, {"expect": "100-continue"})
    connection = Connection(lane.port)
    try:
        head, body = expect.split(b"\r\n\r\n", 1)
        connection.send(head + b"\r\n\r\n")
        assert connection.sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        connection.send(body)
        assert connection.reply().status == 200
    finally:
        connection.close()
    assert lane.to_app == ["/embed"] * 3


def test_a_request_that_arrives_in_pieces_is_answered_by_the_lane(pair: tuple[Served, Served]) -> None:
    lane, _ = pair
    request = post("/v1/embeddings", {"model": "tiny-bge", "input": ["split", "across", "segments"]})
    whole = lane.ask(request)
    lane.to_app.clear()
    connection = Connection(lane.port)
    try:
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 7):  # headers and body cut every 7 bytes, sent one by one
            connection.send(request[start:start + 7])
            time.sleep(0.002)
        pieced = connection.reply()
    finally:
        connection.close()
    assert pieced.status == 200 and pieced.comparable() == whole.comparable()
    assert lane.to_app == []
