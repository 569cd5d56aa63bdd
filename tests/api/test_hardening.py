"""Request ids, readiness, CORS, access logs, and a campaign of bad inputs on every route."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.core.registry import ServedModel
from tests.api.conftest import client_for, fake_model


def test_request_ids_are_echoed_or_made(client: TestClient) -> None:
    given = client.post("/embed", json={"inputs": "a"}, headers={"X-Request-ID": "trace-123"})
    assert given.headers["x-request-id"] == "trace-123" and given.headers["x-model"] == "tiny-bge"
    made = client.post("/embed", json={"inputs": "a"})
    assert len(made.headers["x-request-id"]) == 32
    assert made.headers["x-request-id"] != client.post("/embed", json={"inputs": "a"}).headers["x-request-id"]
    assert client.get("/health").headers["x-request-id"]


def test_ready_and_health(client: TestClient) -> None:
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "models": ["tiny-bge"]}
    client.app.state.ready = False  # type: ignore[attr-defined]
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200, "liveness holds while draining"


def test_access_log_line_has_id_and_no_input_text(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="embedrank.access"):
        client.post("/embed", json={"inputs": "a very secret sentence"}, headers={"X-Request-ID": "abc"})
    records = [r for r in caplog.records if r.name == "embedrank.access"]
    assert records, "one access line per request"
    fields = records[-1].fields  # type: ignore[attr-defined]
    assert fields["status"] == 200 and fields["route"] == "/embed" and fields["model"] == "tiny-bge"
    assert fields["tokens"] > 0
    assert all("secret" not in record.getMessage() for record in caplog.records)


def test_cors(embed_model: ServedModel) -> None:
    with client_for([embed_model], cors_allow_origin=["https://app.example"]) as client:
        preflight = client.options("/embed", headers={"Origin": "https://app.example",
                                                      "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        other = client.post("/embed", json={"inputs": "a"}, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


ROUTES = ["/embed", "/v1/embeddings", "/rerank", "/v2/rerank", "/v1/rerank", "/predict", "/classify",
          "/similarity", "/tokenize", "/decode", "/embed_all"]
BAD_BODIES: list[object] = [
    {}, [], "just a string", 42, None, {"inputs": None}, {"inputs": {"a": 1}}, {"input": [[1.5]]},
    {"inputs": [1, "mixed", None]}, {"query": 5, "texts": "no"}, {"query": "q", "documents": [None]},
    {"inputs": "x", "dimensions": -1}, {"inputs": "x", "dimensions": 10**12}, {"input": "x", "dimensions": "big"},
    {"query": "q", "documents": ["a"], "top_n": -3}, {"query": "q", "documents": ["a"], "top_n": 10**18},
    {"inputs": [-1, 5]}, {"ids": [-5]}, {"inputs": ""}, {"input": ""}, {"inputs": "   "}, {"texts": [], "query": ""},
    {"inputs": {"source_sentence": 1, "sentences": "x"}}, {"inputs": "x", "truncation_direction": "up"},
    {"inputs": [[]]}, {"ids": []},
]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture(scope="module")
def campaign_client(bge_style_bundle: Path, cross_encoder_bundle: Path, classifier_bundle: Path):  # type: ignore[no-untyped-def]
    models = [fake_model(bge_style_bundle, "tiny-bge"), fake_model(cross_encoder_bundle, "tiny-reranker"),
              fake_model(classifier_bundle, "tiny-classifier")]
    with client_for(models, max_client_batch_size=64, payload_limit=200_000) as client:
        yield client


def _envelope_ok(route: str, response: object) -> None:
    body = response.json()  # type: ignore[attr-defined]
    if route in ("/v2/rerank", "/v1/rerank"):
        assert isinstance(body.get("message"), str), body
    elif route in ("/v1/embeddings", "/classify") or (route == "/rerank" and isinstance(body.get("error"), dict)):
        assert isinstance(body["error"]["message"], str), body
    else:
        assert isinstance(body["error"], str) and isinstance(body["error_type"], str), body


@pytest.mark.parametrize("route", ROUTES)
def test_bad_json_bodies_get_4xx_in_the_surface_format(campaign_client: TestClient, route: str) -> None:
    for body in BAD_BODIES:
        response = campaign_client.post(route, json=body)
        if response.status_code == 200:
            continue  # some bodies are valid for some routes (e.g. {"inputs": "   "} embeds whitespace)
        assert 400 <= response.status_code < 500, (route, body, response.status_code, response.text)
        _envelope_ok(route, response)
    raw_cases = [b'{"inputs": "x"', b"\xff\xfe\x00bad", b"", _nested(5000).encode(), b'{"inputs": "\\ud800"}',
                 b'{"inputs": "a\\u0000b", "query": "\\u0000", "texts": ["\\u0000"]}']
    for raw in raw_cases:
        response = campaign_client.post(route, content=raw, headers={"content-type": "application/json"})
        assert response.status_code < 500, (route, raw[:40], response.status_code, response.text)
    wrong_type = campaign_client.post(route, content=b"inputs=x", headers={"content-type": "text/plain"})
    assert 400 <= wrong_type.status_code < 500, (route, wrong_type.text)
    too_big = campaign_client.post(route, json={"inputs": "x" * 300_000})
    assert too_big.status_code == 413
    assert campaign_client.post("/embed", json={"inputs": "still healthy"}).status_code == 200


def test_hostile_but_valid_text(campaign_client: TestClient) -> None:
    texts = ["😀🚀 emoji", "مرحبا بالعالم", "עברית", "中文和日本語", "a\u0000b", "x" * (200_000 // 4),
             "\u200b\u200e\ufeff", "   "]
    response = campaign_client.post("/embed", json={"inputs": texts})
    assert response.status_code == 200 and len(response.json()) == len(texts)
    many = campaign_client.post("/embed", content=json.dumps({"inputs": ["a"] * 1_000}).encode(),
                                headers={"content-type": "application/json"})
    assert many.status_code == 422 and "maximum allowed batch size" in many.json()["error"]
