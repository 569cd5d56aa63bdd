"""API tests: the real app in-process, real tokenizers from tiny bundles, a deterministic FakeEngine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.core.manifest import load_manifest
from service.core.registry import ModelRegistry, ServedModel
from service.engines.bundle import BundleModel
from service.engines.fake import FakeEngine


def fake_model(bundle_dir: Path, name: str | None = None, **engine_options: object) -> ServedModel:
    manifest = load_manifest(bundle_dir)
    labels = len(manifest.labels) if manifest.task != "embed" else 0
    engine = FakeEngine(manifest.hidden_size, labels=labels, **engine_options)  # type: ignore[arg-type]
    bundle = BundleModel(bundle_dir, manifest=manifest, engine=engine)
    return ServedModel(name=name or manifest.name, bundle=bundle, variant="float32", device="cpu")


@pytest.fixture()
def embed_model(bge_style_bundle: Path) -> ServedModel:
    return fake_model(bge_style_bundle, "tiny-bge")


def client_for(models: list[ServedModel], **settings: object) -> TestClient:
    app = create_app(Settings(**settings), ModelRegistry(models))  # type: ignore[arg-type]
    return TestClient(app)


@pytest.fixture()
def client(embed_model: ServedModel) -> Iterator[TestClient]:
    with client_for([embed_model]) as test_client:
        yield test_client
