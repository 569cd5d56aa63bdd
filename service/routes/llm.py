"""OpenAI generation routes, forwarded to the configured LLM servers (vLLM, TGI, llama.cpp, Ollama, ...)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.deps import wait_for_disconnect
from service.errors import ApiError, ErrorKind, openapi_responses
from service.observability import REQUEST_ID
from service.proxy.forward import LlmProxy

router = APIRouter(tags=["Generation (proxied)"])
ERRORS = openapi_responses(ErrorKind.NOT_FOUND, ErrorKind.VALIDATION, ErrorKind.OVERLOADED, ErrorKind.BAD_GATEWAY,
                           ErrorKind.GATEWAY_TIMEOUT, ErrorKind.PAYLOAD_TOO_LARGE)
_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": True,
    "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}}}}}}}


@router.post("/v1/chat/completions", responses=ERRORS, openapi_extra=_BODY)
async def chat_completions(request: Request) -> Response:
    """Chat completion from the upstream serving `model`; `stream: true` passes its events through.

    `curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json'
    -d '{"model": "llama", "messages": [{"role": "user", "content": "Hello"}]}'`
    """
    return await _forward(request, "/chat/completions", "messages")


@router.post("/v1/completions", responses=ERRORS, openapi_extra=_BODY)
async def completions(request: Request) -> Response:
    """Text completion from the upstream serving `model`.

    `curl localhost:8080/v1/completions -H 'Content-Type: application/json'
    -d '{"model": "llama", "prompt": "Once upon a time", "max_tokens": 32}'`
    """
    return await _forward(request, "/completions", "prompt")


async def _forward(request: Request, route: str, required: str) -> Response:
    proxy: LlmProxy | None = request.app.state.llm
    if proxy is None:
        raise ApiError(ErrorKind.NOT_FOUND, "no generation model is configured on this server; start it with "
                       "--llm NAME=URL to forward to an LLM server", param="model")
    try:
        payload = orjson.loads(await request.body())
    except orjson.JSONDecodeError as error:
        raise ApiError(ErrorKind.VALIDATION, f"body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ApiError(ErrorKind.VALIDATION, "body must be a JSON object")
    if required not in payload:
        raise ApiError(ErrorKind.VALIDATION, f"`{required}` is required", param=required)
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise ApiError(ErrorKind.VALIDATION, "`stream` must be true or false", param="stream")
    # A client that leaves before the upstream answers cancels the upstream request; once streaming,
    # the stream watches for that itself.
    forwarding = asyncio.ensure_future(proxy.forward(route, payload, REQUEST_ID.get()))
    watch = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({forwarding, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not forwarding.done():
        forwarding.cancel()
        await asyncio.gather(forwarding, return_exceptions=True)
        raise ApiError(ErrorKind.CANCELLED, "client disconnected")
    return forwarding.result()

