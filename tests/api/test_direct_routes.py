"""The direct lane for hot POST routes answers exactly as the framework's router does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import DIRECT_PATHS, ROUTERS
from service.core.registry import ServedModel
from service.routes.direct import direct_routes
from tests.api.conftest import client_for, fake_model

EMBED = ["/embed", "/v1/embeddings", "/embeddings", "/similarity"]
# (path, body as JSON or raw bytes, extra headers): valid requests, validation errors, the framework's
# own edge cases (bad JSON, another content type, empty body), and errors raised inside handlers.
CASES: list[tuple[str, Any, dict[str, str]]] = [
    ("/embed", {"inputs": "hello world"}, {}),
    ("/embed", {"inputs": ["a", "b c"], "normalize": False, "dimensions": 8}, {}),
    ("/embed", {"inputs": [[101, 2000, 102]], "truncate": True}, {}),
    ("/embed", {"inputs": 5}, {}),
    ("/embed", {"inputs": []}, {}),
    ("/embed", {"inputs": "x", "prompt_name": "nope"}, {}),
    ("/embed", {"inputs": "x", "dimensions": 100000}, {}),
    ("/embed", {"inputs": "x"}, {"x-model": "missing"}),
    ("/embed", b'{"inputs": "unterminated', {}),
    ("/embed", b"", {}),
    ("/embed", b"inputs=hello", {"content-type": "application/x-www-form-urlencoded"}),
    ("/embed", {"inputs": "vendor json"}, {"content-type": "application/vnd.api+json"}),
    ("/v1/embeddings", {"model": "tiny-bge", "input": ["one", "two"]}, {}),
    ("/v1/embeddings", {"model": "tiny-bge", "input": "one", "encoding_format": "base64"}, {}),
    ("/v1/embeddings", {"model": "tiny-bge", "input": "one", "encoding_format": "bogus"}, {}),
    ("/v1/embeddings", {"input": "no model field"}, {}),
    ("/embeddings", {"model": "tiny-bge", "input": [[1, 2, 3]]}, {}),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["a", "b"]}}, {}),
    ("/similarity", {"inputs": {"source_sentence": "a", "sentences": []}}, {}),
    ("/rerank", {"query": "q", "texts": ["a", "b", "c"], "return_text": True}, {}),
    ("/rerank", {"query": "q", "documents": ["a", "b"], "top_n": 1, "return_documents": True}, {}),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": -1}, {}),
    ("/rerank", {"query": "", "texts": ["a"]}, {}),
    ("/rerank", [1, 2], {}),
    ("/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}], "top_n": 1}, {}),
    ("/v1/rerank", {"query": "q"}, {}),
    ("/v2/rerank", {"model": "tiny-reranker", "query": "q", "documents": ["a", "b"]}, {}),
    ("/predict", {"inputs": "a sentence"}, {}),
    ("/predict", {"inputs": [["a", "b"]]}, {}),
    ("/classify", {"input": ["a", "b"], "model": "tiny-classifier"}, {}),
    ("/classify", {"input": []}, {}),
]
HEADERS_COMPARED = ("content-type", "x-model", "x-compute-tokens", "x-compute-characters", "retry-after")


@pytest.fixture()
def models(bge_style_bundle: Path, cross_encoder_bundle: Path, classifier_bundle: Path) -> list[ServedModel]:
    return [fake_model(bge_style_bundle, "tiny-bge"), fake_model(cross_encoder_bundle, "tiny-reranker"),
            fake_model(classifier_bundle, "tiny-classifier")]


@pytest.fixture()
def both(models: list[ServedModel]) -> Iterator[tuple[TestClient, TestClient]]:
    with client_for(models, direct_routes=True) as direct, client_for(models, direct_routes=False) as framework:
        yield direct, framework


def send(client: TestClient, path: str, body: Any, headers: dict[str, str]) -> Any:
    if isinstance(body, bytes):
        headers = {"content-type": "application/json", **headers}
        return client.post(path, content=body, headers=headers)
    if "content-type" in headers:
        import json

        return client.post(path, content=json.dumps(body), headers=headers)
    return client.post(path, json=body, headers=headers)


def comparable(response: Any) -> Any:
    """The body, less what differs on every call anyway (OpenAI-style `id` and `created`)."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return response.content
    body = response.json()
    if isinstance(body, dict):
        body = {key: value for key, value in body.items() if key not in ("id", "created")}
    return body


