"""OpenAI-compatible routes: /v1/embeddings (and /embeddings), /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import deps
from service.core import embed as core
from service.errors import ErrorKind, openapi_responses
from service.protocols import openai

router = APIRouter(tags=["OpenAI"])
ERRORS = openapi_responses(ErrorKind.EMPTY, ErrorKind.NOT_FOUND, ErrorKind.VALIDATION, ErrorKind.BACKEND,
                           ErrorKind.OVERLOADED)


@router.post("/v1/embeddings", responses=ERRORS)
@router.post("/embeddings", responses=ERRORS, include_in_schema=False)
async def embeddings(body: openai.EmbeddingsRequest, request: Request) -> Response:
    """Embeddings in OpenAI's format; `encoding_format: base64` returns little-endian float32 bytes.

    `curl localhost:8080/v1/embeddings -H 'Content-Type: application/json'
    -d '{"model": "all-MiniLM-L6-v2", "input": ["hello", "world"]}'`
    """
    model = deps.model_for(request, body.model, "embed", accepts_any=True)
    # Infinity's clients always send `dimensions`, with 0 meaning all of them.
    dimensions = body.dimensions or None
    result = await core.embed(model, body.inputs(), limits=deps.limits(request), normalize=True,
                              dimensions=dimensions, executor=request.app.state.executor,
                              wait=deps.until_disconnect(request))
    response = openai.embeddings_response(result.vectors, model.name, result.usage.tokens, body.encoding_format)
    return deps.json_response(response, result.timings, result.usage, model)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    """Every served model with its capabilities: local embedding/rerank models and proxied LLMs.

    `curl localhost:8080/v1/models`
    """
    created = int(request.app.state.started_at)
    data = [{"id": model.name, "object": "model", "created": created, "owned_by": "embedrank",
             "capabilities": model.capabilities, "task": model.task, "dtype": model.variant, "device": model.device,
             "dimensions": model.manifest.dimensions, "max_input_length": model.manifest.max_length,
             "aliases": model.aliases} for model in deps.registry(request).models]
    proxy = request.app.state.llm
    if proxy is not None:
        data += [{"id": spec.name, "object": "model", "created": created, "owned_by": "upstream",
                  "capabilities": ["chat", "completions"], "task": "generate", "aliases": spec.aliases,
                  "upstream_model": spec.model, "pool_size": len(spec.urls)} for spec in proxy.specs.values()]
    return deps.json_response(openai.models_response(data))
