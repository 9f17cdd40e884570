"""Graceful shutdown: ``Gateway.shutdown`` and ``Agent.shutdown`` take no new
clients, let open connections finish up to the drain deadline, then reset the
rest. (The CLI does the same on SIGTERM: see ``test_cli.py``.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from kit.clients import connect, echo_roundtrip, read_to_end
from kit.services import Handler, echo_handler
from kit.tunnels import OpenAgent, OpenGateway, StartServer
from kit.waiting import DEADLINE, LONGER_THAN_ANY_TEST, wait_until

from tunnelgate import Address

pytestmark = pytest.mark.timeout(60)

DRAIN_TIMEOUT = 0.3

FIRST = os.urandom(300_000)  # sent before the shutdown starts
REST = os.urandom(2_000_000)  # sent once the test releases the service


def gated_handler(release: asyncio.Event) -> Handler:
    """Send FIRST, wait for ``release``, send REST, end cleanly."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(FIRST)
        await writer.drain()
        await release.wait()
        writer.write(REST)
        await writer.drain()
        writer.write_eof()

    return handle


async def refuses(address: Address) -> bool:
    try:
        async with connect(address):
            return False
    except ConnectionRefusedError:
        return True


async def read_whole(reader: asyncio.StreamReader) -> bytes:
    """Everything until a clean EOF (a reset raises)."""
    chunks = []
    while data := await reader.read(1 << 20):
        chunks.append(data)
    return b"".join(chunks)


async def test_gateway_shutdown_refuses_new_and_lets_open_connections_finish(
    open_gateway: OpenGateway, open_agent: OpenAgent, start_server: StartServer
) -> None:
    """Stopping the gateway: its ports close at once, the open response still arrives whole."""
    release = asyncio.Event()
    server = await start_server(gated_handler(release))
    gateway = await open_gateway()
    assert gateway.address is not None
    agent = await open_agent(gateway, expose=[f"0:{server.local}"])
    (service,) = (await agent.wait_ready(10)).values()
    async with asyncio.timeout(20), connect(service.address) as (reader, _):
        assert await reader.readexactly(len(FIRST)) == FIRST
        # The drain deadline never comes while this test runs: the shutdown can
        # only end because the last connection did.
        stopping = asyncio.create_task(gateway.shutdown(drain_timeout=LONGER_THAN_ANY_TEST))
        await wait_until(lambda: stopping.done() or not gateway.sessions(), what="the drain")
        assert await refuses(service.address), "the service port still takes clients"
        assert await refuses(gateway.address), "the control port still takes agents"
        assert not stopping.done(), "the shutdown did not wait for the open connection"
        release.set()
        rest = await read_whole(reader)
    await asyncio.wait_for(stopping, DEADLINE)  # the client has closed its side too
    assert hashlib.sha256(rest).digest() == hashlib.sha256(REST).digest()


async def test_agent_shutdown_frees_its_ports_for_a_successor_while_draining(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    start_server: StartServer,
) -> None:
    """A rolling restart: the stopping agent's port goes to its successor at once,
    while the connection it still carries finishes intact."""
    release = asyncio.Event()
    gated = await start_server(gated_handler(release))
    echo = await start_server(echo_handler)
    gateway = await open_gateway()
    old = await open_agent(gateway, expose=[f"0:{gated.local}"])
    (first,) = (await old.wait_ready(10)).values()
    public = first.address
    port = public.port  # the successor asks for it by number
    async with asyncio.timeout(20), connect(public) as (reader, _):
        assert await reader.readexactly(len(FIRST)) == FIRST
        stopping = asyncio.create_task(old.shutdown(drain_timeout=LONGER_THAN_ANY_TEST))
        await wait_until(lambda: not gateway.sessions(), what="the old session to drain")
        new = await open_agent(gateway, expose=[f"{port}:{echo.local}"])
        (service,) = (await new.wait_ready(5)).values()
        assert service.address.port == port
        await echo_roundtrip(public, b"served by the successor")
        assert not stopping.done(), "the old agent did not wait for its connection"
        release.set()
        rest = await read_whole(reader)
    await asyncio.wait_for(stopping, DEADLINE)  # ended with its last connection
    assert hashlib.sha256(rest).digest() == hashlib.sha256(REST).digest()
    await echo_roundtrip(public, b"the successor keeps the port")


@pytest.mark.parametrize("side", ["gateway", "agent"])
async def test_shutdown_resets_connections_left_at_the_drain_deadline(
    open_gateway: OpenGateway, open_agent: OpenAgent, start_server: StartServer, side: str
) -> None:
    """A connection still open at the drain deadline ends with a reset, never a clean end."""
    release = asyncio.Event()  # never set
    server = await start_server(gated_handler(release))
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{server.local}"])
    (service,) = (await agent.wait_ready(10)).values()
    async with asyncio.timeout(20), connect(service.address) as (reader, _):
        assert await reader.readexactly(len(FIRST)) == FIRST
        started = time.monotonic()
        await (gateway if side == "gateway" else agent).shutdown(drain_timeout=DRAIN_TIMEOUT)
        waited = time.monotonic() - started
        assert await read_to_end(reader) == (0, "reset")
    assert waited >= DRAIN_TIMEOUT, f"reset after {waited:.2f} s, before the drain deadline"
