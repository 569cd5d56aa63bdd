"""Property-based fuzzing of every route from the server's own OpenAPI document (schemathesis):
no 5xx, no status or content type the document does not declare."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from service.app import create_app
from service.config import Settings
from service.core.registry import ModelRegistry
from tests.api.conftest import fake_model

CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]

@pytest.fixture(scope="module")
def fuzz_app(bge_style_bundle: Path, cross_encoder_bundle: Path, classifier_bundle: Path):  # type: ignore[no-untyped-def]
    models = [fake_model(bge_style_bundle, "tiny-bge"), fake_model(cross_encoder_bundle, "tiny-reranker"),
              fake_model(classifier_bundle, "tiny-classifier")]
    app = create_app(Settings(max_client_batch_size=16, log_requests=False), ModelRegistry(models))
    app.state.ready = True
    yield app
    for model in models:
        model.stop()


def _fuzz(operation, failures: list[object]) -> None:  # type: ignore[no-untyped-def]
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=operation.as_strategy())
    def check(case) -> None:  # type: ignore[no-untyped-def]
        response = case.call()
        if response.status_code >= 500:
            failures.append((operation.label, response.status_code, response.text[:200], case.body))
        else:
            # Semantic refusals of schema-valid input (an unknown prompt name, a non-positive
            # `dimensions`) are correct 4xx answers, so only the response itself is checked.
            case.validate_response(response, checks=CHECKS)

    check()


def test_openapi_fuzzing(fuzz_app) -> None:  # type: ignore[no-untyped-def]
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    failures: list[object] = []
    operations = 0
    for result in schema.get_all_operations():
        operations += 1
        _fuzz(result.ok(), failures)
    assert operations >= 15, "every route should be in the OpenAPI document"
    assert not failures, failures[:5]
