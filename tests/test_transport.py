"""The transport package: one conformance suite that every stream passes, then
what is particular to TCP (dialing, listening), TLS and the splice pipes.

Each stream test runs on a connected pair of real loopback TCP sockets,
wrapped as the gateway (server side) and the agent (client side) wrap them
(``streamkit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from pathlib import Path

import pytest
import streamkit
import trustme
from kit.waiting import wait_until
from streamkit import Pair, handshake, read_all, read_exactly, tcp_pair, tls_pinned

from tunnelgate import tls
from tunnelgate.address import Address
from tunnelgate.errors import PeerVerificationError, TransportError
from tunnelgate.transport import (
    SPLICE_AVAILABLE,
    Pipe,
    SocketStream,
    SpliceableStream,
    Stream,
    TLSStream,
    WouldBlock,
    connect,
    open_listener,
)
from tunnelgate.transport.tcp import KEEPALIVE_IDLE

pytestmark = pytest.mark.timeout(30)

TRANSPORT = Path(__file__).resolve().parents[1] / "src" / "tunnelgate" / "transport"

pair = streamkit.pair  # every kind of stream


# --- the conformance suite: every stream ------------------------------------


async def test_stream_carries_bytes_in_order_both_ways(pair: Pair) -> None:
    """Several MiB each way at once arrive whole and in order, whatever the chunk sizes."""
    server, client = pair
    up, down = os.urandom(3 << 20), os.urandom(3 << 20)

    async def send(stream: Stream, data: bytes) -> None:
        view, pos, size = memoryview(data), 0, 1
        while pos < len(data):
            await stream.send(view[pos : pos + size])
            pos, size = pos + size, size * 3 % 300_007 + 1
        stream.send_eof()

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
    assert await server.receive_into(memoryview(bytearray(10))) == 0  # and 0 again


async def test_stream_send_eof_is_idempotent_and_the_other_direction_flows(pair: Pair) -> None:
    """After send_eof (twice) the peer reads to EOF, and can still answer at length."""
    server, client = pair
    await client.send(b"request")
    client.send_eof()
    client.send_eof()
    assert await read_all(server) == b"request"
    reply = os.urandom(1 << 20)
    _, answer = await asyncio.gather(server.send(reply), read_exactly(client, len(reply)))
    assert answer == reply
    server.send_eof()
    assert await read_all(client) == b""


async def test_stream_abort_is_seen_as_an_error_by_the_peer(pair: Pair) -> None:
    """An aborted stream resets the connection: the peer's next receive fails or ends."""
    server, client = pair
    await server.send(b"x" * 1000)
    client.abort()  # unread data pending: the kernel sends RST
    with pytest.raises(TransportError):
        async with asyncio.timeout(5):
            await read_all(server)
            await server.send(b"y")  # a reset may surface on the next send instead


async def test_stream_abort_gives_the_peer_a_reset(pair: Pair) -> None:
    """The peer of an aborted stream sees it close, with a reset pending, never a clean end."""
    server, client = pair
    with server.watch_peer_close() as closed:
        assert not closed.done()
        client.abort()
        await asyncio.wait_for(closed, 5)
    error = server.pending_error()
    assert error is not None and "reset" in str(error)
    assert not server.is_quiet()


async def test_stream_watch_peer_close_sees_a_half_close(pair: Pair) -> None:
    """A FIN from the peer is seen without reading, and is no error."""
    server, client = pair
    with server.watch_peer_close() as closed:
        await asyncio.sleep(0.01)
        assert not closed.done()
        client.send_eof()
        await asyncio.wait_for(closed, 5)
    assert server.pending_error() is None


@pytest.mark.parametrize("event", ["byte", "eof", "reset"])
async def test_stream_is_quiet_until_anything_arrives(pair: Pair, event: str) -> None:
    """A stream nothing arrived on is quiet; a byte, an EOF or a reset each end that."""
    server, client = pair
    assert server.is_quiet()
    assert not server.has_unread_bytes()
    if event == "byte":
        await client.send(b"!")
    elif event == "eof":
        client.send_eof()
    else:
        client.abort()
    await wait_until(lambda: not server.is_quiet(), what=f"the {event} to be seen")
    assert server.has_unread_bytes() == (event == "byte")


