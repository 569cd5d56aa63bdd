"""Each surface driven by the client library its users use, against a real server with three models:
the real all-MiniLM-L6-v2, a tiny cross-encoder and a tiny 3-label classifier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.server import RunningServer, running_server

QUERY = "Where is Munich?"
DOCUMENTS = ["The sky is blue today.", "Munich is a city in the south of Germany.", "Bananas are yellow."]


@pytest.fixture(scope="module")
def server(minilm_bundle: Path, cross_encoder_bundle: Path, classifier_bundle: Path,
           work_dir: Path) -> Iterator[RunningServer]:
    args = ["--model-id", str(minilm_bundle), "--served-model-name", "all-MiniLM-L6-v2",
            "--model-id", str(cross_encoder_bundle), "--served-model-name", "tiny-reranker",
            "--model-id", str(classifier_bundle), "--served-model-name", "tiny-classifier"]
    with running_server(args, work_dir / "logs") as running:
        yield running


def test_cohere_sdk_v2_and_v1(server: RunningServer) -> None:
    import cohere

    v2 = cohere.ClientV2(api_key="unused", base_url=server.url)
    response = v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCUMENTS, top_n=2)
    assert len(response.results) == 2
    assert response.results[0].relevance_score >= response.results[1].relevance_score
    # The embedding model reranks by cosine: the Munich passage wins.
    by_embedding = v2.rerank(model="all-MiniLM-L6-v2", query=QUERY, documents=DOCUMENTS)
    assert by_embedding.results[0].index == 1
    v1 = cohere.Client(api_key="unused", base_url=server.url)
    legacy = v1.rerank(model="all-MiniLM-L6-v2", query=QUERY, documents=DOCUMENTS, return_documents=True, top_n=1)
    assert legacy.results[0].index == 1 and legacy.results[0].document is not None
    assert legacy.results[0].document.text == DOCUMENTS[1]
    with pytest.raises(cohere.core.api_error.ApiError) as refused:
        v2.rerank(model="no-such-model", query=QUERY, documents=DOCUMENTS)
    assert refused.value.status_code == 404


def test_infinity_client(server: RunningServer) -> None:
    from infinity_client import Client
    from infinity_client.api.default import classify, embeddings, models, rerank
    from infinity_client.models import ClassifyInput, OpenAIEmbeddingInputText, RerankInput

    client = Client(base_url=server.url)
    ranked = rerank.sync(client=client, body=RerankInput(query=QUERY, documents=DOCUMENTS, model="all-MiniLM-L6-v2",
                                                         top_n=2, return_documents=True))
    assert ranked is not None and len(ranked.results) == 2 and ranked.results[0].index == 1
    classified = classify.sync(client=client, body=ClassifyInput(input_=["I love it", "I hate it"],
                                                                 model="tiny-classifier"))
    assert classified is not None and len(classified.data) == 2
    assert {item.label for item in classified.data[0]} == {"negative", "neutral", "positive"}
    embedded = embeddings.sync(client=client, body=OpenAIEmbeddingInputText(input_=["hello", "world"],
                                                                            model="all-MiniLM-L6-v2"))
    assert embedded is not None and len(embedded.data) == 2 and len(embedded.data[0].embedding) == 384
    listed = models.sync(client=client)
    assert listed is not None and {model.id for model in listed.data} == {"all-MiniLM-L6-v2", "tiny-reranker",
                                                                          "tiny-classifier"}


def test_huggingface_hub_inference_client(server: RunningServer, minilm_source: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import InferenceClient, constants
    from huggingface_hub.utils import reset_sessions

    # The suite runs with HF_HUB_OFFLINE=1, which also blocks loopback; only this local server is called.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()

    vector = np.asarray(InferenceClient(model=server.url).feature_extraction("What is Deep Learning?"))
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_source), device="cpu").encode(["What is Deep Learning?"])[0]
    assert float(np.dot(vector.ravel(), reference) / np.linalg.norm(vector) / np.linalg.norm(reference)) >= 0.9999
    classifier = InferenceClient(model=server.url, headers={"X-Model": "tiny-classifier"})
    # TEI answers one input with a flat list; the client reads its first element: the best label.
    best = classifier.text_classification("I like it")
    best = best if hasattr(best, "label") else best[0]
    assert best.label in {"negative", "neutral", "positive"} and 0 < best.score <= 1
    monkeypatch.undo()
    reset_sessions()


def test_jina_request_shape(server: RunningServer) -> None:
    # Jina publishes no maintained client on PyPI; this is the request its API reference documents.
    body = {"model": "tiny-reranker", "query": QUERY, "top_n": 3, "return_documents": True,
            "documents": [{"text": DOCUMENTS[0]}, DOCUMENTS[1], DOCUMENTS[2]]}
    response = httpx.post(server.url + "/v1/rerank", json=body, timeout=30).json()
    assert response["model"] == "tiny-reranker" and response["usage"]["total_tokens"] > 0
    assert [set(result) for result in response["results"]] == [{"index", "relevance_score", "document"}] * 3
    assert response["results"][0]["document"]["text"] in DOCUMENTS