@pytest.mark.parametrize(("path", "body", "headers"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_direct_lane_answers_exactly_as_the_framework(both: tuple[TestClient, TestClient], path: str, body: Any,
                                                       headers: dict[str, str]) -> None:
    direct, framework = both
    ours, theirs = send(direct, path, body, headers), send(framework, path, body, headers)
    assert ours.status_code == theirs.status_code, (ours.text, theirs.text)
    assert comparable(ours) == comparable(theirs)
    for name in HEADERS_COMPARED:
        assert ours.headers.get(name) == theirs.headers.get(name), name
    assert ours.headers["x-request-id"]


def test_every_hot_path_is_served_directly() -> None:
    table = direct_routes(ROUTERS, DIRECT_PATHS)
    assert sorted(table) == sorted(DIRECT_PATHS)
    assert table["/rerank"].body_model is None  # it tells TEI from Infinity by the body itself


def test_direct_lane_keeps_metrics_labels_and_error_counts(models: list[ServedModel]) -> None:
    with client_for(models) as client:
        assert client.post("/embed", json={"inputs": "a"}).status_code == 200
        assert client.post("/embed", json={"inputs": []}).status_code == 400
        assert client.post("/v2/rerank", json={"model": "nope", "query": "q", "documents": ["a"]}).status_code == 404
        text = client.get("/metrics").text
    assert 'embedrank_requests_total{model="tiny-bge",route="/embed",status="200"}' in text
    assert 'route="/embed",status="400"' in text
    assert 'route="/v2/rerank",status="404"' in text
    assert 'embedrank_errors_total{kind="Empty"}' in text
    assert 'embedrank_request_duration_seconds_count{phase="inference",route="/embed"}' in text


def test_direct_lane_enforces_the_payload_limit_on_streamed_bodies(models: list[ServedModel]) -> None:
    with client_for(models, payload_limit=1024) as client:
        def chunks() -> Iterator[bytes]:
            yield b'{"inputs": "'
            for _ in range(20):
                yield b"x" * 100
            yield b'"}'

        response = client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "1024-byte limit" in response.json()["error"]


def test_direct_lane_is_off_with_tracing() -> None:
    from service.app import BearerAuth, EarlyRefusal, PayloadLimit, RequestObserver, create_app
    from service.config import Settings
    from service.core.registry import ModelRegistry
    from service.routes.direct import DirectRoutes

    def layers(app: Any) -> list[type]:
        return list(app.layers())

    # In front of the framework, outermost first; the direct lane last, just before the framework.
    assert layers(create_app(Settings(api_key="k"), ModelRegistry([]))) == [
        RequestObserver, BearerAuth, EarlyRefusal, PayloadLimit, DirectRoutes]
    assert DirectRoutes not in layers(create_app(Settings(direct_routes=False), ModelRegistry([])))
    traced = create_app(Settings(otlp_endpoint="http://127.0.0.1:9"), ModelRegistry([]))
    assert layers(traced) == [RequestObserver, EarlyRefusal, PayloadLimit]  # inside the framework, traced
    assert traced.outer is None  # type: ignore[attr-defined]
    traced.state.tracer_provider.shutdown()



@pytest.mark.parametrize("direct", [True, False])
def test_direct_lane_bypasses_the_router_except_for_errors(models: list[ServedModel], direct: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The framework's route handling runs only when the lane is off, or for a body that fails validation."""
    from fastapi.routing import APIRoute

    handled: list[str] = []
    original = APIRoute.handle

    async def counting(self: APIRoute, scope: Any, receive: Any, send: Any) -> None:
        handled.append(self.path)
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", counting)
    with client_for(models, direct_routes=direct) as client:
        assert client.post("/embed", json={"inputs": "a"}).status_code == 200
        assert client.post("/v1/embeddings", json={"model": "tiny-bge", "input": "a"}).status_code == 200
        assert client.post("/rerank", json={"query": "q", "texts": ["a"]}).status_code == 200
        framework_before_error = list(handled)
        assert client.post("/embed", json={"inputs": 5}).status_code == 422
    if direct:
        assert framework_before_error == []
        assert handled == ["/embed"]  # the invalid body was handed to the framework for its error
    else:
        assert framework_before_error == ["/embed", "/v1/embeddings", "/rerank"]
