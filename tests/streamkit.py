"""Connected stream pairs for the tests of transports and what runs on them.

Each pair is two ends of one real loopback TCP connection, wrapped as the
gateway (server side) and the agent (client side) wrap them: plain TCP, or
TLS with the gateway's self-signed identity pinned by the agent. A test
module takes the ``pair`` fixture with ``pair = streamkit.pair``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tunnelgate import tls
from tunnelgate.transport import SocketStream, Stream, TLSStream

Pair = tuple[Stream, Stream]  # (server side, client side)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of non-blocking loopback TCP sockets (socketpair() is AF_UNIX)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    return server, client


async def plain(_: Path) -> Pair:
    server, client = tcp_pair()
    return SocketStream(server), SocketStream(client)


async def tls_pinned(state_dir: Path, fingerprint: str | None = None) -> Pair:
    """TLS as the gateway's self-signed identity and an agent pinning it make it."""
    cert, key, _ = tls.ensure_self_signed(state_dir, [])
    server_sock, client_sock = tcp_pair()
    server = TLSStream(SocketStream(server_sock), tls.server_context(cert, key), server_side=True)
    pin = fingerprint or tls.certificate_fingerprint(cert)
    client = TLSStream(SocketStream(client_sock), tls.client_context(None, pin), server_side=False)
    await handshake(server, client)
    try:
        tls.check_fingerprint(client.peer_certificate(), pin)
    except BaseException:
        server.close()
        client.close()
        raise
    return server, client


async def handshake(server: TLSStream, client: TLSStream) -> None:
    """Both ends' TLS handshakes at once; both closed if either fails."""
    try:
        await asyncio.gather(server.handshake(), client.handshake())
    except BaseException:
        server.close()
        client.close()
        raise


MAKERS: dict[str, Callable[[Path], Awaitable[Pair]]] = {"plain": plain, "tls": tls_pinned}


@pytest.fixture(params=sorted(MAKERS))
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    """Every kind of stream, as a connected (server side, client side) pair."""
    streams = await MAKERS[request.param](tmp_path)
    yield streams
    for stream in streams:
        stream.close()


async def read_all(stream: Stream) -> bytes:
    """Everything until EOF."""
    buffer = memoryview(bytearray(100_000))
    data = bytearray()
    while n := await stream.receive_into(buffer):
        data += buffer[:n]
    return bytes(data)


async def read_exactly(stream: Stream, size: int) -> bytes:
    """``size`` bytes; fails at an EOF before them."""
    buffer = memoryview(bytearray(size))
    got = 0
    while got < size:
        n = await stream.receive_into(buffer[got:])
        assert n, f"EOF after {got} of {size} bytes"
        got += n
    return bytes(buffer)
