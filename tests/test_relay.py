"""The relay on its own: a local TCP socket on one side, a data channel on the
other, and no gateway or agent. The far end of the channel is framed by hand
(DATA, END and ABORT frames in, decoded events out), as a peer relay would;
both ends are real loopback TCP connections on port 0. Every test runs on
both of the relay's paths for plain channels: ``os.splice`` and the copy."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from kit.waiting import wait_until

from tunnelgate.channel import Channel
from tunnelgate.errors import RemoteProtocolError
from tunnelgate.protocol.session import Side, State
from tunnelgate.protocol.wire import (
    END_FRAME,
    HEADER_SIZE,
    Abort,
    Data,
    End,
    Finished,
    FrameDecoder,
    encode_abort,
    encode_message,
    pack_data_header,
)
from tunnelgate.relay import CHUNK_SIZE, PIPE_SIZE, RelayResult, relay
from tunnelgate.transport import SPLICE_AVAILABLE, SocketStream

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_unexpected_errors")]

READ_SIZE = 1 << 16
CONN = 41  # the connection the channel carries (its Start's)
QUIET = 0.3  # a writer that made no progress for this long is stalled
SMALL_BUFFER = 64 * 1024  # socket buffers of the backpressure tests: a stall comes soon


# --- both ends, by hand ------------------------------------------------------------


def tcp_pair(buffer_size: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection (port 0), non-blocking; with
    ``buffer_size``, both ends' kernel buffers are fixed to about that."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        if buffer_size is not None:
            for sock in (listener, client):  # before the handshake, for the window
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        client.connect(listener.getsockname())  # loopback: complete once queued
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def data_frame(payload: bytes) -> bytes:
    frame = bytearray(HEADER_SIZE) + payload
    pack_data_header(frame, len(payload))
    return bytes(frame)


@dataclass
class FarEnd:
    """The channel's far end: what a peer relay would send, and what it saw."""

    sock: socket.socket
    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    data: bytearray = field(default_factory=bytearray)
    events: list[str] = field(default_factory=list)  # "end", "abort: <reason>"

    async def send(self, frame: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    async def read_until(self, done: Callable[[], object] = lambda: False) -> str | None:
        """Read and decode until ``done()``: None then; else how the connection
        ended first, "eof" or "reset"."""
        loop = asyncio.get_running_loop()
        buffer = memoryview(bytearray(READ_SIZE))
        while not done():
            try:
                n = await loop.sock_recv_into(self.sock, buffer)
            except ConnectionResetError:
                return "reset"
            if n == 0:
                return "eof"
            for event in self.decoder.feed(buffer[:n]):
                if isinstance(event, Data):
                    self.data += event.view  # valid until the next feed only
                elif isinstance(event, End):
                    self.events.append("end")
                elif isinstance(event, Abort):
                    self.events.append(f"abort: {event.reason}")
                else:
                    self.events.append(repr(event))
        return None


async def read_local(sock: socket.socket, received: bytearray, size: int | None = None) -> str:
    """Read the local peer's socket into ``received``, up to ``size`` bytes or
    its end: "eof", "reset", or "more" if ``size`` bytes came first."""
    loop = asyncio.get_running_loop()
    while size is None or len(received) < size:
        try:
            data = await loop.sock_recv(sock, READ_SIZE)
        except ConnectionResetError:
            return "reset"
        if not data:
            return "eof"
        received += data
    return "more"


@dataclass
class Relayed:
    """One relay at work, and the two peers the test drives."""

    client: socket.socket  # the local peer (a client, as on the gateway)
    far: FarEnd
    result: RelayResult
    task: asyncio.Task[RelayResult]
    sockets: tuple[socket.socket, ...]  # all four ends, the relay's two included
    channel: Channel

    async def finished(self) -> RelayResult:
        async with asyncio.timeout(10):
            return await self.task


@pytest.fixture(params=["splice", "copy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which path the relay takes for a plain channel (read at each relay)."""
    if request.param == "splice" and not SPLICE_AVAILABLE:
        pytest.skip("no os.splice here")
    monkeypatch.setenv("TUNNELGATE_NO_SPLICE", "0" if request.param == "splice" else "1")
    return str(request.param)


@pytest.fixture
def start_relay(path: str) -> Callable[..., contextlib.AbstractAsyncContextManager[Relayed]]:
    """``async with start_relay(buffer_size=None) as relayed``: a relay between a
    client and a hand-framed data channel (as on the gateway); afterwards
    every socket is closed and the relay's task is done."""

    @contextlib.asynccontextmanager
    async def start(
        buffer_size: int | None = None, keep_channel: bool = False
    ) -> AsyncIterator[Relayed]:
        client, local = tcp_pair(buffer_size)
        far_sock, near = tcp_pair(buffer_size)
        channel = Channel(SocketStream(near), Side.GATEWAY)
        channel.conversation.state, channel.conversation.conn = State.STARTED, CONN
        result = RelayResult()
        task = asyncio.create_task(
            relay(SocketStream(local), channel, "client", result, keep_channel=keep_channel)
        )
        try:
            sockets = (client, local, near, far_sock)
            yield Relayed(client, FarEnd(far_sock), result, task, sockets, channel)
            assert result.path == path
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for sock in (client, far_sock, local, near):
                sock.close()

    return start


StartRelay = Callable[..., contextlib.AbstractAsyncContextManager[Relayed]]


# --- bytes both ways, half-closes ---------------------------------------------------


async def test_relay_carries_bytes_both_ways_and_counts_them(start_relay: StartRelay) -> None:
    """What the client sends arrives as DATA frames, DATA frames arrive as bytes,
    both ends close cleanly, and the result counts the bytes each way."""
    loop = asyncio.get_running_loop()
    up, down = bytes(range(256)) * 4096, b"answer" * 50_000  # 1 MiB, 300 kB
    async with start_relay() as relayed, asyncio.timeout(10):
        await loop.sock_sendall(relayed.client, up)
        relayed.client.shutdown(socket.SHUT_WR)
        assert await relayed.far.read_until(lambda: relayed.far.events) is None
        assert relayed.far.events == ["end"]
        assert relayed.far.data == up
        await relayed.far.send(data_frame(down) + END_FRAME)
        received = bytearray()
        assert await read_local(relayed.client, received) == "eof"
        assert received == down
        result = await relayed.finished()
        assert await relayed.far.read_until() == "eof"
    assert (result.normal, result.sent, result.received) == (True, len(up), len(down))


async def test_relay_client_half_close_keeps_the_answer_flowing(start_relay: StartRelay) -> None:
    """A client's EOF goes on as END, and the service's answer still reaches it
    afterwards, however long, until the service's own END."""
    loop = asyncio.get_running_loop()
    async with start_relay() as relayed, asyncio.timeout(10):
        await loop.sock_sendall(relayed.client, b"request")
        relayed.client.shutdown(socket.SHUT_WR)
        await relayed.far.read_until(lambda: relayed.far.events)
        assert (relayed.far.data, relayed.far.events) == (b"request", ["end"])
        received = bytearray()
        for part in (b"first part", b"x" * 500_000, b"last part"):
            await relayed.far.send(data_frame(part))
            assert await read_local(relayed.client, received, len(received) + len(part)) == "more"
        await relayed.far.send(END_FRAME)
        assert await read_local(relayed.client, received) == "eof"
        assert received == b"first part" + b"x" * 500_000 + b"last part"
        assert (await relayed.finished()).normal


async def test_relay_service_half_close_keeps_the_upload_flowing(start_relay: StartRelay) -> None:
    """An END from the channel is an EOF for the client, whose own bytes still
    go through afterwards, until its EOF ends the relay cleanly."""
    loop = asyncio.get_running_loop()
    async with start_relay() as relayed, asyncio.timeout(10):
        await relayed.far.send(data_frame(b"greeting") + END_FRAME)
        received = bytearray()
        assert await read_local(relayed.client, received) == "eof"
        assert received == b"greeting"
        for part in (b"still", b"y" * 500_000, b"talking"):
            await loop.sock_sendall(relayed.client, part)
        relayed.client.shutdown(socket.SHUT_WR)
        assert await relayed.far.read_until(lambda: relayed.far.events) is None
        assert relayed.far.data == b"still" + b"y" * 500_000 + b"talking"
        assert relayed.far.events == ["end"]
        result = await relayed.finished()
    assert (result.normal, result.sent, result.received) == (True, 500_012, 8)


# --- backpressure ---------------------------------------------------------------------


@dataclass
class Flood:
    """A writer that sends numbered chunks as fast as its socket takes them,
    until told to stop; ``queued`` counts the chunk under way too."""

    send: Callable[[bytes], Awaitable[None]]
    queued: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    progress_at: float = 0.0
    stopping: bool = False

    async def run(self, chunk: bytes) -> None:
        loop = asyncio.get_running_loop()
        number = 0
        while not self.stopping:
            payload = number.to_bytes(8, "big") + chunk
            self.digest.update(payload)
            self.queued += len(payload)
            await self.send(payload)
            self.progress_at = loop.time()
            number += 1

    def stalled(self) -> bool:
        """No chunk went in for a while (nobody reads on the far side)."""
        return self.queued > 0 and asyncio.get_running_loop().time() - self.progress_at > QUIET


def in_flight_bound(socks: tuple[socket.socket, ...]) -> int:
    """The most bytes that can wait between a writer and a reader that stopped:
    the kernel buffers of the sockets on the way, and what the relay may hold
    (a pipe of spliced bytes, a chunk copied for a slow receiver)."""
    kernel = sum(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        + sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        for sock in socks
    )
    return kernel + PIPE_SIZE + 2 * CHUNK_SIZE


@pytest.mark.parametrize("stalled", ["client", "channel"])
async def test_relay_reader_that_stops_stalls_the_writer_with_bounded_memory(
    start_relay: StartRelay, stalled: str
) -> None:
    """A side that stops reading stalls the writer on the other side once the
    buffers on the way are full, without the relay's memory growing; once it
    reads again, every byte arrives, in order."""
    loop = asyncio.get_running_loop()
    async with start_relay(SMALL_BUFFER) as relayed, asyncio.timeout(30):
        far = relayed.far

        async def to_channel(payload: bytes) -> None:  # the client writes, the channel stalls
            await loop.sock_sendall(relayed.client, payload)

        async def to_client(payload: bytes) -> None:  # the channel writes, the client stalls
            await far.send(data_frame(payload))

        flood = Flood(to_client if stalled == "client" else to_channel)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            sending = asyncio.create_task(flood.run(bytes(60_000)))
            await wait_until(flood.stalled, timeout=20, what="the writer to stall")
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        flood.stopping = True  # after the chunk under way
        assert flood.queued < in_flight_bound(relayed.sockets), f"{flood.queued} bytes went in"
        assert grown < 4 * CHUNK_SIZE, f"{grown} bytes more allocated while stalled"

        if stalled == "client":
            received = bytearray()
            assert await read_local(relayed.client, received, flood.queued) == "more"
        else:
            assert await far.read_until(lambda: len(far.data) >= flood.queued) is None
            received = far.data
        await sending
        assert hashlib.sha256(received).digest() == flood.digest.digest()
        assert len(received) == flood.queued

        # Both ends finish cleanly, and the counts say what went each way.
        relayed.client.shutdown(socket.SHUT_WR)
        await far.read_until(lambda: far.events)
        assert far.events == ["end"]
        await far.send(END_FRAME)
        assert await read_local(relayed.client, bytearray()) == "eof"
        result = await relayed.finished()
    counted = result.received if stalled == "client" else result.sent
    assert (result.normal, counted) == (True, flood.queued)


# --- abnormal ends ----------------------------------------------------------------------


async def test_relay_client_reset_reaches_the_channel_after_its_last_bytes(
    start_relay: StartRelay,
) -> None:
    """A client that sends, then resets: its bytes go on as DATA, then an ABORT
    saying why, and the channel is closed; the result is not normal."""
    loop = asyncio.get_running_loop()
    async with start_relay() as relayed, asyncio.timeout(10):
        await loop.sock_sendall(relayed.client, b"last words")
        await relayed.far.read_until(lambda: len(relayed.far.data) >= 10)
        reset(relayed.client)
        assert await relayed.far.read_until() in ("eof", "reset")
        result = await relayed.finished()
    assert relayed.far.data == b"last words"
    assert relayed.far.events == ["abort: client connection reset by peer"]
    assert result.how == "client connection reset by peer"
    assert (result.normal, result.sent) == (False, 10)


@pytest.mark.parametrize("how", ["rst", "abort"])
async def test_relay_channel_reset_reaches_the_client_after_the_bytes_before_it(
    start_relay: StartRelay, how: str
) -> None:
    """A data channel that breaks (an RST, or an ABORT from the peer) right after
    its last DATA: the client reads those bytes first, then sees a reset."""
    async with start_relay() as relayed, asyncio.timeout(10):
        last = data_frame(b"the answer, before the end")
        if how == "rst":
            await relayed.far.send(last)
            reset(relayed.far.sock)
        else:
            await relayed.far.send(last + encode_abort("the service reset its connection"))
        received = bytearray()
        assert await read_local(relayed.client, received) == "reset"
        result = await relayed.finished()
    assert received == b"the answer, before the end"
    expected = (
        "data channel lost: connection reset by peer"
        if how == "rst"
        else "aborted by peer: the service reset its connection"
    )
    assert (result.how, result.received) == (expected, len(received))


async def test_relay_data_after_end_is_a_protocol_error_on_both_sides(
    start_relay: StartRelay,
) -> None:
    """DATA after the channel's END breaks the protocol: the peer is told why
    (ABORT), and the client, which saw a clean EOF, is reset."""
    async with start_relay() as relayed, asyncio.timeout(10):
        await relayed.far.send(END_FRAME)
        received = bytearray()
        assert await read_local(relayed.client, received) == "eof"
        await relayed.far.send(data_frame(b"too late"))
        await relayed.far.read_until(lambda: relayed.far.events)
        result = await relayed.finished()
        await wait_until(
            lambda: relayed.client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
            what="the client to be reset",
        )
    expected = "protocol error: unexpected data after end of stream"
    assert relayed.far.events == [f"abort: {expected}"]
    assert result.how == expected


# --- a channel kept for the next connection -----------------------------------------


async def end_both_ways(relayed: Relayed, behind_end: bytes = b"") -> RelayResult:
    """The client's request and half-close, the far end's answer, END and ``behind_end``
    in one write (so the relay reads them together), to the relay's end."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(relayed.client, b"request")
    relayed.client.shutdown(socket.SHUT_WR)
    assert await relayed.far.read_until(lambda: relayed.far.events) is None
    assert (relayed.far.data, relayed.far.events) == (b"request", ["end"])
    await relayed.far.send(data_frame(b"answer") + END_FRAME + behind_end)
    received = bytearray()
    assert await read_local(relayed.client, received) == "eof"
    assert received == b"answer"
    return await relayed.finished()


async def test_relay_keeps_a_cleanly_ended_channel_with_what_came_behind_the_end(
    start_relay: StartRelay,
) -> None:
    """With keep_channel, a relay that ended cleanly leaves the channel open, with the
    peer's Finished that arrived in the same read as its END; the end handshake then
    pools it, and the peer gets this side's Finished, not an EOF."""
    async with start_relay(keep_channel=True) as relayed, asyncio.timeout(10):
        result = await end_both_ways(relayed, encode_message(Finished(CONN)))
        assert (result.how, result.channel_kept) == ("normal", True)
        await relayed.channel.finish(CONN)
        assert relayed.channel.conversation.state is State.POOLED
        assert await relayed.far.read_until(lambda: len(relayed.far.events) > 1) is None
        assert relayed.far.events == ["end", repr(Finished(CONN))]
        assert relayed.channel.is_idle_and_open()


async def test_the_end_that_ends_a_kept_relay_carries_this_sides_finished(
    start_relay: StartRelay,
) -> None:
    """When the local peer's half-close is the relay's last step (the far end ended first),
    this side's Finished rides in the same write as its END; the end handshake then only
    waits for the peer's."""
    loop = asyncio.get_running_loop()
    async with start_relay(keep_channel=True) as relayed, asyncio.timeout(10):
        await relayed.far.send(data_frame(b"answer") + END_FRAME)
        received = bytearray()
        assert await read_local(relayed.client, received) == "eof"
        await loop.sock_sendall(relayed.client, b"thanks")
        relayed.client.shutdown(socket.SHUT_WR)
        result = await relayed.finished()
        assert result.channel_kept and relayed.channel.conversation.state is State.FINISHING
        assert await relayed.far.read_until(lambda: len(relayed.far.events) > 1) is None
        assert (relayed.far.data, relayed.far.events) == (b"thanks", ["end", repr(Finished(CONN))])
        await relayed.far.send(encode_message(Finished(CONN)))
        await relayed.channel.finish(CONN)
        assert relayed.channel.conversation.state is State.POOLED


async def test_relay_closes_the_channel_after_an_abnormal_end_even_to_keep_it(
    start_relay: StartRelay,
) -> None:
    """An ABORT ends the relay abnormally: the channel is not kept, whatever was asked."""
    async with start_relay(keep_channel=True) as relayed, asyncio.timeout(10):
        await relayed.far.send(encode_abort("the service reset its connection"))
        result = await relayed.finished()
        assert await relayed.far.read_until() in ("eof", "reset")
    assert result.how == "aborted by peer: the service reset its connection"
    assert not result.channel_kept


@pytest.mark.parametrize(
    "late",
    [data_frame(b"a late byte"), END_FRAME, encode_message(Finished(CONN - 1))],
    ids=["data", "end", "stale-finished"],
)
async def test_anything_but_the_peers_finished_after_a_clean_end_ends_the_channel(
    start_relay: StartRelay, late: bytes
) -> None:
    """After the relay's clean end the next frame must be the peer's Finished for this
    connection: a late DATA frame, a second END or another connection's Finished is the
    peer's protocol error, so the channel is not pooled and no byte of this connection
    can reach the next."""
    async with start_relay(keep_channel=True) as relayed, asyncio.timeout(10):
        result = await end_both_ways(relayed)
        assert result.channel_kept
        await relayed.far.send(late)
        with pytest.raises(RemoteProtocolError):
            await relayed.channel.finish(CONN)
        assert relayed.channel.conversation.state is not State.POOLED


async def test_relay_cancelled_resets_both_ends(start_relay: StartRelay) -> None:
    """A relay cancelled mid-way (its session ended) resets the client and the
    channel, and its result says so."""
    loop = asyncio.get_running_loop()
    async with start_relay() as relayed, asyncio.timeout(10):
        await loop.sock_sendall(relayed.client, b"half a request")
        await relayed.far.read_until(lambda: relayed.far.data)
        relayed.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await relayed.task
        assert await relayed.far.read_until() == "reset"
        assert await read_local(relayed.client, bytearray()) == "reset"
    assert relayed.result.how == "reset: its session is over"
    assert relayed.result.sent == len(b"half a request")


# --- a TLS local stream (a link between the gateways of a fleet) ----------------------


async def test_relay_reads_what_a_tls_local_stream_holds_read_ahead(tmp_path: Any) -> None:
    """The local stream is TLS (a client carried over a link from another gateway): the peer's
    small records arrive together, OpenSSL reads them ahead in one recv, and no readiness event
    announces the ones it holds. The relay reads them all the same: every byte crosses, before
    the client sends anything more."""
    from streamkit import tls_pinned

    local, client = await tls_pinned(tmp_path)
    far_sock, near = tcp_pair()
    channel = Channel(SocketStream(near), Side.GATEWAY)
    channel.conversation.state, channel.conversation.conn = State.STARTED, CONN
    sent = b""
    for i in range(8):  # eight records, in the socket before the relay reads any
        record = f"record {i};".encode()
        await client.send(record)
        sent += record
    await wait_until(lambda: local.has_unread_bytes(), 5, "the records to arrive")
    result = RelayResult()
    task = asyncio.create_task(relay(local, channel, "client", result))
    far = FarEnd(far_sock)
    try:
        async with asyncio.timeout(10):
            assert await far.read_until(lambda: len(far.data) >= len(sent)) is None
        assert bytes(far.data) == sent
        for i in range(50):  # and records that come while it runs, two at a time
            await client.send(b"a")
            await client.send(f"pair {i};".encode())
            sent += f"apair {i};".encode()
        async with asyncio.timeout(10):
            assert await far.read_until(lambda: len(far.data) >= len(sent)) is None
        assert bytes(far.data) == sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        client.abort()
        far_sock.close()
        near.close()
