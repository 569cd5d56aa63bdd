"""Disconnect-aware waiting: queued items of a client that went away are dropped; quick answers never
start a connection watcher."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from service.batching.batcher import PendingRequest
from service.deps import CONNECTION, until_disconnect, waiting_on
from service.errors import ApiError, ErrorKind


def _pending(loop: asyncio.AbstractEventLoop) -> PendingRequest:
    return PendingRequest(loop=loop, future=loop.create_future(), results=[None], remaining=1)


class Connection:
    """An ASGI receive: the body was read; `http.disconnect` comes after `leaves_after` seconds."""

    def __init__(self, leaves_after: float) -> None:
        self.leaves_after = leaves_after
        self.calls = 0

    async def receive(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(self.leaves_after)
        return {"type": "http.disconnect"}


def test_a_client_that_leaves_drops_its_queued_items() -> None:
    connection = Connection(leaves_after=0.05)

    async def scenario() -> PendingRequest:
        pending = _pending(asyncio.get_running_loop())  # never answered: queued behind long batches
        request = SimpleNamespace(scope={}, receive=connection.receive)
        with pytest.raises(ApiError) as raised:
            await asyncio.wait_for(until_disconnect(request, after=0.01)(pending), timeout=5)
        assert raised.value.kind == ErrorKind.CANCELLED
        return pending

    pending = asyncio.run(scenario())
    assert pending.cancelled and connection.calls == 1


def test_a_quick_answer_never_watches_the_connection() -> None:
    connection = Connection(leaves_after=0.0)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        pending = _pending(loop)
        loop.call_later(0.01, pending.future.set_result, ["vector"])
        results = await until_disconnect(SimpleNamespace(scope={}, receive=connection.receive), after=0.2)(pending)
        await asyncio.sleep(0.3)  # past the watch delay: the timer was cancelled with the answer
        return results

    assert asyncio.run(scenario()) == ["vector"]
    assert connection.calls == 0


def test_a_slow_answer_from_a_client_that_stays_is_returned() -> None:
    connection = Connection(leaves_after=10.0)

    async def scenario() -> tuple[list[Any], PendingRequest]:
        loop = asyncio.get_running_loop()
        pending = _pending(loop)
        loop.call_later(0.1, pending.future.set_result, ["late"])
        request = SimpleNamespace(scope={}, receive=connection.receive)
        return await until_disconnect(request, after=0.01)(pending), pending

    results, pending = asyncio.run(scenario())
    assert results == ["late"] and not pending.cancelled and connection.calls == 1


def test_many_waits_share_one_timer_and_each_is_judged_alone() -> None:
    leaving = [Connection(leaves_after=0.02) for _ in range(10)]
    quick = [Connection(leaves_after=0.0) for _ in range(10)]

    async def scenario() -> tuple[list[Any], list[Any], int]:
        loop = asyncio.get_running_loop()
        pendings = [_pending(loop) for _ in range(20)]
        for number, pending in enumerate(pendings[10:]):
            loop.call_later(0.001 * number, pending.future.set_result, [number])
        waits = [until_disconnect(SimpleNamespace(scope={}, receive=connection.receive), after=0.05)(pending)
                 for connection, pending in zip(leaving + quick, pendings, strict=True)]
        outcomes = await asyncio.gather(*waits, return_exceptions=True)
        return outcomes, pendings, len(waiting_on(loop).deadlines)

    outcomes, pendings, still_waiting = asyncio.run(scenario())
    assert all(isinstance(outcome, ApiError) and outcome.kind == ErrorKind.CANCELLED for outcome in outcomes[:10])
    assert outcomes[10:] == [[number] for number in range(10)]
    assert all(pending.cancelled for pending in pendings[:10]) and not any(p.cancelled for p in pendings[10:])
    assert [connection.calls for connection in leaving] == [1] * 10
    assert [connection.calls for connection in quick] == [0] * 10
    assert still_waiting == 0


async def _loopback_pair() -> tuple[asyncio.BaseTransport, asyncio.BaseTransport, asyncio.AbstractServer]:
    """A real TCP connection on 127.0.0.1: (the server side's transport, the client's, the server)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    return await accepted, client, server


def test_with_the_connection_in_the_scope_a_closed_connection_is_seen_without_receive() -> None:
    connection = Connection(leaves_after=10.0)  # receive would not tell in time

    async def scenario() -> PendingRequest:
        loop = asyncio.get_running_loop()
        transport, client, server = await _loopback_pair()
        pending = _pending(loop)
        loop.call_later(0.1, client.close)
        request = SimpleNamespace(scope={CONNECTION: transport}, receive=connection.receive)
        try:
            with pytest.raises(ApiError) as raised:
                await asyncio.wait_for(until_disconnect(request, after=0.02)(pending), timeout=5)
        finally:
            server.close()
        assert raised.value.kind == ErrorKind.CANCELLED
        assert len(waiting_on(loop).deadlines) == 0
        return pending

    assert asyncio.run(scenario()).cancelled
    assert connection.calls == 0


def test_with_the_connection_in_the_scope_a_client_that_stays_gets_its_answer() -> None:
    connection = Connection(leaves_after=0.0)  # receive would say it left: it must not be asked

    async def scenario() -> tuple[list[Any], PendingRequest, int]:
        loop = asyncio.get_running_loop()
        transport, client, server = await _loopback_pair()
        pending = _pending(loop)
        loop.call_later(0.2, pending.future.set_result, ["late"])  # looked at several times meanwhile
        request = SimpleNamespace(scope={CONNECTION: transport}, receive=connection.receive)
        try:
            results = await until_disconnect(request, after=0.02)(pending)
        finally:
            client.close()
            server.close()
        return results, pending, len(waiting_on(loop).deadlines)

    results, pending, still_waiting = asyncio.run(scenario())
    assert results == ["late"] and not pending.cancelled and still_waiting == 0
    assert connection.calls == 0
