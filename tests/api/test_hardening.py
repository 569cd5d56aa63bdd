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
    for path in ("/health", "/ready"):
        head = client.head(path)
        assert head.status_code == 200 and head.content == b""
    client.app.state.ready = False  # type: ignore[attr-defined]
    assert client.get("/ready").status_code == 503
    assert client.head("/ready").status_code == 503
    assert client.get("/health").status_code == 200, "liveness holds while draining"


def test_access_log_line_has_id_and_no_input_text(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="embedrank.access"):
        response = client.post("/embed", json={"inputs": ["a very secret sentence", "b"]},
                               headers={"X-Request-ID": "abc"})
    assert "x-embedrank-items" not in response.headers  # internal: read by the access log, never sent
    records = [r for r in caplog.records if r.name == "embedrank.access"]
    assert records, "one access line per request"
    fields = records[-1].fields  # type: ignore[attr-defined]
    assert fields["status"] == 200 and fields["route"] == "/embed" and fields["model"] == "tiny-bge"
    assert fields["tokens"] > 0 and fields["items"] == 2
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


def test_oversized_batches_split_when_asked(embed_model: ServedModel) -> None:
    with client_for([embed_model], max_client_batch_size=4, split_oversized_batches=True) as client:
        texts = [f"text {index}" for index in range(40)]
        response = client.post("/embed", json={"inputs": texts})
        assert response.status_code == 200 and len(response.json()) == 40
        single = client.post("/embed", json={"inputs": texts[7]}).json()[0]
        assert response.json()[7] == pytest.approx(single, abs=1e-6)


def test_character_limit(embed_model: ServedModel) -> None:
    with client_for([embed_model], max_input_characters=100) as client:
        refused = client.post("/embed", json={"inputs": ["short", "x" * 101]})
        assert refused.status_code == 422 and "100 characters" in refused.json()["error"]
        assert client.post("/embed", json={"inputs": "x" * 100}).status_code == 200


def test_queue_deadline_drops_requests_that_waited_too_long(bge_style_bundle: Path) -> None:
    import asyncio

    import httpx

    from service.app import create_app
    from service.config import Settings
    from service.core.registry import ModelRegistry

    model = fake_model(bge_style_bundle, "slow", delay_seconds=0.4)
    app = create_app(Settings(queue_timeout_seconds=0.2, engine_workers=1, max_batch_requests=1),
                     ModelRegistry([model]))

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            return await asyncio.gather(*(client.post("/embed", json={"inputs": f"t{i}"}) for i in range(4)))

    responses = asyncio.run(scenario())
    model.stop()
    statuses = sorted(response.status_code for response in responses)
    assert statuses[0] == 200 and 429 in statuses
    dropped = next(response for response in responses if response.status_code == 429)
    assert "waited more than" in dropped.json()["error"]
    computed = sum(model.bundle.engine.batch_sizes)  # type: ignore[attr-defined]
    assert computed < 4, "dropped requests must not be computed"


def test_metrics_include_process_memory_and_phases(client: TestClient) -> None:
    client.post("/embed", json={"inputs": "a"})
    text = client.get("/metrics").text
    assert "process_resident_memory_bytes" in text
    assert 'embedrank_request_duration_seconds_count{phase="inference",route="/embed"}' in text
    assert 'embedrank_requests_total{model="tiny-bge",route="/embed",status="200"}' in text
