"""Text Embeddings Inference routes: /embed, /embed_all, /similarity, /tokenize, /decode, /info, /health."""

from __future__ import annotations

from dataclasses import asdict, replace

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

import service
from service import deps
from service.core import embed as core
from service.core import tokens as tokens_core
from service.errors import ApiError, ErrorKind, openapi_responses
from service.protocols import tei

router = APIRouter(tags=["TEI"])
ERRORS = openapi_responses(ErrorKind.EMPTY, ErrorKind.VALIDATION, ErrorKind.BACKEND, ErrorKind.OVERLOADED)
MODEL_HEADER = "x-model"
_MODEL_HEADER = MODEL_HEADER.encode()


def model_name_of(request: Request) -> str | None:
    """TEI routes have no `model` field: choose with the X-Model header or the ?model= query parameter.
    (Read from the raw scope: most requests have neither, and building the request's header and query
    objects for that cost more than the lookup.)"""
    return deps.raw_header(request.scope, _MODEL_HEADER) or (
        request.query_params.get("model") if request.scope.get("query_string") else None)


@router.post("/embed", responses=ERRORS)
async def embed(body: tei.EmbedRequest, request: Request) -> Response:
    """Sentence embeddings, one vector per input.

    `curl localhost:8080/embed -H 'Content-Type: application/json' -d '{"inputs": "What is Deep Learning?"}'`
    """
    model = deps.model_for(request, model_name_of(request), "embed")
    result = await core.embed(
        model, tei.flatten_inputs(body.inputs), limits=deps.limits(request), normalize=body.normalize,
        truncate=body.truncate, direction=body.truncation_direction, prompt_name=body.prompt_name,
        dimensions=body.dimensions, executor=request.app.state.executor, wait=deps.until_disconnect(request))
    return deps.json_response(result.vectors, result.timings, result.usage, model)


@router.post("/embed_all", responses=ERRORS)
async def embed_all(body: tei.EmbedAllRequest, request: Request) -> Response:
    """Token embeddings (last hidden states, no pooling) per input.

    `curl localhost:8080/embed_all -H 'Content-Type: application/json' -d '{"inputs": "Hello"}'`
    """
    model = deps.model_for(request, model_name_of(request), "embed")
    result = await core.embed_tokens(
        model, tei.flatten_inputs(body.inputs), limits=deps.limits(request), truncate=body.truncate,
        direction=body.truncation_direction, prompt_name=body.prompt_name, executor=request.app.state.executor,
        wait=deps.until_disconnect(request))
    return deps.json_response(result.tokens, result.timings, result.usage, model)


@router.post("/similarity", responses=ERRORS)
async def similarity(body: tei.SimilarityRequest, request: Request) -> Response:
    """Cosine similarity of each sentence to the source sentence.

    `curl localhost:8080/similarity -H 'Content-Type: application/json'
    -d '{"inputs": {"source_sentence": "a cat", "sentences": ["a dog", "a car"]}}'`
    """
    model = deps.model_for(request, model_name_of(request), "embed")
    parameters = body.parameters or tei.SimilarityParameters()
    core.check_count(len(body.inputs.sentences), deps.limits(request), "sentences")
    result = await core.embed(
        model, [body.inputs.source_sentence, *body.inputs.sentences], limits=_plus_one(deps.limits(request)),
        truncate=parameters.truncate, direction=parameters.truncation_direction, prompt_name=parameters.prompt_name,
        executor=request.app.state.executor, wait=deps.until_disconnect(request))
    return deps.json_response(core.cosine_to_first(result.vectors), result.timings, result.usage,
                              model)


def _plus_one(limits: core.Limits) -> core.Limits:
    return replace(limits, max_client_batch_size=limits.max_client_batch_size + 1)


@router.post("/tokenize", responses=ERRORS)
async def tokenize(body: tei.TokenizeRequest, request: Request) -> Response:
    """Tokens of each input with ids, text, special flag and character offsets.

    `curl localhost:8080/tokenize -H 'Content-Type: application/json' -d '{"inputs": "test"}'`
    """
    model = deps.registry(request).pick(model_name_of(request), "embed")
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    core.check_count(len(texts), deps.limits(request))
    prompt = core.resolve_prompt(model, deps.limits(request), body.prompt_name)
    return deps.json_response([[asdict(token) for token in tokens]
                               for tokens in tokens_core.tokens_of(model, texts, prompt, body.add_special_tokens)])


