"""TEI and OpenAI embedding routes in-process, with shapes and errors exactly as the peers send them."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.core.registry import ServedModel
from service.errors import ApiError
from tests.api.conftest import client_for, fake_model


def expected(model: ServedModel, texts: list[str], normalize: bool = True) -> np.ndarray:
    return model.bundle.embed(texts, normalized=normalize)


def test_embed_single_and_batch(client: TestClient, embed_model: ServedModel) -> None:
    single = client.post("/embed", json={"inputs": "What is Deep Learning?"})
    assert single.status_code == 200
    assert np.allclose(single.json(), expected(embed_model, ["What is Deep Learning?"]), atol=1e-6)
    batch = client.post("/embed", json={"inputs": ["first text", "second text", "北京"]}).json()
    assert len(batch) == 3 and len(batch[0]) == 32
    assert np.allclose(batch, expected(embed_model, ["first text", "second text", "北京"]), atol=1e-6)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_timing_headers(client: TestClient) -> None:
    response = client.post("/embed", json={"inputs": "headers please"})
    for header in ("x-compute-type", "x-compute-time", "x-compute-characters", "x-compute-tokens", "x-total-time",
                   "x-tokenization-time", "x-queue-time", "x-inference-time"):
        assert header in response.headers
    assert int(response.headers["x-compute-characters"]) == len("headers please")
    assert int(response.headers["x-compute-tokens"]) > 2


def test_token_id_inputs(client: TestClient, embed_model: ServedModel) -> None:
    ids = embed_model.bundle.tokenizer.encode(["first text"])[0].ids
    by_ids = client.post("/embed", json={"inputs": ids}).json()
    by_list = client.post("/embed", json={"inputs": [ids, ids]}).json()
    by_text = client.post("/embed", json={"inputs": "first text"}).json()
    assert np.allclose(by_ids, by_text, atol=1e-6) and len(by_list) == 2


def test_token_ids_outside_the_vocabulary_are_refused(client: TestClient, embed_model: ServedModel) -> None:
    size = embed_model.bundle.tokenizer.vocabulary_size
    for ids in ([5, size], [5, 2**40], [[5, 6], [7, size + 100]]):
        response = client.post("/embed", json={"inputs": ids})
        assert response.status_code == 422, (ids, response.text)
        assert response.json()["error_type"] == "Validation" and "outside the vocabulary" in response.json()["error"]
        openai = client.post("/v1/embeddings", json={"input": ids})
        assert openai.status_code == 422 and "outside the vocabulary" in openai.json()["error"]["message"]
    assert client.post("/embed", json={"inputs": [5, size - 1]}).status_code == 200
    refused = client.post("/decode", json={"ids": [[5], [6, size]]})
    assert refused.status_code == 422 and f"token id {size} is outside" in refused.json()["error"]


def test_texts_and_token_ids_mixed_in_one_request_keep_their_order(client: TestClient,
                                                                    embed_model: ServedModel) -> None:
    ids = embed_model.bundle.tokenizer.encode(["second text here"])[0].ids
    mixed = client.post("/embed", json={"inputs": ["first text", ids, "third one"]})
    alone = [client.post("/embed", json={"inputs": single}).json()[0] for single in ("first text", ids, "third one")]
    assert mixed.status_code == 200 and np.allclose(mixed.json(), alone, atol=1e-6)
    lengths = [len(embed_model.bundle.tokenizer.encode([text])[0]) for text in ("first text", "third one")]
    assert int(mixed.headers["x-compute-tokens"]) == lengths[0] + len(ids) + lengths[1]


def test_normalize_false_and_dimensions(client: TestClient, embed_model: ServedModel) -> None:
    raw = client.post("/embed", json={"inputs": "abc", "normalize": False}).json()
    assert np.allclose(raw, expected(embed_model, ["abc"], normalize=False), atol=1e-5)
    short = client.post("/embed", json={"inputs": "abc", "dimensions": 8}).json()
    assert len(short[0]) == 8 and np.linalg.norm(short[0]) == pytest.approx(1.0, abs=1e-5)
    truncated_then_normalized = np.array(raw[0][:8]) / np.linalg.norm(raw[0][:8])
    assert np.allclose(short[0], truncated_then_normalized, atol=1e-5)
    for bad in (0, -3, 33):
        response = client.post("/embed", json={"inputs": "abc", "dimensions": bad})
        assert response.status_code == 422
        assert response.json()["error_type"] == "Validation"


def test_one_batch_mixing_unit_raw_and_token_rows(embed_model: ServedModel) -> None:
    """Requests with and without normalization (and token embeddings) share a pass: the worker scales
    only the rows that asked for unit length."""
    from service.core.registry import TAG_POOLED, TAG_TOKENS, TAG_UNIT

    texts = ["first text", "second, longer text", "third"]
    items = embed_model.bundle.tokenizer.encode(texts)
    raw = expected(embed_model, texts, normalize=False)
    for tags in ([TAG_UNIT, TAG_POOLED, TAG_UNIT], [TAG_UNIT, TAG_TOKENS, TAG_POOLED], [TAG_UNIT] * 3):
        rows = embed_model.run_batch(items, tags)
        for row, tag, vector, item in zip(rows, tags, raw, items, strict=True):
            if tag == TAG_UNIT:
                assert np.allclose(row, vector / np.linalg.norm(vector), atol=1e-6)
            elif tag == TAG_POOLED:
                assert np.allclose(row, vector, atol=1e-6) and abs(np.linalg.norm(row) - 1) > 1e-3
            else:
                assert row.shape == (len(item), embed_model.manifest.hidden_size)


def test_prompts(client: TestClient, embed_model: ServedModel) -> None:
    prompt = embed_model.manifest.prompts["query"]
    with_prompt = client.post("/embed", json={"inputs": "rivers", "prompt_name": "query"}).json()
    assert np.allclose(with_prompt, expected(embed_model, [prompt + "rivers"]), atol=1e-6)
    assert not np.allclose(with_prompt, client.post("/embed", json={"inputs": "rivers"}).json())
    unknown = client.post("/embed", json={"inputs": "rivers", "prompt_name": "nope"})
    assert unknown.status_code == 422 and "query" in unknown.json()["error"]


def test_truncation(client: TestClient) -> None:
    long_text = "the " * 500
    refused = client.post("/embed", json={"inputs": long_text, "truncate": False})
    assert refused.status_code == 422
    assert refused.json() == {"error": "`inputs` must have less than 64 tokens. Given: 502", "error_type": "Validation"}
    assert client.post("/embed", json={"inputs": long_text}).status_code == 200
    left = client.post("/embed", json={"inputs": long_text + " end", "truncation_direction": "Left"})
    assert left.status_code == 200


def test_tei_errors(embed_model: ServedModel) -> None:
    with client_for([embed_model], max_client_batch_size=3) as client:
        empty = client.post("/embed", json={"inputs": []})
        assert (empty.status_code, empty.json()) == (400, {"error": "`inputs` cannot be empty", "error_type": "Empty"})
        too_many = client.post("/embed", json={"inputs": ["a", "b", "c", "d"]})
        assert too_many.status_code == 422
        assert too_many.json()["error"] == "batch size 4 > maximum allowed batch size 3"
        wrong_type = client.post("/embed", json={"inputs": {"nested": True}})
        assert wrong_type.status_code == 422 and wrong_type.json()["error_type"] == "Validation"
        broken = client.post("/embed", content=b'{"inputs": ', headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["error_type"] == "Validation"


def test_payload_limit(embed_model: ServedModel) -> None:
    with client_for([embed_model], payload_limit=2048) as client:
        response = client.post("/embed", json={"inputs": "x" * 5000})
        assert response.status_code == 413 and response.json()["error_type"] == "PayloadTooLarge"
        openai_style = client.post("/v1/embeddings", json={"input": "x" * 5000})
        assert openai_style.status_code == 413 and openai_style.json()["error"]["code"] == 413


def test_openai_embeddings(client: TestClient, embed_model: ServedModel) -> None:
    texts = ["one", "two two"]
    floats = client.post("/v1/embeddings", json={"input": texts, "model": "tiny-bge"}).json()
    assert floats["object"] == "list" and floats["model"] == "tiny-bge"
    assert [item["index"] for item in floats["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in floats["data"])
    vectors = np.array([item["embedding"] for item in floats["data"]])
    assert np.allclose(vectors, expected(embed_model, texts), atol=1e-6)
    tokens = sum(len(item) for item in embed_model.bundle.tokenizer.encode(texts))
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    encoded = client.post("/embeddings", json={"input": texts, "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in encoded["data"]])
    assert np.array_equal(decoded, vectors.astype(np.float32))
    single = client.post("/v1/embeddings", json={"input": "one", "dimensions": 4}).json()
    assert len(single["data"]) == 1 and len(single["data"][0]["embedding"]) == 4


def test_openai_errors_use_openai_envelope(client: TestClient) -> None:
    empty = client.post("/v1/embeddings", json={"input": []})
    assert empty.status_code == 400
    assert empty.json() == {"error": {"message": "`inputs` cannot be empty", "type": "invalid_request_error",
                                      "param": "inputs", "code": 400}}
    wrong = client.post("/v1/embeddings", json={"input": 12.5})
    assert wrong.status_code == 422 and wrong.json()["error"]["type"] == "invalid_request_error"


def test_model_selection(bge_style_bundle: Path) -> None:
    models = [fake_model(bge_style_bundle, "first"), fake_model(bge_style_bundle, "second")]
    with client_for(models) as client:
        assert client.post("/v1/embeddings", json={"input": "a", "model": "second"}).json()["model"] == "second"
        unknown = client.post("/v1/embeddings", json={"input": "a", "model": "missing"})
        assert unknown.status_code == 404
        assert "first" in unknown.json()["error"]["message"] and "second" in unknown.json()["error"]["message"]
        listed = client.get("/v1/models").json()
        assert [model["id"] for model in listed["data"]] == ["first", "second"]
        assert listed["data"][0]["capabilities"] == ["embed", "rerank"]
        by_header = client.post("/embed", json={"inputs": "a"}, headers={"x-model": "nope"})
        assert by_header.status_code == 404 and by_header.json()["error_type"] == "NotFound"


def test_embed_all_similarity_tokenize_decode(client: TestClient, embed_model: ServedModel) -> None:
    tokens = client.post("/embed_all", json={"inputs": ["hello world", "a"]}).json()
    lengths = [len(item) for item in embed_model.bundle.tokenizer.encode(["hello world", "a"])]
    assert [len(item) for item in tokens] == lengths and len(tokens[0][0]) == 32
    scores = client.post("/similarity", json={"inputs": {"source_sentence": "a cat",
                                                         "sentences": ["a dog", "a cat"]}}).json()
    vectors = expected(embed_model, ["a cat", "a dog", "a cat"])
    assert scores == pytest.approx([float(vectors[1] @ vectors[0]), 1.0], abs=1e-5)
    tokenized = client.post("/tokenize", json={"inputs": "the capital"}).json()
    assert tokenized[0][0]["special"] is True and tokenized[0][0]["start"] is None
    assert tokenized[0][2] == {"id": tokenized[0][2]["id"], "text": "capital", "special": False, "start": 4, "stop": 11}
    ids = [token["id"] for token in tokenized[0]]
    assert client.post("/decode", json={"ids": ids}).json() == ["the capital"]
    assert client.post("/decode", json={"ids": [ids, ids[2:3]]}).json() == ["the capital", "capital"]


def test_info_and_health(client: TestClient) -> None:
    info = client.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "cls"}}
    assert info["max_input_length"] == 64 and info["served_model_name"] == "tiny-bge"
    assert info["auto_truncate"] is True and info["max_client_batch_size"] == 2048
    health = client.get("/health")
    assert health.status_code == 200 and health.content == b""


def test_engine_error_fails_one_batch_and_the_worker_keeps_serving(bge_style_bundle: Path) -> None:
    model = fake_model(bge_style_bundle, "tiny-bge")
    poison = model.bundle.tokenizer.encode(["poison"])[0].ids[1]
    model.bundle.engine.fail_on_token = poison  # type: ignore[attr-defined]
    with client_for([model]) as client:
        failed = client.post("/embed", json={"inputs": "poison"})
        assert failed.status_code == 424
        assert failed.json()["error_type"] == "Backend" and "Inference failed" in failed.json()["error"]
        assert client.post("/embed", json={"inputs": "healthy text"}).status_code == 200


def test_a_non_finite_embedding_fails_its_own_request_only(bge_style_bundle: Path) -> None:
    from service.core.registry import TAG_POOLED, TAG_TOKENS, TAG_UNIT

    model = fake_model(bge_style_bundle, "tiny-bge")
    broken = model.bundle.tokenizer.encode(["broken"])[0].ids[1]
    model.bundle.engine.non_finite_on_token = broken  # type: ignore[attr-defined]
    items = model.bundle.tokenizer.encode(["healthy text", "broken", "broken"])
    rows = model.run_batch(items, [TAG_UNIT, TAG_POOLED, TAG_TOKENS])  # one pass: only pooled rows are checked
    assert np.isfinite(rows[0]).all()
    assert isinstance(rows[1], ApiError) and rows[1].status == 424
    assert isinstance(rows[2], np.ndarray) and np.isnan(rows[2]).all()
    with client_for([model]) as client:
        failed = client.post("/embed", json={"inputs": ["healthy text", "broken"]})
        assert failed.status_code == 424
        assert failed.json() == {"error": "the model produced non-finite values (NaN or infinity)",
                                 "error_type": "Backend"}
        openai = client.post("/v1/embeddings", json={"input": "broken", "model": "tiny-bge"})
        assert openai.status_code == 424 and openai.json()["error"]["type"] == "server_error"
        assert client.post("/embed", json={"inputs": "healthy text", "normalize": False}).status_code == 200


def test_openapi_document_lists_routes_and_error_statuses(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    for path in ("/embed", "/embed_all", "/similarity", "/tokenize", "/decode", "/info", "/health",
                 "/v1/embeddings", "/v1/models"):
        assert path in document["paths"]
    assert {"400", "422", "424", "429"} <= set(document["paths"]["/embed"]["post"]["responses"])


def test_api_key(embed_model: ServedModel) -> None:
    with client_for([embed_model], api_key="s3cret,other") as client:
        refused = client.post("/embed", json={"inputs": "a"})
        assert refused.status_code == 401 and refused.json()["error_type"] == "Unauthorized"
        wrong = client.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        for key in ("s3cret", "other"):
            ok = client.post("/embed", json={"inputs": "a"}, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_generation_models_are_listed_beside_local_ones(embed_model: ServedModel) -> None:
    with client_for([embed_model], llm=["chat=http://127.0.0.1:9/v1"]) as client:
        listed = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
        assert listed["chat"]["capabilities"] == ["chat", "completions"]
        assert "embed" in listed["tiny-bge"]["capabilities"]
        # an embedding model is not a generation model, whatever route is asked
        refused = client.post("/v1/chat/completions", json={"model": "tiny-bge", "messages": []})
        assert refused.status_code == 404 and "chat" in refused.json()["error"]["message"]
    with client_for([embed_model]) as client:
        none = client.post("/v1/completions", json={"model": "x", "prompt": "a"})
        assert none.status_code == 404 and "--llm" in none.json()["error"]["message"]


def test_api_key_file_and_public_paths(embed_model: ServedModel, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfrom-file\n\n  second  \n")
    with client_for([embed_model], api_key_file=keys, api_key="flag-key") as client:
        for key, status in (("from-file", 200), ("second", 200), ("flag-key", 200), ("# team keys", 401)):
            response = client.post("/embed", json={"inputs": "a"}, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == status, key
        assert client.get("/ready").status_code == 200  # probes stay open by default
    with client_for([embed_model], api_key_file=keys, public_paths="") as client:
        for path in ("/health", "/ready", "/metrics"):
            assert client.get(path).status_code == 401
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        Settings(api_key_file=empty)
    with pytest.raises(ValueError, match="cannot read"):
        Settings(api_key_file=tmp_path / "missing")