async def test_stream_is_quiet_again_once_read(pair: Pair) -> None:
    """Bytes read leave nothing behind: quiet again, nothing unread."""
    server, client = pair
    await client.send(b"ping")
    assert await read_exactly(server, 4) == b"ping"
    assert server.is_quiet()
    assert not server.has_unread_bytes()


async def test_stream_peer_information(pair: Pair) -> None:
    """Each end's peer address is the other's local one; a certificate only under TLS."""
    server, client = pair
    assert server.peer_address() == client.local_address() != ""
    assert client.peer_address() == server.local_address() != ""
    assert server.peer_address().startswith("127.0.0.1:")
    if isinstance(client, TLSStream):
        assert client.peer_certificate() is not None
        assert server.peer_certificate() is None  # the agent showed none
    else:
        assert client.peer_certificate() is None and server.peer_certificate() is None
    assert client.peer_certificate_names() == frozenset()  # pinned, not verified by a CA
    assert server.peer_certificate_names() == frozenset()
    client.abort()
    assert client.peer_address() == client.local_address() == ""


async def test_stream_try_receive_into_would_block_then_takes_what_came(pair: Pair) -> None:
    """Without bytes a non-blocking receive raises WouldBlock; once readable it takes them."""
    server, client = pair
    buffer = memoryview(bytearray(100))
    with pytest.raises(WouldBlock):
        server.try_receive_into(buffer)
    await client.send(b"hello")
    got = b""
    while len(got) < 5:
        await server.wait_readable()
        with contextlib.suppress(WouldBlock):  # TLS: a record may still be on its way
            n = server.try_receive_into(buffer)
            assert n
            got += bytes(buffer[:n])
    assert got == b"hello"
    client.send_eof()
    await server.wait_readable()
    while True:
        with contextlib.suppress(WouldBlock):
            assert server.try_receive_into(buffer) == 0  # EOF
            break
        await server.wait_readable()


async def test_stream_try_send_fills_up_and_resumes_with_the_same_bytes(pair: Pair) -> None:
    """try_send takes bytes until the peer stops reading (then 0); offered the rest
    again once writable, everything arrives in order."""
    server, client = pair
    data = memoryview(os.urandom(64 << 20))  # more than loopback's socket buffers hold
    pos = 0
    while (sent := client.try_send(data[pos : pos + (256 << 10)])) > 0:
        pos += sent
    assert 0 < pos < len(data), "the peer reads nothing, so the socket must fill up"

    async def send_rest() -> None:
        nonlocal pos
        while pos < len(data):
            sent = client.try_send(data[pos : pos + (256 << 10)])
            if sent:
                pos += sent
            else:
                await client.wait_writable()
        client.send_eof()

    _, received = await asyncio.gather(send_rest(), read_all(server))
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


async def test_stream_wait_delivered_returns_once_the_peer_has_everything(pair: Pair) -> None:
    """wait_delivered returns once the peer's kernel acknowledged all bytes sent."""
    server, client = pair
    data = os.urandom(1 << 20)
    await asyncio.gather(client.send(data), read_exactly(server, len(data)))
    await asyncio.wait_for(client.wait_delivered(), 5)


async def test_stream_capabilities_for_the_relay(pair: Pair) -> None:
    """Plain TCP hands out its descriptor for splicing and reads all that is
    ready at once; TLS cannot splice (the cipher must see every byte), and
    holding nothing it says so (on this CPython the SSL pointer check passes)."""
    for stream in pair:
        assert stream.fileno() >= 0
        if isinstance(stream, TLSStream):
            assert not isinstance(stream, SpliceableStream)
            assert stream.reads_all_ready
        else:
            assert isinstance(stream, SpliceableStream)
            assert stream.fd_for_splice() == stream.fileno()
            assert stream.reads_all_ready


# --- TLS ----------------------------------------------------------------------


