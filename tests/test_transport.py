"""One conformance suite that every transport (plain TCP, TLS) passes.

Each test runs on a connected pair of real loopback TCP sockets, wrapped as
the gateway (server side) and the agent (client side) wrap them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from conftest import wait_until

from tunnelgate import tls
from tunnelgate.config import Address
from tunnelgate.errors import PeerVerificationError, TransportError
from tunnelgate.protocol import Ping
from tunnelgate.transport import (
    Channel,
    SocketStream,
    Stream,
    TLSStream,
    connect,
    shutdown_write,
)

pytestmark = pytest.mark.timeout(30)

Pair = tuple[Stream, Stream]


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
    cert, key, _ = tls.ensure_self_signed(state_dir, [])
    server_sock, client_sock = tcp_pair()
    server = TLSStream(server_sock, tls.server_context(cert, key), server_side=True)
    pin = fingerprint or tls.certificate_fingerprint(cert)
    client = TLSStream(client_sock, tls.client_context(None, pin), server_side=False)
    try:
        await asyncio.gather(server.handshake(), client.handshake())
        tls.check_fingerprint(client.peer_certificate(), pin)
    except BaseException:
        server.close()
        client.close()
        raise
    return server, client


MAKERS: dict[str, Callable[[Path], Awaitable[Pair]]] = {"plain": plain, "tls": tls_pinned}


@pytest.fixture(params=sorted(MAKERS))
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    streams = await MAKERS[request.param](tmp_path)
    yield streams
    for stream in streams:
        stream.close()


async def read_all(stream: Stream) -> bytes:
    buffer = memoryview(bytearray(100_000))
    data = bytearray()
    while n := await stream.receive_into(buffer):
        data += buffer[:n]
    return bytes(data)


async def test_stream_carries_bytes_in_order_both_ways(pair: Pair) -> None:
    """Several MiB each way at once arrive whole and in order, whatever the chunk sizes."""
    server, client = pair
    up, down = os.urandom(3 << 20), os.urandom(3 << 20)

    async def send(stream: Stream, data: bytes) -> None:
        view, pos, size = memoryview(data), 0, 1
        while pos < len(data):
            await stream.send(view[pos : pos + size])
            pos, size = pos + size, size * 3 % 300_007 + 1
        shutdown_write(stream.sock)

    received = await asyncio.gather(
        send(client, up), send(server, down), read_all(server), read_all(client)
    )
    assert hashlib.sha256(received[2]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(received[3]).digest() == hashlib.sha256(down).digest()


async def test_stream_receive_returns_zero_after_peer_closes(pair: Pair) -> None:
    """A peer that closes after sending yields its bytes, then 0 (EOF), not an error."""
    server, client = pair
    await client.send(b"last words")
    client.close()
    assert await read_all(server) == b"last words"


async def test_stream_half_close_keeps_the_other_direction_flowing(pair: Pair) -> None:
    """After a FIN the peer reads to EOF and can still answer at length (under TLS
    too: a bare FIN without close_notify ends only the sender's direction)."""
    server, client = pair
    await client.send(b"request")
    shutdown_write(client.sock)
    assert await read_all(server) == b"request"
    reply = os.urandom(1 << 20)
    buffer = memoryview(bytearray(len(reply)))

    async def read_reply() -> None:
        got = 0
        while got < len(reply):
            n = await client.receive_into(buffer[got:])
            assert n, f"EOF after {got} bytes"
            got += n

    await asyncio.gather(server.send(reply), read_reply())
    assert bytes(buffer) == reply


async def test_stream_abort_is_seen_as_an_error_by_the_peer(pair: Pair) -> None:
    """An aborted stream resets the connection: the peer's next receive fails or ends."""
    server, client = pair
    await server.send(b"x" * 1000)
    client.abort()  # unread data pending: the kernel sends RST
    with pytest.raises(TransportError):
        async with asyncio.timeout(5):
            await read_all(server)
            await server.send(b"y")  # a reset may surface on the next send instead


async def test_channel_carries_messages_and_checks_liveness(pair: Pair) -> None:
    """Framed messages round-trip; a silent channel is idle and open, a closed one is not."""
    server, client = pair
    agent_side, gateway_side = Channel(client), Channel(server)
    await agent_side.send_message(Ping(7))
    assert await gateway_side.receive() == Ping(7)
    assert gateway_side.is_idle_and_open()
    agent_side.close()
    await wait_until(lambda: not gateway_side.is_idle_and_open(), what="the close to be seen")


async def test_tls_refuses_a_gateway_with_another_fingerprint(tmp_path: Path) -> None:
    """A pinned fingerprint that does not match names both fingerprints and refuses."""
    wrong = "SHA256:" + "AB" * 32
    with pytest.raises(PeerVerificationError) as caught:
        await tls_pinned(tmp_path, wrong)
    assert wrong in str(caught.value) and "SHA256:" in caught.value.seen


async def test_tls_handshake_with_plain_bytes_fails_cleanly(tmp_path: Path) -> None:
    """A TLS server fed plain bytes fails its handshake with a TransportError."""
    cert, key, _ = tls.ensure_self_signed(tmp_path, [])
    server_sock, client_sock = tcp_pair()
    server = TLSStream(server_sock, tls.server_context(cert, key), server_side=True)
    client_sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(TransportError, match="TLS handshake failed"):
        await asyncio.wait_for(server.handshake(), 5)
    server.close()
    client_sock.close()


def test_tls_contexts_read_ahead_where_openssl_allows() -> None:
    """Both sides' contexts get OpenSSL's read-ahead (several records per recv);
    on this CPython the SSL_CTX pointer check passes, so the tuning applies."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert tls.tune_reads(context)
    assert tls.tune_reads(context)  # idempotent


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_connect_reaches_ip_literals_and_names(host: str) -> None:
    """IP literals are dialed without the resolver, names through it; both connect."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    except OSError:
        listener.close()
        pytest.skip(f"no loopback address for {host}")
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        sock = await connect(Address(host, port), timeout=5)
        accepted, _ = await loop.sock_accept(listener)
        with sock, accepted:
            await loop.sock_sendall(sock, b"hi")
            assert await loop.sock_recv(accepted, 2) == b"hi"
    finally:
        listener.close()


async def test_connect_cancelled_after_connecting_resets_the_peer() -> None:
    """A dial cancelled once the kernel has connected (a session ending while an
    agent dials its service) ends with a reset at the peer, never with a clean,
    empty connection that would look like a finished exchange."""
    outcomes: list[str] = []

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outcomes.append("clean end" if await reader.read(100) == b"" else "bytes")
        except OSError:
            outcomes.append("reset")
        finally:
            writer.close()

    server = await asyncio.start_server(service, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        for steps in (1, 1, 2, 2, 3):
            dialing = asyncio.create_task(connect(Address("127.0.0.1", port), 5))
            for _ in range(steps):  # the connect is under way; on loopback, done in the kernel
                await asyncio.sleep(0)
            dialing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                sock = await dialing
                sock.close()  # connect() had returned: a clean end, and not the case here
                outcomes.append("returned")
        # A last, ordinary connection closed cleanly: once its end is seen, the
        # service has seen every earlier one (accepted in order, reset at once).
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await wait_until(lambda: outcomes.count("clean end") > outcomes.count("returned"))
    assert outcomes.count("clean end") == outcomes.count("returned") + 1, outcomes
    if os.environ.get("TUNNELGATE_LOOP") != "uvloop":
        # The stock loop has the kernel connect within these steps; uvloop's
        # cancelled dials may never reach it, which proves nothing either way.
        assert "reset" in outcomes, outcomes
