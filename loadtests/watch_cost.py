"""The event loop's CPU per request for watching the connections of requests that wait, both ways.

    python -m loadtests.watch_cost [--requests 4000] [--clients 128] [--wait-ms 80] [--repeat 3]

A request still waiting for its results after 50 ms starts watching its connection, so that a client
that went away has its queued items dropped (`service.deps.until_disconnect`). Under heavy load most
requests wait that long (at 128 single-text clients p50 is 70-90 ms on 2 cores). Behind embedrank's
own HTTP protocol the request's transport is in its scope and the shared timer looks at
`transport.is_closing()` every 50 ms; without it (another ASGI server) a task per request awaits
`http.disconnect` from `receive` and is cancelled when the answer comes. Here `--clients` coroutines
on uvloop each wait on a pending result answered after `--wait-ms`, over real loopback TCP
connections, once with the transport in the scope and once without, and the loop thread's CPU time
per request is printed for each (the harness's own futures and timers included, the same in both).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace
from typing import Any

import uvloop

from service.batching.batcher import PendingRequest
from service.deps import CONNECTION, until_disconnect


async def _connections(count: int) -> tuple[list[asyncio.BaseTransport], list[asyncio.BaseTransport],
                                             asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    accepted: list[asyncio.BaseTransport] = []

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [(await loop.create_connection(asyncio.Protocol, "127.0.0.1", port))[0] for _ in range(count)]
    while len(accepted) < count:
        await asyncio.sleep(0.01)
    return accepted, clients, server


async def _run(requests: int, clients: int, wait: float, with_transport: bool) -> float:
    """Loop CPU seconds per request."""
    loop = asyncio.get_running_loop()
    accepted, opened, server = await _connections(clients)
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:  # the client stays: http.disconnect never comes
        await never.wait()
        return {"type": "http.disconnect"}

    async def client(number: int) -> None:
        for index in range(number, requests, clients):
            pending = PendingRequest(loop=loop, future=loop.create_future(), results=[None], remaining=1)
            loop.call_later(wait, pending.future.set_result, [index])
            scope = {CONNECTION: accepted[number]} if with_transport else {}
            await until_disconnect(SimpleNamespace(scope=scope, receive=receive))(pending)  # type: ignore[arg-type]

    started = time.thread_time()
    await asyncio.gather(*(client(number) for number in range(clients)))
    spent = time.thread_time() - started
    for transport in opened:
        transport.close()
    server.close()
    return spent / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--wait-ms", type=float, default=80.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternated; the median is reported")
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"transport in the scope": [], "task awaiting receive": []}
    for _ in range(args.repeat):
        for name, with_transport in (("transport in the scope", True), ("task awaiting receive", False)):
            figures[name].append(uvloop.run(_run(args.requests, args.clients, args.wait_ms / 1000, with_transport)))
    for name, values in figures.items():
        print(f"{name:24s} {statistics.median(values) * 1e6:6.1f} us of loop CPU per request "
              f"[{min(values) * 1e6:.1f}, {max(values) * 1e6:.1f}]")


if __name__ == "__main__":
    main()