async def test_tls_reader_that_stops_when_all_ready_leaves_no_record_behind(
    tmp_path: Path,
) -> None:
    """OpenSSL reads ahead: records it holds wake no reader. A reader that reads
    until reads_all_ready gets them all, and then there is nothing left to read."""
    server, client = await tls_pinned(tmp_path)
    try:
        sent = [bytes([n]) * 100 for n in range(1, 4)]
        for record in sent:  # one record each
            assert client.try_send(record) == len(record)
        await asyncio.wait_for(client.wait_delivered(), 5)  # all in the server's kernel now
        buffer = memoryview(bytearray(1000))
        reads = []
        while True:
            n = server.try_receive_into(buffer)
            reads.append(bytes(buffer[:n]))
            if server.reads_all_ready:
                break
        assert b"".join(reads) == b"".join(sent)
        assert len(reads) > 1, "one record per read: the later ones were held"
        with pytest.raises(WouldBlock):
            server.try_receive_into(buffer)
        server.close()
        assert not server.reads_all_ready  # closed: it cannot say
    finally:
        server.close()
        client.close()


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
    server = TLSStream(SocketStream(server_sock), tls.server_context(cert, key), server_side=True)
    client_sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(TransportError, match="TLS handshake failed"):
        await asyncio.wait_for(server.handshake(), 5)
    server.close()
    client_sock.close()


async def test_tls_verified_client_certificate_names_the_agent(tmp_path: Path) -> None:
    """With a client CA, the server side names the agent its verified certificate is for."""
    ca = trustme.CA()
    gateway_cert, agent_cert = ca.issue_cert("gateway.test"), ca.issue_cert("site-a")
    paths = {}
    for name, blob in {
        "ca": ca.cert_pem,
        "gw.crt": gateway_cert.cert_chain_pems[0],
        "gw.key": gateway_cert.private_key_pem,
        "agent.crt": agent_cert.cert_chain_pems[0],
        "agent.key": agent_cert.private_key_pem,
    }.items():
        paths[name] = tmp_path / name
        blob.write_to_path(str(paths[name]))
    server_context = tls.server_context(paths["gw.crt"], paths["gw.key"], paths["ca"])
    client_context = tls.client_context(paths["ca"], "", paths["agent.crt"], paths["agent.key"])
    server_sock, client_sock = tcp_pair()
    server = TLSStream(SocketStream(server_sock), server_context, server_side=True)
    client = TLSStream(
        SocketStream(client_sock),
        client_context,
        server_side=False,
        server_hostname="gateway.test",
    )
    await handshake(server, client)
    try:
        assert server.peer_certificate_names() == frozenset({"site-a"})
        assert client.peer_certificate_names() == frozenset({"gateway.test"})
        assert server.peer_certificate() is not None
    finally:
        server.close()
        client.close()


async def test_tls_session_resumes_on_a_second_connection(tmp_path: Path) -> None:
    """A data channel given the control channel's session resumes it, as the agent does."""
    cert, key, _ = tls.ensure_self_signed(tmp_path, [])
    server_context = tls.server_context(cert, key)
    client_context = tls.client_context(None, tls.certificate_fingerprint(cert))
    sessions = []
    for _ in range(2):
        server_sock, client_sock = tcp_pair()
        server = TLSStream(SocketStream(server_sock), server_context, server_side=True)
        client = TLSStream(
            SocketStream(client_sock),
            client_context,
            server_side=False,
            session=sessions[-1] if sessions else None,
        )
        await handshake(server, client)
        await server.send(b"x")  # the ticket comes before it
        assert await read_exactly(client, 1) == b"x"
        sessions.append(client.session)
        reused = client.session_reused
        server.close()
        client.close()
    assert reused


def test_tls_contexts_read_ahead_where_openssl_allows() -> None:
    """Both sides' contexts get OpenSSL's read-ahead (several records per recv);
    on this CPython the SSL_CTX pointer check passes, so the tuning applies."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert tls.tune_reads(context)
    assert tls.tune_reads(context)  # idempotent


# --- TCP: dialing and listening -----------------------------------------------


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
        stream = await connect(Address(host, port), timeout=5)
        accepted, _ = await loop.sock_accept(listener)
        with accepted:
            await stream.send(b"hi")
            assert await loop.sock_recv(accepted, 2) == b"hi"
            stream.close()
    finally:
        listener.close()


async def test_connect_refused_is_a_transport_error() -> None:
    """A dial to a port nobody listens on fails with the address and the reason."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    with pytest.raises(TransportError, match=f"cannot connect to 127.0.0.1:{port}: .*refused"):
        await connect(Address("127.0.0.1", port), timeout=5)


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
                stream = await dialing
                stream.close()  # connect() had returned: a clean end, and not the case here
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


