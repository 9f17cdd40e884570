"""The whole tunnel on loopback: bytes go through intact, half-closes travel,
connections do not block each other. Every test runs over plain TCP and TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultkit import reset_writer
from kit.clients import Payload, connect, echo_roundtrip, read_to_end
from kit.logs import LogRecorder
from kit.services import READ_SIZE, LocalServer, banner_handler, echo_handler
from kit.tokens import TOKEN
from kit.tunnels import (
    OpenTunnel,
    StartProxy,
    StartServer,
    Tunnel,
    agent_tls_options,
    gateway_defaults,
)
from kit.waiting import wait_until

import tunnelgate
from tunnelgate import Address, Agent, Gateway, relay

pytestmark = pytest.mark.timeout(60)

WRITE_SIZE = 1 << 20


async def send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write ``data`` in large pieces, then half-close."""
    view = memoryview(data)
    for offset in range(0, len(view), WRITE_SIZE):
        writer.write(view[offset : offset + WRITE_SIZE])
        await writer.drain()
    writer.write_eof()


async def digest_to_end(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read to EOF; return (length, sha256 hex) of what came."""
    digest = hashlib.sha256()
    total = 0
    while data := await reader.read(READ_SIZE):
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


async def test_echo_roundtrip_through_tunnel(echo_tunnel: Tunnel) -> None:
    """A client's bytes reach the service and its answer comes back."""
    async with asyncio.timeout(10), connect(echo_tunnel.address) as (reader, writer):
        for message in (b"hello", b"x" * 100_000, b"\x00\xff" * 10):
            writer.write(message)
            await writer.drain()
            assert await reader.readexactly(len(message)) == message
        writer.write_eof()
        assert await read_to_end(reader) == (0, "eof")


async def test_relay_carries_64_mib_each_way_at_once_intact(
    start_server: StartServer, open_tunnel: OpenTunnel, big_payloads: tuple[Payload, Payload]
) -> None:
    """64 MiB up and 64 MiB down at the same time arrive byte for byte (sha256)."""
    up, down = big_payloads
    service_got: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(send_all(writer, down.data))
            received = group.create_task(digest_to_end(reader))
        service_got.set_result(received.result())

    tunnel = await open_tunnel(await start_server(bulk))
    async with asyncio.timeout(45), connect(tunnel.address) as (reader, writer):
        async with asyncio.TaskGroup() as group:
            group.create_task(send_all(writer, up.data))
            client_got = group.create_task(digest_to_end(reader))
        assert client_got.result() == (len(down.data), down.sha256)
        assert await service_got == (len(up.data), up.sha256)


async def test_half_close_client_eof_still_gets_whole_reply(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """A client that half-closes after its request still gets the whole (after-EOF) reply."""
    request = bytes(range(256)) * 4096  # 1 MiB

    def reply_to(data: bytes) -> bytes:
        return hashlib.sha256(data).digest() * (4 << 20 >> 5)  # 4 MiB

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # to EOF
        writer.write(reply_to(data))
        await writer.drain()

    tunnel = await open_tunnel(await start_server(answer_after_eof))
    async with asyncio.timeout(20), connect(tunnel.address) as (reader, writer):
        writer.write(request)
        writer.write_eof()
        await writer.drain()
        reply = await reader.read()
        assert len(reply) == 4 << 20
        assert reply == reply_to(request)


async def test_half_close_service_eof_still_receives_from_client(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """A service that sent a banner and EOF still receives what the client sends next."""
    banner = b"220 banner, then EOF from the service\r\n"
    after = b"sent by the client after the service's EOF" * 1000
    service_got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def banner_then_listen(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(banner)
        writer.write_eof()
        await writer.drain()
        service_got.set_result(await reader.read())

    tunnel = await open_tunnel(await start_server(banner_then_listen))
    async with asyncio.timeout(10), connect(tunnel.address) as (reader, writer):
        assert await reader.read() == banner  # all of it, then EOF
        writer.write(after)
        writer.write_eof()
        await writer.drain()
        assert await service_got == after


async def test_concurrent_clients_each_get_their_own_bytes(echo_tunnel: Tunnel) -> None:
    """200 clients at once, each with different bytes, each gets its own back."""

    async def client(index: int) -> bool:
        payload = hashlib.sha256(index.to_bytes(4, "big")).digest() * 1024  # 32 KiB
        async with connect(echo_tunnel.address) as (reader, writer):
            writer.write(payload)
            writer.write_eof()
            await writer.drain()
            return await reader.read() == payload

    async with asyncio.timeout(40):
        results = await asyncio.gather(*(client(i) for i in range(200)))
    assert all(results), f"{results.count(False)} of 200 clients got wrong bytes"


@dataclass
class _Flood:
    written: int = 0
    last_progress: float = 0.0


async def test_stalled_client_does_not_slow_others(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """A client that never reads does not hold up another client: its round
    trips all come back while the stalled one stays stalled."""
    loop = asyncio.get_running_loop()
    flood = _Flood()

    async def service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.readline() == b"flood\n":
            chunk = bytes(256 * 1024)
            while True:
                writer.write(chunk)
                await writer.drain()
                flood.written += len(chunk)
                flood.last_progress = loop.time()
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()

    tunnel = await open_tunnel(await start_server(service))
    async with asyncio.timeout(30), connect(tunnel.address) as (_, stuck):
        stuck.write(b"flood\n")
        await stuck.drain()
        await wait_until(
            lambda: flood.written and loop.time() - flood.last_progress > 0.3,
            timeout=15,
            what="the flood to fill every buffer on the way",
        )
        written = flood.written
        async with connect(tunnel.address) as (reader, writer):
            writer.write(b"echo\n")
            for index in range(50):
                message = index.to_bytes(2, "big") * 32
                writer.write(message)
                await writer.drain()
                assert await reader.readexactly(len(message)) == message
        assert flood.written == written, "the stalled client read something"
        assert written > 1 << 20


@pytest.mark.usefixtures("ipv6_loopback")
async def test_ipv6_gateway_and_service_work(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """A gateway on [::1] and a service on ::1 carry bytes like IPv4 ones."""
    server = await start_server(echo_handler, host="::1")
    tunnel = await open_tunnel(server, gateway_options={"listen": "[::1]:0"})
    assert tunnel.gateway.address is not None
    assert tunnel.gateway.address.host == "::1"
    assert tunnel.address.host == "::1"
    await echo_roundtrip(tunnel.address)


async def test_expose_yields_address_serving_local_port(
    open_gateway: Callable[..., Awaitable[Gateway]], echo_server: LocalServer, mode: str
) -> None:
    """``tunnelgate.expose(port, ...)`` yields a public address that serves the port."""
    gateway = await open_gateway()
    async with tunnelgate.expose(
        echo_server.port,
        gateway=str(gateway.address),
        token=TOKEN,
        name="embedded",
        timeout=10,
        **agent_tls_options(mode, gateway),
    ) as address:
        assert isinstance(address, Address)
        assert gateway.sessions() == {"embedded": [address]}
        await echo_roundtrip(address)
    await wait_until(lambda: not gateway.sessions(), what="the session to end with the block")


async def test_empty_pool_first_client_still_served(
    open_tunnel: OpenTunnel, echo_server: LocalServer
) -> None:
    """An agent with pool_size=0 still serves clients (the gateway asks for a channel)."""
    tunnel = await open_tunnel(echo_server, pool_size=0)
    for _ in range(3):
        await echo_roundtrip(tunnel.address)


async def test_agent_serves_several_services(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """Each exposed service's port reaches its own local service."""
    one = await start_server(banner_handler(b"one"))
    two = await start_server(banner_handler(b"two"))
    tunnel = await open_tunnel(one, two)
    by_local = {s.local.port: s.address for s in tunnel.services.values()}
    for server, banner in ((one, b"one"), (two, b"two")):
        async with asyncio.timeout(5), connect(by_local[server.port]) as (reader, _):
            assert await reader.read() == banner


async def test_relay_logs_each_close_once_with_byte_counts(
    start_server: StartServer, open_tunnel: OpenTunnel, tunnel_log: LogRecorder
) -> None:
    """Each side logs a close once, with the client's address and bytes each way."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1000)
        writer.write(b"r" * 3000)
        await writer.drain()

    tunnel = await open_tunnel(await start_server(answer))
    async with asyncio.timeout(5), connect(tunnel.address) as (reader, writer):
        host, port = writer.get_extra_info("sockname")[:2]
        writer.write(b"q" * 1000)
        assert await reader.read() == b"r" * 3000
    client = f"client={host}:{port} "
    lines = await wait_until(
        lambda: len(tunnel_log.find(client)) >= 2 and tunnel_log.find(client),
        what="both sides to log the close",
    )
    assert sorted(r.name for r in tunnel_log.records if client in r.getMessage()) == [
        "tunnelgate.agent",
        "tunnelgate.gateway",
    ]
    for line in lines:
        assert "up=1000 down=3000" in line, line
        assert "end=normal" in line, line


@pytest.mark.parametrize(
    ("up", "down"),
    [(1, 7), (70_000, 65_536), (3 * 2**20 + 7, 5 * 2**20 + 3)],
    ids=["tiny", "around-small-read", "bulk"],
)
async def test_byte_counts_and_content_exact_on_every_relay_path(
    up: int,
    down: int,
    start_server: StartServer,
    open_tunnel: OpenTunnel,
    tunnel_log: LogRecorder,
) -> None:
    """Tiny messages take the copy path, bulk ones splice (plain TCP) or go
    record by record (TLS), and sizes around the switch take both: the bytes
    arrive whole and in order, and both sides log exactly what was carried."""
    up_data, down_data = os.urandom(up), os.urandom(down)
    received = bytearray()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.extend(await reader.read())  # until the client's half-close
        writer.write(down_data)
        await writer.drain()

    tunnel = await open_tunnel(await start_server(answer))
    async with asyncio.timeout(20), connect(tunnel.address) as (reader, writer):
        host, port = writer.get_extra_info("sockname")[:2]
        writer.write(up_data)
        await writer.drain()
        writer.write_eof()
        got, how = await read_to_end_collect(reader)
    assert how == "eof"
    assert hashlib.sha256(got).digest() == hashlib.sha256(down_data).digest()
    assert hashlib.sha256(received).digest() == hashlib.sha256(up_data).digest()
    client = f"client={host}:{port} "
    lines = await wait_until(
        lambda: len(tunnel_log.find(client)) >= 2 and tunnel_log.find(client),
        what="both sides to log the close",
    )
    for line in lines:
        assert f"up={up} down={down} " in line and "end=normal" in line, line


async def read_to_end_collect(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything until the stream ends, and "eof" or "reset"."""
    data = bytearray()
    try:
        while chunk := await reader.read(READ_SIZE):
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    return bytes(data), "eof"


def open_fds() -> int:
    """Descriptors open in this process, less what the relay caches on purpose."""
    return len(os.listdir("/proc/self/fd")) - relay.cached_fds()


async def test_pool_grows_with_the_rate_of_clients_and_shrinks_after(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
    echo_server: LocalServer,
) -> None:
    """A steady stream of 16 concurrent clients raises the pool's target above
    ``pool_size``; once the clients stop, PoolRelease brings the pool back down.

    (The target is what adapts. Whether idle channels pile up at the gateway
    meanwhile depends on how fast this machine opens them against how fast the
    clients use them: on a loaded CI machine, each one is taken as it arrives.)"""
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], pool_size=2)
    (service,) = (await agent.wait_ready(10)).values()

    def pooled() -> int:
        (session,) = gateway.statistics().sessions
        return session.pool.idle

    await wait_until(lambda: pooled() == 2, what=lambda: f"2 pooled channels, not {pooled()}")
    largest = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.5

    async def worker() -> None:
        nonlocal largest
        while loop.time() < deadline:
            await echo_roundtrip(service.address)
            targets = [s.pool.target for s in agent.statistics().sessions if s.pool is not None]
            largest = max(largest, pooled(), *targets)

    await asyncio.gather(*(worker() for _ in range(16)))
    assert largest > 2, "the pool never grew under a steady stream of clients"
    await wait_until(
        lambda: pooled() == 2, timeout=10, what=lambda: f"2 pooled channels, not {pooled()}"
    )


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_connections_and_sessions_leave_no_file_descriptors(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
    echo_server: LocalServer,
) -> None:
    """Hundreds of clients, then closing agent and gateway, leave no socket open.

    The relay's caches (idle pipes, its epoll descriptor) are counted apart.
    """

    before = open_fds()
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], pool_size=4)
    (service,) = (await agent.wait_ready(10)).values()
    # control listener, service listener, control channel and 4 pooled data
    # channels (both ends of each)
    steady = before + 2 + 2 + 8
    await wait_until(lambda: open_fds() == steady, what=lambda: f"{steady} fds, not {open_fds()}")
    for _ in range(5):
        await asyncio.gather(*(echo_roundtrip(service.address) for _ in range(40)))
    # A burst may leave a data channel or two beyond pool_size in the pool,
    # but nothing per client.
    await wait_until(
        lambda: open_fds() <= steady + 4,
        what=lambda: f"about {steady} fds after 200 clients, not {open_fds()}",
    )
    await agent.aclose()
    await gateway.aclose()
    await wait_until(
        lambda: open_fds() <= before, what=f"{before} fds at the end, not {open_fds()}"
    )


async def _uvloop_scenario(mode: str, state_dir: Path) -> None:
    """Bytes, half-closes and a reset through the tunnel, on whatever loop runs it."""
    async with contextlib.AsyncExitStack() as stack:
        echo = await stack.enter_async_context(LocalServer(echo_handler))
        writers: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            writer.write(b"x" * (1 << 20))
            await writer.drain()
            await reader.read()

        holder = await stack.enter_async_context(LocalServer(hold))
        gateway = await stack.enter_async_context(Gateway(**gateway_defaults(mode, state_dir)))
        agent = await stack.enter_async_context(
            Agent(
                gateway=str(gateway.address),
                token=TOKEN,
                name="site-a",
                expose=[f"0:{echo.local}", f"0:{holder.local}"],
                **agent_tls_options(mode, gateway),
            )
        )
        services = await agent.wait_ready(10)
        by_local = {s.local.port: s.address for s in services.values()}
        payload = os.urandom(16 << 20)
        async with asyncio.timeout(20), connect(by_local[echo.port]) as (reader, writer):
            async with asyncio.TaskGroup() as group:
                group.create_task(send_all(writer, payload))
                got = group.create_task(digest_to_end(reader))
            assert got.result() == (len(payload), hashlib.sha256(payload).hexdigest())
        async with asyncio.timeout(10), connect(by_local[holder.port]) as (reader, writer):
            await reader.readexactly(1 << 20)
            reset_writer(await wait_until(lambda: writers and writers[0]))
            assert (await read_to_end(reader))[1] == "reset"


@pytest.mark.usefixtures("no_unexpected_errors")  # its gateway and agent run in a loop of its own
def test_uvloop_data_path_works(mode: str, state_dir: Path) -> None:
    """Under uvloop (as the CLI runs) bytes, half-closes and resets go through."""
    uvloop = pytest.importorskip("uvloop")
    uvloop.run(_uvloop_scenario(mode, state_dir))


async def test_half_close_client_eof_before_data_channel_exists(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """Request and EOF sent before any data channel exists still get the whole reply."""

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        writer.write(data[::-1])
        await writer.drain()

    tunnel = await open_tunnel(await start_server(answer_after_eof), pool_size=0)
    request = os.urandom(300_000)
    async with asyncio.timeout(10), connect(tunnel.address) as (reader, writer):
        writer.write(request)
        writer.write_eof()
        assert await reader.read() == request[::-1]


async def test_pool_respects_gateway_limit_and_still_serves_bursts(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
    start_proxy: StartProxy,
    echo_server: LocalServer,
) -> None:
    """The pool stays within the gateway's limit without churn, and bursts are served."""
    gateway = await open_gateway(max_pool_size=2, heartbeat_interval=0.1, heartbeat_timeout=0.3)
    assert gateway.address is not None
    proxy = await start_proxy(gateway.address)
    agent = await open_agent(
        gateway, via=proxy.address, expose=[f"0:{echo_server.local}"], pool_size=8
    )
    (service,) = (await agent.wait_ready(10)).values()
    (control,) = proxy.live("control")
    start = control.forwarded
    await wait_until(lambda: control.forwarded - start > 10 * 2 * 12, what="ten heartbeats")
    assert proxy.accepted == 1 + 2, f"{proxy.accepted - 1} data channels opened for a pool of 2"
    async with asyncio.timeout(20):
        await asyncio.gather(*(echo_roundtrip(service.address) for _ in range(20)))
