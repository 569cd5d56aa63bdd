"""Rerank and classify on every surface, in-process, with the real tiny ONNX bundles."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.core.registry import ModelRegistry, ServedModel
from service.engines.bundle import BundleModel
from tests.api.conftest import client_for, fake_model

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital and most populous city of france.", "the quick brown fox.", "deep learning",
             "interest rates rose sharply."]


def real_model(bundle: Path, name: str) -> ServedModel:
    return ServedModel(name=name, bundle=BundleModel(bundle), variant="float32", device="cpu")


@pytest.fixture()
def reranker(cross_encoder_bundle: Path) -> ServedModel:
    return real_model(cross_encoder_bundle, "tiny-reranker")


@pytest.fixture()
def classifier(classifier_bundle: Path) -> ServedModel:
    return real_model(classifier_bundle, "tiny-classifier")


def torch_logits(source: Path, pairs: list[tuple[str, str]] | list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model = AutoModelForSequenceClassification.from_pretrained(str(source)).eval()
    with torch.inference_mode():
        if isinstance(pairs[0], tuple):
            encoded = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True, truncation=True,
                                return_tensors="pt")
        else:
            encoded = tokenizer(pairs, padding=True, truncation=True, return_tensors="pt")
        return model(**encoded).logits.numpy()


def test_tei_rerank_scores_equal_the_source_model(reranker: ServedModel, cross_encoder_source: Path) -> None:
    expected = 1 / (1 + np.exp(-torch_logits(cross_encoder_source, [(QUERY, d) for d in DOCUMENTS])[:, 0]))
    with client_for([reranker]) as client:
        ranked = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True}).json()
        assert [item["index"] for item in ranked] == list(np.argsort(-expected, kind="stable"))
        for item in ranked:
            assert item["score"] == pytest.approx(float(expected[item["index"]]), abs=1e-4)
            assert item["text"] == DOCUMENTS[item["index"]]
        raw = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
        assert {item["index"]: item["score"] for item in raw}[0] == pytest.approx(
            float(np.log(expected[0] / (1 - expected[0]))), abs=1e-3)
        assert "text" not in raw[0]
        empty = client.post("/rerank", json={"query": QUERY, "texts": []})
        assert (empty.status_code, empty.json()) == (400, {"error": "`texts` cannot be empty", "error_type": "Empty"})


def test_infinity_rerank_and_top_n_edges(reranker: ServedModel) -> None:
    with client_for([reranker]) as client:
        body = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 2,
                                            "return_documents": True}).json()
        assert body["object"] == "rerank" and body["model"] == "tiny-reranker"
        assert len(body["results"]) == 2 and body["results"][0]["relevance_score"] >= body["results"][1][
            "relevance_score"]
        assert body["results"][0]["document"] == DOCUMENTS[body["results"][0]["index"]]
        assert body["id"].startswith("infinity-") and body["usage"]["total_tokens"] > 0
        larger = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": 99}).json()
        assert len(larger["results"]) == len(DOCUMENTS) and "document" not in larger["results"][0]
        for bad in (0, -1):
            refused = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": bad})
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "top_n"
        wrong = client.post("/rerank", json={"query": QUERY, "documents": "not a list"})
        assert wrong.status_code == 422 and "error" in wrong.json() and "message" in wrong.json()["error"]


def test_cohere_and_jina_shapes(reranker: ServedModel) -> None:
    with client_for([reranker]) as client:
        v2 = client.post("/v2/rerank", json={"model": "tiny-reranker", "query": QUERY, "documents": DOCUMENTS,
                                             "top_n": 3}).json()
        assert len(v2["results"]) == 3 and set(v2["results"][0]) == {"index", "relevance_score"}
        assert v2["meta"]["api_version"]["version"] == "2" and v2["meta"]["billed_units"]["search_units"] == 1
        v1 = client.post("/v1/rerank", json={"model": "tiny-reranker", "query": QUERY, "return_documents": True,
                                             "documents": [{"text": DOCUMENTS[0]}, DOCUMENTS[1]]}).json()
        assert v1["results"][0]["document"]["text"] in DOCUMENTS[:2]
        assert v1["model"] == "tiny-reranker" and v1["usage"]["total_tokens"] > 0  # what Jina clients read
        cut = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS, "max_tokens_per_doc": 2}).json()
        assert cut["truncated_documents"] == 3 and "truncated" in cut["meta"]["warnings"][0]
        refused = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCUMENTS, "top_n": -5})
        assert refused.status_code == 422 and "top_n" in refused.json()["message"]


def test_long_documents_are_truncated_and_counted(reranker: ServedModel) -> None:
    with client_for([reranker]) as client:
        response = client.post("/rerank", json={"query": QUERY, "texts": ["the " * 400, "paris"]})
        assert response.status_code == 200 and response.headers["x-truncated-inputs"] == "1"
        refused = client.post("/rerank", json={"query": QUERY, "texts": ["the " * 400], "truncate": False})
        assert refused.status_code == 422


def test_predict_single_pair_batch(classifier: ServedModel, classifier_source: Path) -> None:
    with client_for([classifier]) as client:
        single = client.post("/predict", json={"inputs": "paris is the capital"}).json()
        assert [p["label"] for p in single] != [] and {p["label"] for p in single} == {"negative", "neutral",
                                                                                       "positive"}
        assert sum(p["score"] for p in single) == pytest.approx(1.0, abs=1e-5)
        assert [p["score"] for p in single] == sorted((p["score"] for p in single), reverse=True)
        expected = torch_logits(classifier_source, ["paris is the capital"])[0]
        probabilities = np.exp(expected) / np.exp(expected).sum()
        assert {p["label"]: p["score"] for p in single}["positive"] == pytest.approx(float(probabilities[2]),
                                                                                       abs=1e-4)
        pair = client.post("/predict", json={"inputs": ["the capital", "of france"]}).json()
        assert isinstance(pair[0], dict)
        batch = client.post("/predict", json={"inputs": [["a"], ["b", "c"], ["d"]]}).json()
        assert len(batch) == 3 and isinstance(batch[0], list)
        three = client.post("/predict", json={"inputs": ["a", "b", "c"]}).json()
        assert len(three) == 3
        raw = client.post("/predict", json={"inputs": "x", "raw_scores": True}).json()
        assert {p["label"]: p["score"] for p in raw}["negative"] == pytest.approx(
            float(torch_logits(classifier_source, ["x"])[0][0]), abs=1e-4)
        bad = client.post("/predict", json={"inputs": [["a", "b", "c"]]})
        assert bad.status_code == 422 and bad.json()["error_type"] == "Validation"


def test_infinity_classify(classifier: ServedModel) -> None:
    with client_for([classifier]) as client:
        body = client.post("/classify", json={"input": ["good", "bad"]}).json()
        assert body["object"] == "classify" and len(body["data"]) == 2
        assert {item["label"] for item in body["data"][0]} == {"negative", "neutral", "positive"}


def test_several_models_choose_by_name_and_task(reranker: ServedModel, classifier: ServedModel,
                                                bge_style_bundle: Path) -> None:
    embedder = fake_model(bge_style_bundle, "embedder")
    with client_for([embedder, reranker, classifier]) as client:
        listed = client.get("/v1/models").json()["data"]
        assert {m["id"]: m["capabilities"] for m in listed} == {
            "embedder": ["embed", "rerank"], "tiny-reranker": ["rerank", "classify"], "tiny-classifier": ["classify"]}
        assert [m["id"] for m in client.get("/models").json()["data"]] == ["embedder", "tiny-reranker",
                                                                           "tiny-classifier"]
        # No model named: the cross-encoder reranks, not the embedder.
        body = client.post("/rerank", json={"query": QUERY, "documents": DOCUMENTS}).json()
        assert body["model"] == "tiny-reranker"
        by_embedder = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS},
                                  headers={"x-model": "embedder"}).json()
        assert all(-1.0 <= item["score"] <= 1.0 for item in by_embedder)
        assert client.post("/embed", json={"inputs": "a"}).status_code == 200
        wrong = client.post("/predict", json={"inputs": "a"}, headers={"x-model": "embedder"})
        assert wrong.status_code == 424 and wrong.json()["error_type"] == "Backend"
        unknown = client.post("/v2/rerank", json={"model": "nope", "query": QUERY, "documents": DOCUMENTS})
        assert unknown.status_code == 404 and "tiny-reranker" in unknown.json()["message"]
        unknown_infinity = client.post("/classify", json={"model": "nope", "input": ["a"]})
        assert unknown_infinity.status_code == 404 and "embedder" in unknown_infinity.json()["error"]["message"]
        wrong_model_task = client.post("/v1/embeddings", json={"model": "tiny-classifier", "input": "a"})
        assert wrong_model_task.status_code == 424


def test_only_a_reranker_served(reranker: ServedModel) -> None:
    with client_for([reranker]) as client:
        refused = client.post("/embed", json={"inputs": "a"})
        assert refused.status_code == 424 and "embed" in refused.json()["error"]
        assert client.get("/info").json()["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"},
                                                                         "label2id": {"LABEL_0": 0}}}


def test_concurrent_rerank_requests_share_batches(cross_encoder_bundle: Path) -> None:
    model = fake_model(cross_encoder_bundle, "tiny-reranker", delay_seconds=0.02)
    app = create_app(Settings(engine_workers=1), ModelRegistry([model]))

    async def scenario() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            responses = await asyncio.gather(*(client.post("/rerank", json={"query": f"q{i}", "texts": DOCUMENTS})
                                               for i in range(12)))
        assert all(response.status_code == 200 for response in responses)
        return list(model.bundle.engine.batch_sizes)  # type: ignore[attr-defined]

    sizes = asyncio.run(scenario())
    model.stop()
    assert max(sizes) > len(DOCUMENTS), sizes
    assert sum(sizes) == 12 * len(DOCUMENTS)


def test_root_route_dispatches_by_model(reranker: ServedModel, classifier: ServedModel) -> None:
    with client_for([classifier, reranker]) as client:
        assert isinstance(client.post("/", json={"inputs": "good"}).json()[0], dict)
        ranked = client.post("/", json={"query": QUERY, "texts": DOCUMENTS}, headers={"x-model": "tiny-reranker"})
        assert ranked.status_code == 200 and len(ranked.json()) == len(DOCUMENTS)
        assert client.post("/tokenize", json={"inputs": "a"}, headers={"x-model": "nope"}).status_code == 404
        assert client.post("/decode", json={"ids": [5]}, headers={"x-model": "tiny-reranker"}).status_code == 200


def test_embedding_model_answers_rerank_with_cosine(client: TestClient, embed_model: ServedModel) -> None:
    body = client.post("/rerank", json={"query": "rivers", "texts": ["rivers", "cheese"]}).json()
    prompts = embed_model.manifest.prompts
    vectors = embed_model.bundle.embed([prompts["query"] + "rivers", prompts["document"] + "rivers",
                                        prompts["document"] + "cheese"], normalized=True)
    expected = vectors[1:] @ vectors[0]
    assert {item["index"]: item["score"] for item in body} == pytest.approx(
        {0: float(expected[0]), 1: float(expected[1])}, abs=1e-5)