async def test_listener_hands_out_streams_of_accepted_connections() -> None:
    """accept_forever hands each connection over as a stream, with the peer's
    address, tuned like every relayed connection (no Nagle delay)."""
    listener = open_listener("127.0.0.1", 0)
    accepted: asyncio.Queue[tuple[SocketStream, str]] = asyncio.Queue()

    def on_error(exc: TransportError) -> None:
        raise AssertionError(f"accept failed: {exc}")

    accepting = asyncio.create_task(
        listener.accept_forever(lambda s, peer: accepted.put_nowait((s, peer)), on_error)
    )
    try:
        client = await connect(listener.address, timeout=5)
        stream, peer = await asyncio.wait_for(accepted.get(), 5)
        assert peer == client.local_address() == stream.peer_address()
        assert stream.local_address() == str(listener.address)
        with socket.socket(fileno=os.dup(stream.fileno())) as view:
            assert view.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert view.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert view.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        await client.send(b"hello")
        assert await read_exactly(stream, 5) == b"hello"
        stream.close()
        client.close()
    finally:
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        listener.close()


async def test_a_listener_that_resets_accepted_connections_arms_each_one() -> None:
    """With reset_accepted, each accepted connection starts armed to reset (SO_LINGER 0,
    inherited from the listener: no call per connection), and still ends with a FIN when
    closed on purpose."""
    listener = open_listener("127.0.0.1", 0, reset_accepted=True)
    accepted: asyncio.Queue[SocketStream] = asyncio.Queue()
    accepting = asyncio.create_task(
        listener.accept_forever(lambda s, _: accepted.put_nowait(s), lambda exc: None)
    )
    try:
        client = await connect(listener.address, timeout=5)
        stream = await asyncio.wait_for(accepted.get(), 5)
        with socket.socket(fileno=os.dup(stream.fileno())) as view:
            linger = struct.unpack("ii", view.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
        assert linger == (1, 0)
        stream.reset_unless_closed_cleanly()  # already: nothing changes
        stream.close()
        assert await read_all(client) == b""
        client.close()
    finally:
        accepting.cancel()
        await asyncio.gather(accepting, return_exceptions=True)
        listener.close()


def test_open_listener_on_a_taken_port_is_a_transport_error() -> None:
    """Listening where another socket listens fails with the address and the reason."""
    first = open_listener("127.0.0.1", 0)
    try:
        where = str(first.address)
        with pytest.raises(TransportError, match=f"cannot listen on {where}: address already"):
            open_listener("127.0.0.1", first.address.port)
    finally:
        first.close()


async def test_reset_unless_closed_cleanly_resets_until_closed() -> None:
    """A relayed connection armed to reset ends with a reset when dropped (as when
    the process dies), and still with a FIN when closed on purpose."""
    for closing, seen in (("drop", "reset"), ("close", "clean end")):
        server_sock, client_sock = tcp_pair()
        stream, peer = SocketStream(server_sock), SocketStream(client_sock)
        stream.reset_unless_closed_cleanly()
        if closing == "drop":
            server_sock.close()  # what the kernel does for a dying process
        else:
            stream.close()
        try:
            outcome = "clean end" if await read_all(peer) == b"" else "bytes"
        except TransportError:
            outcome = "reset"
        peer.close()
        assert outcome == seen, closing


# --- splice pipes -------------------------------------------------------------


@pytest.mark.skipif(not SPLICE_AVAILABLE, reason="no os.splice here")
async def test_pipe_moves_bytes_between_descriptors() -> None:
    """A pipe fills from one stream's descriptor and drains into another's;
    an empty source would block, and EOF fills nothing."""
    a_server, a_client = (SocketStream(s) for s in tcp_pair())
    b_server, b_client = (SocketStream(s) for s in tcp_pair())
    pipe = Pipe(1 << 20, 1 << 20)
    try:
        with pytest.raises(WouldBlock):
            pipe.fill_from(a_server.fd_for_splice(), pipe.size)
        data = os.urandom(100_000)
        await a_client.send(data)
        moved = 0
        while moved < len(data):
            await a_server.wait_readable()
            with contextlib.suppress(WouldBlock):
                moved += pipe.fill_from(a_server.fd_for_splice(), pipe.size)
            while pipe.count:
                pipe.drain_into(b_server.fd_for_splice())
        assert await read_exactly(b_client, len(data)) == data
        a_client.send_eof()
        await a_server.wait_readable()
        assert pipe.fill_from(a_server.fd_for_splice(), pipe.size) == 0
    finally:
        pipe.close()
        for stream in (a_server, a_client, b_server, b_client):
            stream.close()
