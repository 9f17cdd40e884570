"""The fault-injection proxy of ``faultkit`` proves itself: every fault visibly
happens, against a plain echo or hand-driven server on loopback, and the
control/data classification holds against a real agent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from faultkit import FaultProxy, ProxiedConnection, reset_writer
from kit.clients import connect, echo_roundtrip, read_to_end
from kit.ports import refusing_port
from kit.services import LocalServer
from kit.tunnels import OpenAgent, OpenGateway, StartProxy, StartServer
from kit.waiting import wait_until

from tunnelgate import Address

pytestmark = pytest.mark.timeout(60)

QUIET = 0.5  # how long "nothing happens" is watched for


# --- a server the test drives by hand --------------------------------------------


class FarEnd:
    """The server side of each proxied connection, handed to the test."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.accepted.put((reader, writer))
        await asyncio.Event().wait()  # the test drives it until the server stops


@dataclass
class Ends:
    """Both ends of one connection through the proxy, and the proxy's view of it."""

    reader: asyncio.StreamReader  # the "agent"'s side
    writer: asyncio.StreamWriter
    far_reader: asyncio.StreamReader  # the "gateway"'s side
    far_writer: asyncio.StreamWriter
    conn: ProxiedConnection


@pytest.fixture
async def far_end(start_server: StartServer) -> tuple[FarEnd, LocalServer]:
    far = FarEnd()
    return far, await start_server(far.handle)


@contextlib.asynccontextmanager
async def through(proxy: FaultProxy, far: FarEnd) -> AsyncIterator[Ends]:
    """A connection through ``proxy`` to ``far``, both ends in hand."""
    async with connect(Address("127.0.0.1", proxy.port)) as (reader, writer):
        async with asyncio.timeout(5):
            far_reader, far_writer = await far.accepted.get()
        yield Ends(reader, writer, far_reader, far_writer, proxy.connections[-1])


async def quiet(reader: asyncio.StreamReader) -> bool:
    """True if nothing (no byte, no EOF, no reset) arrives for a while."""
    try:
        await asyncio.wait_for(reader.read(1), QUIET)
    except TimeoutError:
        return True
    return False


# Event loops may fire a timer up to a millisecond early (uvloop rounds to whole
# milliseconds): a delay of 0.25 s each way can measure 0.4997 s.
TIMER_SLACK = 0.01


async def timed_roundtrip(address: Address, payload: bytes = b"ping") -> float:
    started = time.monotonic()
    await echo_roundtrip(address, payload)
    return time.monotonic() - started


async def recv_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything a raw socket receives, and how it ended: "eof" or "reset"."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    async with asyncio.timeout(5):
        while True:
            try:
                data = await loop.sock_recv(sock, 1 << 16)
            except ConnectionResetError:
                return bytes(received), "reset"
            if not data:
                return bytes(received), "eof"
            received += data


@contextlib.asynccontextmanager
async def raw_client(proxy: FaultProxy) -> AsyncIterator[socket.socket]:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        yield sock
    finally:
        sock.close()


async def receive_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    async with asyncio.timeout(5):
        return await reader.readexactly(size)


# --- forwarding without faults -------------------------------------------------


