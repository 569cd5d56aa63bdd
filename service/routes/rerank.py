"""Rerank and classify: TEI's /rerank and /predict, Infinity's /rerank (same path, told apart by body),
/classify and /models, Cohere's /v1/rerank and /v2/rerank, and Jina's /v1/rerank."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import deps
from service.core import rerank as core
from service.errors import ApiError, ErrorKind, openapi_responses
from service.protocols import cohere, infinity, tei
from service.routes.tei import model_name_of

router = APIRouter()
ERRORS = openapi_responses(ErrorKind.EMPTY, ErrorKind.NOT_FOUND, ErrorKind.VALIDATION, ErrorKind.BACKEND,
                           ErrorKind.OVERLOADED)
_BODY_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    tei.RerankRequest.model_json_schema(), infinity.RerankRequest.model_json_schema()]}}}}}


def _common(request: Request) -> dict[str, object]:
    return {"limits": deps.limits(request), "executor": request.app.state.executor,
            "wait": deps.until_disconnect(request)}


@router.post("/rerank", tags=["TEI", "Infinity"], responses=ERRORS, openapi_extra=_BODY_DOC)
async def rerank(request: Request) -> Response:
    """Rerank texts for a query. A body with `texts` is TEI's request (bare sorted array back); a body
    with `documents` is Infinity's (`top_n`, `return_documents`, `{"object": "rerank", ...}` back).

    `curl localhost:8080/rerank -H 'Content-Type: application/json'
    -d '{"query": "What is Deep Learning?", "texts": ["Deep Learning is...", "Cheese is tasty."]}'`
    """
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise ApiError(ErrorKind.VALIDATION, "body is not valid JSON") from None
    if isinstance(data, dict) and "documents" in data and "texts" not in data:
        return await _infinity_rerank(request, data)
    body = deps.parse_body(request, data, tei.RerankRequest, "tei")
    model = deps.model_for(request, model_name_of(request), "rerank")
    result = await core.rerank(model, body.query, body.texts, raw_scores=body.raw_scores, truncate=body.truncate,
                               direction=body.truncation_direction, **_common(request))  # type: ignore[arg-type]
    ranked = [{"index": index, "score": float(result.scores[index]),
               **({"text": body.texts[index]} if body.return_text else {})} for index in result.ranking()]
    return deps.json_response(ranked, result.timings, result.usage, model)


async def _infinity_rerank(request: Request, data: dict[str, object]) -> Response:
    body = deps.parse_body(request, data, infinity.RerankRequest, "openai")
    core.check_top_n(body.top_n)
    model = deps.model_for(request, body.model, "rerank", accepts_any=True)
    result = await core.rerank(model, body.query, body.documents, raw_scores=body.raw_scores,
                               field_name="documents", **_common(request))  # type: ignore[arg-type]
    results = [{"relevance_score": float(result.scores[index]), "index": index,
                **({"document": body.documents[index]} if body.return_documents else {})}
               for index in result.ranking(body.top_n)]
    response = infinity.envelope("rerank", {"results": results, "truncated_documents": result.usage.truncated},
                                 model.name, result.usage.tokens)
    return deps.json_response(response, result.timings, result.usage, model)


@router.post("/predict", tags=["TEI"], responses=ERRORS)
async def predict(body: tei.PredictRequest, request: Request) -> Response:
    """Classify a text, a pair of texts (a 2-element list), or a batch of them; labels best first.

    `curl localhost:8080/predict -H 'Content-Type: application/json' -d '{"inputs": "I like you."}'`
    """
    try:
        inputs, is_batch = body.shaped()
    except ValueError as error:
        raise ApiError(ErrorKind.VALIDATION, str(error)) from None
    model = deps.model_for(request, model_name_of(request), "classify")
    predictions, usage, timings = await core.classify(
        model, inputs, raw_scores=body.raw_scores, truncate=body.truncate, direction=body.truncation_direction,
        **_common(request))  # type: ignore[arg-type]
    shaped = [[{"score": p.score, "label": p.label} for p in row] for row in predictions]
    return deps.json_response(shaped if is_batch else shaped[0], timings, usage, model)


@router.post("/classify", tags=["Infinity"], responses=ERRORS)
async def classify(body: infinity.ClassifyRequest, request: Request) -> Response:
    """Infinity's classification: every label with its score for each input.

    `curl localhost:8080/classify -H 'Content-Type: application/json' -d '{"input": ["I love this!"]}'`
    """
    model = deps.model_for(request, body.model, "classify", accepts_any=True)
    predictions, usage, timings = await core.classify(model, body.input, raw_scores=body.raw_scores,
                                                      **_common(request))  # type: ignore[arg-type]
    data = [[{"score": p.score, "label": p.label} for p in row] for row in predictions]
    return deps.json_response(infinity.envelope("classify", {"data": data}, model.name, usage.tokens), timings,
                              usage, model)


async def _cohere(request: Request, body: cohere.RerankV1Request | cohere.RerankV2Request,
                  api_version: str) -> Response:
    core.check_top_n(body.top_n)
    model = deps.model_for(request, body.model, "rerank", accepts_any=True)
    documents = body.texts()
    result = await core.rerank(model, body.query, documents, max_tokens_per_doc=body.max_tokens_per_doc,
                               field_name="documents", **_common(request))  # type: ignore[arg-type]
    scores = [float(score) for score in result.scores]
    response = cohere.rerank_response(result.ranking(body.top_n), scores, documents, body.return_documents,
                                      model.name, result.usage.tokens, api_version, result.usage.truncated)
    return deps.json_response(response, result.timings, result.usage, model)


@router.post("/v1/rerank", tags=["Cohere", "Jina"], responses=ERRORS)
async def rerank_v1(body: cohere.RerankV1Request, request: Request) -> Response:
    """Cohere v1 and Jina rerank: documents as strings or `{"text": ...}`; `top_n`; `return_documents`
    adds `document: {"text": ...}` to each result. The response carries Cohere's `id`, `results` and
    `meta` and Jina's `model` and `usage`.

    `curl localhost:8080/v1/rerank -H 'Content-Type: application/json'
    -d '{"model": "reranker", "query": "capital of the US?", "documents": ["Carson City...", "Washington..."],
    "top_n": 1}'`
    """
    return await _cohere(request, body, "1")


@router.post("/v2/rerank", tags=["Cohere"], responses=ERRORS)
async def rerank_v2(body: cohere.RerankV2Request, request: Request) -> Response:
    """Cohere v2 rerank (`max_tokens_per_doc` cuts each document before scoring).

    `curl localhost:8080/v2/rerank -H 'Content-Type: application/json'
    -d '{"model": "reranker", "query": "capital of the US?", "documents": ["Carson City...", "Washington..."]}'`
    """
    return await _cohere(request, body, "2")


@router.get("/models", tags=["Infinity"])
async def models(request: Request) -> Response:
    """Infinity's model list: every served model with its capabilities.

    `curl localhost:8080/models`
    """
    created = int(request.app.state.started_at)
    # Infinity's generated client accepts only "infinity" as owned_by.
    data = [{"id": model.name, "object": "model", "owned_by": "infinity", "created": created, "backend": "onnxruntime",
             "capabilities": model.capabilities, "dtype": model.variant, "device": model.device,
             "stats": {"queue_absolute": model.batcher.queue_depth if model.batcher else 0,
                       "results_pending": model.in_flight}} for model in deps.registry(request).models]
    return deps.json_response({"object": "list", "data": data})
