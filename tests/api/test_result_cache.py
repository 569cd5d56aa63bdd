"""The result cache (--result-cache-size), in-process with the real tiny ONNX bundles: repeated inputs are answered
without a forward pass, with the very numbers computed the first time."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from tests.api.conftest import client_for
from tests.api.test_rerank_routes import DOCUMENTS, QUERY, real_model


def _metric(client: TestClient, name: str, model: str) -> float:
    found = re.search(rf'^{name}{{model="{re.escape(model)}"}} ([0-9.e+-]+)$', client.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def _computed(client: TestClient, model: str) -> float:
    """Inputs the engine has run so far (the sum of every forward pass's size)."""
    return _metric(client, "embedrank_batch_size_sum", model)


def test_repeated_embeddings_come_from_the_cache(bge_style_bundle: Path) -> None:
    with client_for([real_model(bge_style_bundle, "tiny-bge")], result_cache_size=100) as client:
        start = _computed(client, "tiny-bge")
        first = client.post("/embed", json={"inputs": ["alpha", "beta"]}).json()
        assert _computed(client, "tiny-bge") - start == 2
        again = client.post("/embed", json={"inputs": ["beta", "alpha"]}).json()
        assert _computed(client, "tiny-bge") - start == 2, "a request the cache holds whole is not computed"
        assert again == [first[1], first[0]]
        mixed = client.post("/embed", json={"inputs": ["alpha", "gamma", "beta"]}).json()
        assert _computed(client, "tiny-bge") - start == 3, "only the new input is computed"
        assert mixed[0] == first[0] and mixed[2] == first[1]
        assert np.isclose(np.linalg.norm(mixed[1]), 1.0, atol=1e-5)

        # A shortened vector is cut and scaled from the remembered row, which stays as it was.
        short = client.post("/v1/embeddings", json={"input": "alpha", "dimensions": 4}).json()["data"][0]["embedding"]
        assert _computed(client, "tiny-bge") - start == 4  # the pooled (not unit) row is a result of its own
        cut = np.array(first[0][:4])
        assert np.allclose(short, cut / np.linalg.norm(cut), atol=1e-6)
        assert client.post("/embed", json={"inputs": "alpha"}).json()[0] == first[0]
        raw = client.post("/embed", json={"inputs": "alpha", "normalize": False}).json()[0]
        assert _computed(client, "tiny-bge") - start == 4, "the pooled row of 'alpha' is remembered too"
        assert np.allclose(np.array(raw) / np.linalg.norm(raw), first[0], atol=1e-6)

        # Per-token states are never remembered.
        client.post("/embed_all", json={"inputs": "alpha"})
        client.post("/embed_all", json={"inputs": "alpha"})
        assert _computed(client, "tiny-bge") - start == 6

        assert _metric(client, "embedrank_cache_hits_total", "tiny-bge") == 6
        assert _metric(client, "embedrank_cache_misses_total", "tiny-bge") == 4
        assert _metric(client, "embedrank_cache_entries", "tiny-bge") == 4


def test_an_input_repeated_in_one_request_is_computed_once(bge_style_bundle: Path) -> None:
    with client_for([real_model(bge_style_bundle, "tiny-bge")], result_cache_size=100) as client:
        start = _computed(client, "tiny-bge")
        rows = client.post("/embed", json={"inputs": ["alpha", "beta", "alpha", "alpha", "beta"]}).json()
        assert _computed(client, "tiny-bge") - start == 2
        assert rows[0] == rows[2] == rows[3] and rows[1] == rows[4] and rows[0] != rows[1]
        assert rows == client.post("/embed", json={"inputs": ["alpha", "beta", "alpha", "alpha", "beta"]}).json()
        assert _computed(client, "tiny-bge") - start == 2
        assert _metric(client, "embedrank_cache_entries", "tiny-bge") == 2


def test_the_key_is_the_tokens_the_model_sees(bge_style_bundle: Path) -> None:
    long_text = " ".join(["word"] * 2000)  # beyond the model's max length: truncated
    with client_for([real_model(bge_style_bundle, "tiny-bge")], result_cache_size=100) as client:
        start = _computed(client, "tiny-bge")
        whole = client.post("/embed", json={"inputs": long_text}).json()
        longer = client.post("/embed", json={"inputs": long_text + " word word"}).json()
        assert _computed(client, "tiny-bge") - start == 1, "texts truncated to the same tokens share an entry"
        assert longer == whole
        left = client.post("/embed", json={"inputs": long_text, "truncation_direction": "left"}).json()
        computed = _computed(client, "tiny-bge")
        assert client.post("/embed", json={"inputs": "other words " + long_text,
                                           "truncation_direction": "left"}).json() == left
        assert _computed(client, "tiny-bge") == computed, "cut from the left, what was cut off does not matter"
        client.post("/embed", json={"inputs": "word " * 5 + "end"})
        client.post("/embed", json={"inputs": "end " + "word " * 5})
        assert _computed(client, "tiny-bge") == computed + 2, "the same words in another order are other tokens"


def test_least_recently_used_entries_leave_first(bge_style_bundle: Path) -> None:
    with client_for([real_model(bge_style_bundle, "tiny-bge")], result_cache_size=2) as client:
        start = _computed(client, "tiny-bge")
        client.post("/embed", json={"inputs": ["one", "two"]})
        client.post("/embed", json={"inputs": "one"})  # "two" is now the least recently used
        client.post("/embed", json={"inputs": "three"})  # and leaves
        assert _computed(client, "tiny-bge") - start == 3
        client.post("/embed", json={"inputs": "one"})
        assert _computed(client, "tiny-bge") - start == 3
        client.post("/embed", json={"inputs": "two"})
        assert _computed(client, "tiny-bge") - start == 4
        assert _metric(client, "embedrank_cache_entries", "tiny-bge") == 2


def test_off_by_default(bge_style_bundle: Path) -> None:
    with client_for([real_model(bge_style_bundle, "tiny-bge")]) as client:
        start = _computed(client, "tiny-bge")
        first = client.post("/embed", json={"inputs": "alpha"}).json()
        assert client.post("/embed", json={"inputs": "alpha"}).json() == first
        assert _computed(client, "tiny-bge") - start == 2
        assert "embedrank_cache_hits_total" not in client.get("/metrics").text


def test_repeated_reranks_come_from_the_cache(cross_encoder_bundle: Path) -> None:
    with client_for([real_model(cross_encoder_bundle, "tiny-reranker")], result_cache_size=100) as client:
        start = _computed(client, "tiny-reranker")
        first = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
        assert _computed(client, "tiny-reranker") - start == len(DOCUMENTS)
        again = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS[::-1], "raw_scores": True}).json()
        assert _computed(client, "tiny-reranker") - start == len(DOCUMENTS)
        scores = {DOCUMENTS[item["index"]]: item["score"] for item in first}
        assert {DOCUMENTS[::-1][item["index"]]: item["score"] for item in again} == scores
        client.post("/rerank", json={"query": QUERY + " today", "texts": DOCUMENTS})
        assert _computed(client, "tiny-reranker") - start == 2 * len(DOCUMENTS), "another query is another pair"
