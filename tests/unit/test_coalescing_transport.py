"""The server's coalescing transport on a real event loop and a real socket pair."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

from service.server import CoalescingTransport, http_protocol


@asynccontextmanager
async def _connected() -> AsyncIterator[tuple[CoalescingTransport, asyncio.Transport, socket.socket]]:
    """A coalescing transport over one end of a socket pair; the other end is read directly."""
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
    try:
        yield CoalescingTransport(transport, loop), transport, peer
    finally:
        transport.close()
        peer.close()


async def _read_available(peer: socket.socket) -> list[bytes]:
    """What the peer's successive reads return once the loop has turned a few times."""
    for _ in range(3):
        await asyncio.sleep(0)
    chunks = []
    while True:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            return chunks
        if not chunk:
            chunks.append(b"<eof>")
            return chunks
        chunks.append(chunk)


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_writes_of_one_turn_leave_together_in_order(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def scenario() -> None:
        async with _connected() as (coalescing, _, peer):
            coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            coalescing.write(b"hello")
            with pytest.raises(BlockingIOError):  # nothing is sent before the loop turns
                peer.recv(65536)
            assert await _read_available(peer) == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
            coalescing.write(b"second")  # a later turn's write is its own send
            assert await _read_available(peer) == [b"second"]

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(scenario())


def test_close_sends_what_is_held_first_and_a_closed_peer_drops_it() -> None:
    async def scenario() -> None:
        async with _connected() as (coalescing, _, peer):
            coalescing.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            coalescing.close()
            assert await _read_available(peer) == [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"<eof>"]
        async with _connected() as (coalescing, transport, peer):
            coalescing.write(b"late answer")
            transport.close()  # the connection went away before the loop turned
            assert await _read_available(peer) == [b"<eof>"]
            assert coalescing.is_closing()  # everything else is the transport's own

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_the_server_uses_it_with_httptools() -> None:
    protocol = http_protocol()
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert isinstance(protocol, type) and issubclass(protocol, HttpToolsProtocol)