@router.post("/decode", responses=ERRORS)
async def decode(body: tei.DecodeRequest, request: Request) -> Response:
    """Text of token ids.

    `curl localhost:8080/decode -H 'Content-Type: application/json' -d '{"ids": [101, 3231, 102]}'`
    """
    model = deps.registry(request).pick(model_name_of(request), "embed")
    ids = body.ids
    batches: list[list[int]] = [ids] if not ids or isinstance(ids[0], int) else ids  # type: ignore[list-item]
    return deps.json_response(tokens_core.decode(model, batches, body.skip_special_tokens))


@router.get("/info", response_model=tei.Info)
async def info(request: Request) -> Response:
    """Model and server facts (TEI's discovery route).

    `curl localhost:8080/info`
    """
    model = deps.registry(request).pick(model_name_of(request), "embed")
    settings = request.app.state.settings
    manifest = model.manifest
    if manifest.task == "embed":
        model_type: dict[str, object] = {"embedding": {"pooling": manifest.pooling}}
    else:
        key = "reranker" if manifest.task == "rerank" else "classifier"
        model_type = {key: {"id2label": manifest.id2label,
                            "label2id": {label: index for index, label in enumerate(manifest.labels)}}}
    body = {
        "model_id": str(manifest.source.get("id") or model.bundle_dir), "model_sha": manifest.source.get("revision"),
        "model_dtype": model.variant, "served_model_name": model.name, "model_type": model_type,
        "max_concurrent_requests": settings.max_concurrent_requests, "max_input_length": manifest.max_length,
        "max_batch_tokens": settings.max_batch_tokens, "max_batch_requests": settings.max_batch_requests,
        "max_client_batch_size": settings.max_client_batch_size, "auto_truncate": settings.auto_truncate,
        "tokenization_workers": request.app.state.tokenization_workers, "version": service.__version__,
        "sha": None, "docker_label": None,
    }
    return deps.json_response(body)


@router.post("/", responses=ERRORS, include_in_schema=False)
async def root(request: Request) -> Response:
    """TEI's Inference-API route: the first model's task decides (embed, rerank or predict), so clients
    that post to the base URL, such as huggingface_hub's InferenceClient, work unchanged."""
    from service.routes import rerank as rerank_routes

    first = deps.registry(request).pick(model_name_of(request), deps.registry(request).models[0].task)
    if first.task == "rerank":
        return await rerank_routes.rerank(request)
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise ApiError(ErrorKind.VALIDATION, "body is not valid JSON") from None
    if first.task == "classify":
        return await rerank_routes.predict(deps.parse_body(request, data, tei.PredictRequest, "tei"), request)
    return await embed(deps.parse_body(request, data, tei.EmbedRequest, "tei"), request)


@router.get("/health", response_class=Response,
            responses={200: {"description": "Healthy (empty body)", "content": {}},
                       **openapi_responses(ErrorKind.UNHEALTHY)})
async def health(request: Request) -> Response:
    """Liveness: 200 with an empty body while the server and its batch workers run (also while it
    drains on shutdown); 503 `{"error": "unhealthy", ...}` if a worker has died.

    `curl -i localhost:8080/health` (HEAD answers the same status without a body)
    """
    registry = getattr(request.app.state, "registry", None)
    if registry is None or not all(m.batcher is not None and m.batcher.alive for m in registry.models):
        raise ApiError(ErrorKind.UNHEALTHY, "unhealthy")
    return Response(status_code=200)


@router.get("/ready", responses=openapi_responses(ErrorKind.UNHEALTHY))
async def ready(request: Request) -> Response:
    """Readiness: 200 once every model is loaded and warmed up; 503 from the moment shutdown begins, so a
    load balancer stops sending new requests while in-flight ones finish.

    `curl -i localhost:8080/ready`
    """
    if not request.app.state.ready:
        raise ApiError(ErrorKind.UNHEALTHY, "not ready")
    return deps.json_response({"status": "ready", "models": deps.registry(request).names()})


# Probes that send HEAD get the same status without a body (outside the OpenAPI document: same operation).
for _path, _endpoint in (("/health", health), ("/ready", ready)):
    router.add_api_route(_path, _endpoint, methods=["HEAD"], include_in_schema=False)
