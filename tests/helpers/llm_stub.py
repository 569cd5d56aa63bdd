"""A scripted OpenAI-compatible LLM server, run as its own process, for the proxy's failure cases.

Each request steers it with a `stub` object in the body (the proxy passes unknown fields through):
`{"chunks": N, "interval": S}` stream N chunks S seconds apart; `{"stall": true}` never answer;
`{"die_after": K}` exit the process after K streamed chunks; `{"status": 400}` answer with that error.
It records what it saw (authorization header, request id, whether the client went away) at GET /events.

Run: python tests/helpers/llm_stub.py PORT
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import uvicorn

EVENTS: list[dict[str, Any]] = []


def _chunk(number: int, model: str, chat: bool) -> bytes:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": f"tok{number} "}, "finish_reason": None}
        body = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [choice]}
    else:
        body = {"id": "cmpl-stub", "object": "text_completion", "created": 0, "model": model,
                "choices": [{"index": 0, "text": f"tok{number} ", "finish_reason": None, "logprobs": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _json(send: Any, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = {name.decode(): value.decode() for name, value in scope["headers"]}
    if scope["method"] == "GET":
        if scope["path"] == "/v1/models":
            await _json(send, 200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
        elif scope["path"] == "/events":
            await _json(send, 200, EVENTS)
        else:
            await _json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        return
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = json.loads(raw)
    options = request.get("stub") or {}
    event: dict[str, Any] = {"path": scope["path"], "model": request.get("model"), "request_id":
                             headers.get("x-request-id"), "authorization": headers.get("authorization"),
                             "stream": bool(request.get("stream")), "started": time.time(), "disconnected": False,
                             "chunks_sent": 0, "finished": False}
    EVENTS.append(event)
    if options.get("stall"):
        await asyncio.sleep(3600)
    if "status" in options:
        await _json(send, options["status"], {"error": {"message": f"stub refused with {options['status']}",
                                                        "type": "invalid_request_error", "code": None}})
        return
    chat = scope["path"].endswith("/chat/completions")
    model = str(request.get("model"))
    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        event["disconnected"] = True
        event["disconnected_at"] = time.time()

    if not request.get("stream"):
        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(float(options.get("delay", 0)))
        watcher.cancel()
        if event["disconnected"]:
            return
        choice = ({"index": 0, "message": {"role": "assistant", "content": "stub reply"}, "finish_reason": "stop"}
                  if chat else {"index": 0, "text": "stub reply", "finish_reason": "stop", "logprobs": None})
        await _json(send, 200, {"id": "stub", "object": "chat.completion" if chat else "text_completion",
                                "created": 0, "model": model, "choices": [choice],
                                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
        event["finished"] = True
        return

    watcher = asyncio.ensure_future(watch())
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
    try:
        for number in range(int(options.get("chunks", 5))):
            if event["disconnected"]:
                return
            if "die_after" in options and number == options["die_after"]:
                os._exit(3)
            if "stall_after" in options and number == options["stall_after"]:
                await asyncio.sleep(3600)
            await send({"type": "http.response.body", "body": _chunk(number, model, chat), "more_body": True})
            event["chunks_sent"] = number + 1
            event[f"sent_{number}"] = time.time()
            await asyncio.sleep(float(options.get("interval", 0.01)))
        usage = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": event["chunks_sent"],
                                          "total_tokens": 7 + event["chunks_sent"]}}
        await send({"type": "http.response.body", "body": b"data: " + json.dumps(usage).encode() + b"\n\n",
                    "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        event["finished"] = True
        event["finished_at"] = time.time()
    except OSError:
        event["disconnected"] = True
    finally:
        watcher.cancel()


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="on")