async def test_proxy_forwards_both_ways_with_half_close(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """Bytes go through intact each way, a FIN is passed on as a FIN, and the
    other direction keeps flowing after it."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    up, down = os.urandom(3 << 20), os.urandom(3 << 20)
    async with through(proxy, far) as ends, asyncio.timeout(10):
        ends.writer.write(up)
        ends.writer.write_eof()
        received_up = await ends.far_reader.read()  # to EOF
        assert hashlib.sha256(received_up).digest() == hashlib.sha256(up).digest()
        ends.far_writer.write(down)  # still flows after the client's FIN
        ends.far_writer.write_eof()
        received_down = await ends.reader.read()
        assert hashlib.sha256(received_down).digest() == hashlib.sha256(down).digest()
        conn = ends.conn
        assert (conn.up_bytes, conn.down_bytes) == (len(up), len(down))
        assert conn.forwarded == len(up) + len(down)
        assert conn.kind == "control"  # the first connection
        assert conn.faults == set()
        assert not conn.open
        assert proxy.accepted == 1 and proxy.connections == [conn]


async def test_proxy_live_lists_connections_forwarding_both_ways(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """live() lists the open, forwarding connections, of one kind if asked."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as first, through(proxy, far) as second:
        assert proxy.live() == [first.conn, second.conn]
        assert proxy.live("control") == [first.conn]
        assert proxy.live("data") == [second.conn]
        proxy.cut("up", "data")
        assert proxy.live() == [first.conn]
        proxy.blackhole("control")
        assert proxy.live() == []


# --- reset and shutdown -------------------------------------------------------------


async def test_reset_both_sides_see_a_reset(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """reset() sends an RST to both ends of the open connections and says how many."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as ends:
        ends.writer.write(b"hello")
        assert await receive_exactly(ends.far_reader, 5) == b"hello"
        assert await proxy.reset() == 1
        async with asyncio.timeout(5):
            assert await read_to_end(ends.reader) == (0, "reset")
            assert await read_to_end(ends.far_reader) == (0, "reset")
        assert not ends.conn.open
        assert ends.conn.faults == {"reset"}
        assert await proxy.reset() == 0
        assert proxy.forget_closed() == 1 and proxy.connections == []


@pytest.mark.parametrize("side", ["agent", "gateway"])
async def test_reset_by_one_end_reaches_the_other_as_a_reset(
    side: str, start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """An RST from either end is passed on as an RST, never as a clean FIN."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as ends:
        ends.writer.write(b"x" * 1000)
        assert len(await receive_exactly(ends.far_reader, 1000)) == 1000
        resetting, other = (
            (ends.writer, ends.far_reader) if side == "agent" else (ends.far_writer, ends.reader)
        )
        reset_writer(resetting)
        async with asyncio.timeout(5):
            assert await read_to_end(other) == (0, "reset")


async def test_reset_travels_behind_delayed_bytes(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """Bytes sent before an RST still arrive, delayed, and the RST comes after them."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    proxy.delay(0.3)
    async with through(proxy, far) as ends:
        ends.writer.write(b"last words")
        await ends.writer.drain()
        reset_writer(ends.writer)
        async with asyncio.timeout(5):
            assert await ends.far_reader.readexactly(10) == b"last words"
            assert await read_to_end(ends.far_reader) == (0, "reset")


async def test_shutdown_both_sides_see_a_fin(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """shutdown() ends both sides with a FIN and forwards nothing more."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as ends:
        assert proxy.shutdown() == 1
        async with asyncio.timeout(5):
            assert await read_to_end(ends.reader) == (0, "eof")
            assert await read_to_end(ends.far_reader) == (0, "eof")
        assert ends.conn.faults == {"shutdown"}
        assert proxy.shutdown() == 0


async def test_reset_and_shutdown_take_a_list_of_connections(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """reset(connections=...) and shutdown(connections=...) touch only those given."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with (
        through(proxy, far) as first,
        through(proxy, far) as second,
        through(proxy, far) as third,
    ):
        assert await proxy.reset(connections=[second.conn]) == 1
        assert proxy.shutdown(connections=[third.conn, second.conn]) == 1
        async with asyncio.timeout(5):
            assert await read_to_end(second.reader) == (0, "reset")
            assert await read_to_end(third.reader) == (0, "eof")
        assert proxy.live() == [first.conn]
        await echo_through(first)


async def test_faults_take_a_list_of_connections_and_spare_new_ones(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """blackhole(connections=...) and the like touch only those given, and no
    connection accepted later."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as first, through(proxy, far) as second:
        proxy.blackhole(connections=[second.conn])
        proxy.cut("up", connections=[first.conn], existing=False)  # connections win
        assert proxy.live() == []
        async with through(proxy, far) as third:
            await echo_through(third)
            assert third.conn.faults == set()
        second.writer.write(b"x")
        assert await quiet(second.far_reader)
        assert first.conn.faults == {"cut_up"} and second.conn.faults == {"blackhole"}


async def echo_through(ends: Ends, payload: bytes = b"still here") -> None:
    """The far end echoes one message by hand."""
    async with asyncio.timeout(5):
        ends.writer.write(payload)
        data = await ends.far_reader.readexactly(len(payload))
        ends.far_writer.write(data)
        assert await ends.reader.readexactly(len(payload)) == payload


# --- black holes and cuts ---------------------------------------------------------------


async def test_blackhole_drops_everything_and_closes_nothing(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """A black-holed connection forwards nothing either way, not even a reset,
    and both ends stay open."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as ends:
        await echo_through(ends)
        proxy.blackhole()
        ends.writer.write(b"anyone?")
        ends.far_writer.write(b"hello?")
        assert await quiet(ends.far_reader)
        assert await quiet(ends.reader)
        assert ends.conn.open and ends.conn.blackholed
        assert ends.conn not in proxy.live()
        reset_writer(ends.writer)
        assert await quiet(ends.far_reader), "the reset went through the black hole"
        assert ends.conn.forwarded == 2 * len(b"still here")


async def test_blackhole_new_only_spares_open_connections_until_restore(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """blackhole(existing=False) leaves open connections alone; new ones reach
    nothing until restore(); those already black-holed stay so."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as old:
        proxy.blackhole(existing=False, new=True)
        async with connect(Address("127.0.0.1", proxy.port)) as (reader, writer):
            writer.write(b"hello?")
            assert await quiet(reader), "a black-holed connection was answered or closed"
            assert far.accepted.empty() and server.connections == 1  # never reached
            dead = proxy.connections[-1]
            assert dead.blackholed and not dead.connected
            await echo_through(old)
            proxy.restore()
            async with through(proxy, far) as fresh:
                await echo_through(fresh)
            assert await quiet(reader), "restore() revived a black-holed connection"


async def test_cut_up_stops_one_direction_only(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """cut("up") drops what the agent's side sends (a FIN too); the other way
    still delivers; nothing is closed."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with through(proxy, far) as ends:
        proxy.cut("up")
        ends.writer.write(b"request")
        ends.writer.write_eof()
        assert await quiet(ends.far_reader)
        ends.far_writer.write(b"still flowing")
        assert await receive_exactly(ends.reader, 13) == b"still flowing"
        assert ends.conn.faults == {"cut_up"}
        assert (ends.conn.up_bytes, ends.conn.down_bytes) == (0, 13)


async def test_cut_down_stops_replies_only(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """cut("down") on an echo: requests arrive, replies stop, the connection stays."""
    proxy = await start_proxy(echo_server.address)
    async with connect(Address("127.0.0.1", proxy.port)) as (reader, writer):
        writer.write(b"one")
        assert await receive_exactly(reader, 3) == b"one"
        (conn,) = proxy.connections
        proxy.cut("down")
        writer.write(b"two")
        await wait_until(lambda: conn.up_bytes == 6, what="the request to go through")
        assert await quiet(reader), "a reply came through the cut"
        assert conn.down_bytes == 3


# --- latency and bandwidth --------------------------------------------------------------


async def test_delay_round_trip_takes_twice_the_delay_and_keeps_order(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """With delay(d) a round trip takes at least 2 d, and many writes arrive in order."""
    proxy = await start_proxy(echo_server.address)
    address = Address("127.0.0.1", proxy.port)
    proxy.delay(0.2)
    assert await timed_roundtrip(address) >= 0.4 - TIMER_SLACK
    messages = [os.urandom(n) for n in (1, 100, 70_000, 3, 300_000, 17) * 20]
    expected = b"".join(messages)
    async with asyncio.timeout(10), connect(address) as (reader, writer):
        for message in messages:
            writer.write(message)
        writer.write_eof()
        assert await reader.read() == expected


async def test_delay_pushes_back_on_a_sender_whose_receiver_waits(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """A delayed direction holds a bounded amount: a sender whose receiver does
    not read blocks, and everything arrives intact once it reads."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    proxy.delay(0.05)
    chunk = os.urandom(1 << 20)
    async with through(proxy, far) as ends:
        sent = 0
        while sent < 256 << 20:
            ends.writer.write(chunk)
            sent += len(chunk)
            try:
                await asyncio.wait_for(ends.writer.drain(), QUIET)
            except TimeoutError:
                break
        assert sent < 64 << 20, f"{sent} bytes written and the receiver read none"
        ends.writer.write_eof()
        async with asyncio.timeout(10):
            received = await ends.far_reader.read()
        assert received == chunk * (sent // len(chunk))


async def test_throttle_caps_each_direction_of_a_connection(
    start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """throttle(r): N bytes take at least N / r each way, and both ways at once
    are no slower than one way alone: each direction has a cap of its own."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    rate, size = 1_000_000, 1_500_000
    up, down = os.urandom(size), os.urandom(size)
    # One way only, half as much again, on a connection of its own: under one cap
    # shared by both directions, up and down would each take 2 N / r and end
    # after it (3 N / 2 r), not before.
    alone = os.urandom(size * 3 // 2)
    async with through(proxy, far) as ends, through(proxy, far) as reference:
        proxy.throttle(rate)
        started = time.monotonic()
        order: list[str] = []

        async def timed_read(name: str, reader: asyncio.StreamReader, expected: bytes) -> float:
            assert await reader.readexactly(len(expected)) == expected
            order.append(name)
            return time.monotonic() - started

        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            ends.writer.write(up)
            ends.far_writer.write(down)
            reference.writer.write(alone)
            took_up = group.create_task(timed_read("up", ends.far_reader, up))
            took_down = group.create_task(timed_read("down", ends.reader, down))
            group.create_task(timed_read("alone", reference.far_reader, alone))
    least = size / rate * 0.9
    assert took_up.result() >= least, f"up took {took_up.result():.2f} s"
    assert took_down.result() >= least, f"down took {took_down.result():.2f} s"
    assert order[-1] == "alone", order


# --- closing after so many bytes, refusing ----------------------------------------


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_close_after_forwards_exactly_n_bytes_then_closes(
    how: str, start_proxy: StartProxy, far_end: tuple[FarEnd, LocalServer]
) -> None:
    """close_after(n) passes exactly n more bytes (both directions together),
    then closes both sides with the FIN or RST asked for."""
    far, server = far_end
    proxy = await start_proxy(server.address)
    async with raw_client(proxy) as sock:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            far_reader, far_writer = await far.accepted.get()
        await loop.sock_sendall(sock, b"a" * 100)  # before: not counted
        assert await receive_exactly(far_reader, 100) == b"a" * 100
        proxy.close_after(1000, how=how)  # type: ignore[arg-type]
        await loop.sock_sendall(sock, b"b" * 600)
        assert await receive_exactly(far_reader, 600) == b"b" * 600
        far_writer.write(b"c" * 5000)
        received, ended = await recv_until_closed(sock)
        assert (received, ended) == (b"c" * 400, "eof" if how == "fin" else "reset")
        async with asyncio.timeout(5):
            assert await read_to_end(far_reader) == (0, "eof" if how == "fin" else "reset")
        assert proxy.connections[0].forwarded == 100 + 1000


async def test_close_after_counts_from_accept_for_new_connections(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """close_after(n, existing=False) gives each new connection n bytes from its start."""
    proxy = await start_proxy(echo_server.address)
    proxy.close_after(10, how="fin", existing=False)
    for _ in range(2):
        async with raw_client(proxy) as sock:
            await asyncio.get_running_loop().sock_sendall(sock, b"12345678")
            assert await recv_until_closed(sock) == (b"12", "eof")


async def test_refuse_resets_new_connections_at_once(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """refuse(): a connection is accepted and reset at once, reaching nothing;
    restore() lets new ones through again."""
    proxy = await start_proxy(echo_server.address)
    proxy.refuse()
    async with raw_client(proxy) as sock:
        assert await recv_until_closed(sock) == (b"", "reset")
    assert echo_server.connections == 0
    assert proxy.connections[0].faults == {"refuse"}
    proxy.restore()
    await echo_roundtrip(Address("127.0.0.1", proxy.port))


async def test_gateway_unreachable_resets_the_agent_side(start_proxy: StartProxy) -> None:
    """When nothing listens at the target, the agent's connection is reset, not closed."""
    with refusing_port() as port:
        proxy = await start_proxy(Address("127.0.0.1", port))
        async with raw_client(proxy) as sock:
            assert await recv_until_closed(sock) == (b"", "reset")


# --- which connections a fault touches ----------------------------------------------


async def test_existing_and_new_flags_choose_the_connections(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """existing=True touches the open connections, new=True the ones accepted later."""
    proxy = await start_proxy(echo_server.address)
    async with (
        connect(Address("127.0.0.1", proxy.port)) as old,
        asyncio.timeout(20),
    ):
        proxy.delay(0.25, existing=True, new=False)
        async with connect(Address("127.0.0.1", proxy.port)) as spared:
            assert await timed(old, b"x") >= 0.5 - TIMER_SLACK
            assert await answer_order({"old": (old, b"x"), "spared": (spared, b"x")}) == [
                "spared",
                "old",
            ]
        proxy.heal()
        proxy.delay(0.25, existing=False, new=True)
        async with connect(Address("127.0.0.1", proxy.port)) as fresh:
            assert await timed(fresh, b"x") >= 0.5 - TIMER_SLACK
            assert await answer_order({"fresh": (fresh, b"x"), "old": (old, b"x")}) == [
                "old",
                "fresh",
            ]


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def timed(streams: Streams, data: bytes) -> float:
    reader, writer = streams
    started = time.monotonic()
    writer.write(data)
    assert await reader.readexactly(len(data)) == data
    return time.monotonic() - started


async def answer_order(exchanges: dict[str, tuple[Streams, bytes]]) -> list[str]:
    """Send each connection's bytes to the echo at once; the connections' names
    in the order their echoes came back whole."""
    order: list[str] = []

    async def exchange(name: str, streams: Streams, data: bytes) -> None:
        reader, writer = streams
        writer.write(data)
        assert await reader.readexactly(len(data)) == data
        order.append(name)

    async with asyncio.TaskGroup() as group:
        for name, (streams, data) in exchanges.items():
            group.create_task(exchange(name, streams, data))
    return order


async def test_kind_limits_a_fault_to_control_or_data(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """A fault given a kind touches only connections of that kind."""
    proxy = await start_proxy(echo_server.address)
    async with (
        connect(Address("127.0.0.1", proxy.port)) as first,
        connect(Address("127.0.0.1", proxy.port)) as second,
        asyncio.timeout(20),
    ):
        assert [c.kind for c in proxy.connections] == ["control", "data"]
        proxy.delay(0.25, "data")
        assert await timed(second, b"x") >= 0.5 - TIMER_SLACK
        order = await answer_order({"second": (second, b"x"), "first": (first, b"x")})
        assert order == ["first", "second"]


async def test_restore_spares_new_connections_heal_lifts_delay_throttle_and_cut(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """restore(): new connections are normal again while open ones keep their
    faults; heal(): delay, throttle and cuts are lifted from open ones too."""
    proxy = await start_proxy(echo_server.address)
    address = Address("127.0.0.1", proxy.port)
    async with connect(address) as slow, connect(address) as mute, asyncio.timeout(20):
        proxy.delay(0.25)
        proxy.throttle(1000)
        proxy.cut("down", "data")  # the second connection
        proxy.restore()
        async with connect(address) as normal:
            order = await answer_order({"slow": (slow, b"x"), "normal": (normal, b"x")})
            assert order == ["normal", "slow"]
        assert await timed(slow, b"x" * 100) >= 0.5 - TIMER_SLACK
        proxy.heal()
        proxy.delay(0.25, existing=False, new=True)  # a yardstick: delayed, not throttled
        async with connect(address) as delayed:
            # Throttled, 100 kB would take 100 s; cut, "back" would never come back.
            exchanges = {
                "delayed": (delayed, b"x"),
                "slow": (slow, b"x" * 100_000),
                "mute": (mute, b"back"),
            }
            assert (await answer_order(exchanges))[-1] == "delayed"
        slow_conn, mute_conn = proxy.connections[:2]
        assert slow_conn.faults == {"delay", "throttle"}
        assert mute_conn.faults == {"delay", "throttle", "cut_down"}


async def test_heal_leaves_a_blackholed_connection_dead(
    start_proxy: StartProxy, echo_server: LocalServer
) -> None:
    """A black-holed path stays dead after heal(), like a NAT mapping that is gone."""
    proxy = await start_proxy(echo_server.address)
    address = Address("127.0.0.1", proxy.port)
    async with connect(address) as (reader, writer):
        proxy.blackhole()
        proxy.heal()
        writer.write(b"x")
        assert await quiet(reader)
        await echo_roundtrip(address)


# --- the proxy itself -----------------------------------------------------------------------


async def test_fixed_port_lets_the_proxy_restart_in_place(echo_server: LocalServer) -> None:
    """A proxy given a port listens there again after a restart."""
    async with FaultProxy(echo_server.address) as first:
        port = first.port  # the kernel's pick, asked for by name from now on
    proxy = FaultProxy(echo_server.address, port=port)
    for _ in range(2):
        async with proxy:
            assert proxy.port == port and proxy.address == f"127.0.0.1:{port}"
            await echo_roundtrip(Address("127.0.0.1", port))


async def test_aclose_resets_open_connections_and_ends_every_task(
    echo_server: LocalServer,
) -> None:
    """aclose() resets what is still open and leaves no task behind."""
    proxy = FaultProxy(echo_server.address)
    await proxy.start()
    try:
        async with connect(Address("127.0.0.1", proxy.port)) as (reader, writer):
            writer.write(b"hi")
            assert await receive_exactly(reader, 2) == b"hi"
            proxy.delay(0.1)
            await proxy.aclose()
            assert not proxy._tasks
            async with asyncio.timeout(5):
                assert await read_to_end(reader) == (0, "reset")
    finally:
        await proxy.aclose()  # twice is fine


# --- against a real agent ----------------------------------------------------------------------


async def test_kind_first_connection_is_control_then_data_also_after_reconnect(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    start_proxy: StartProxy,
    echo_server: LocalServer,
) -> None:
    """Through the proxy an agent's control channel is classified "control" and
    its data channels "data", and so again after the control channel is reset."""
    gateway = await open_gateway()
    assert gateway.address is not None
    proxy = await start_proxy(gateway.address)
    agent = await open_agent(
        gateway, via=proxy.address, expose=[f"0:{echo_server.local}"], pool_size=3
    )
    (service,) = (await agent.wait_ready(10)).values()
    await wait_until(lambda: len(proxy.live("data")) == 3, what="3 pooled data channels")
    await echo_roundtrip(service.address)
    assert [c.kind for c in proxy.connections].count("control") == 1
    assert proxy.connections[0].kind == "control"
    first_session = agent.session_id

    assert await proxy.reset("control") == 1
    await wait_until(
        lambda: agent.session_id not in (None, first_session), what="the agent's new session"
    )
    (service,) = (await agent.wait_ready(10)).values()
    await wait_until(lambda: len(proxy.live("data")) == 3, what="3 new pooled data channels")
    await echo_roundtrip(service.address)
    controls = [c for c in proxy.connections if c.kind == "control"]
    assert len(controls) == 2, proxy.connections
    assert len(proxy.live("control")) == 1
    new_control = proxy.live("control")[0]
    # Every data channel of the new session came after its control channel.
    assert all(c.id > new_control.id for c in proxy.live("data"))
