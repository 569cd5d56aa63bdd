"""The result cache (--result-cache-size), in-process with the real tiny ONNX bundles: repeated inputs are answered
without a forward pass, with the very numbers computed the first time."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.core.registry import ModelRegistry
from tests.api.conftest import client_for, fake_model
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


def _slow_app(bundle: Path, delay: float):  # type: ignore[no-untyped-def]
    """An app whose engine takes `delay` per pass (so requests overlap) and never runs a pass inline."""
    model = fake_model(bundle, "tiny-bge", delay_seconds=delay)
    return model, create_app(Settings(result_cache_size=100, inline_pass_tokens=0), ModelRegistry([model]))


def test_an_input_being_computed_is_waited_for_not_computed_again(bge_style_bundle: Path) -> None:
    model, app = _slow_app(bge_style_bundle, 0.2)

    async def scenario() -> list[list[list[float]]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            responses = await asyncio.gather(*(client.post("/embed", json={"inputs": inputs}) for inputs in
                                               (["alpha", "beta"], "alpha", "beta", ["beta", "alpha", "gamma"])))
        assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
        return [response.json() for response in responses]

    answers = asyncio.run(scenario())
    model.stop()
    alpha, beta = answers[0]
    assert answers[1] == [alpha] and answers[2] == [beta] and answers[3][:2] == [beta, alpha]
    assert sum(model.bundle.engine.batch_sizes) == 3, model.bundle.engine.batch_sizes  # type: ignore[attr-defined]
    assert model.cache is not None and model.cache.computing == {}


def test_when_the_request_computing_an_input_leaves_another_computes_it(bge_style_bundle: Path) -> None:
    model, app = _slow_app(bge_style_bundle, 0.3)

    async def scenario() -> tuple[httpx.Response, list[float]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            owner = asyncio.create_task(client.post("/embed", json={"inputs": "alpha"}))
            while not model.bundle.engine.batch_sizes:  # type: ignore[attr-defined]  # its pass has started
                await asyncio.sleep(0.001)
            waiter = asyncio.create_task(client.post("/embed", json={"inputs": ["alpha"]}))
            await asyncio.sleep(0.05)  # the waiter is waiting on the owner's pass
            owner.cancel()  # its client leaves while the pass runs
            answer = await waiter
            again = (await client.post("/embed", json={"inputs": "alpha"})).json()[0]
        return answer, again

    answer, again = asyncio.run(scenario())
    model.stop()
    assert answer.status_code == 200 and answer.json() == [again]
    assert sum(model.bundle.engine.batch_sizes) == 2  # type: ignore[attr-defined]  # the owner's pass, and the waiter's
    assert model.cache is not None and model.cache.computing == {}
