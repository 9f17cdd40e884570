"""Data channel reuse end to end: after a clean end (END each way, Finished each way) a data
channel carries the next client, every client still gets exactly its own bytes, and any
abnormal end closes the channel. Every test runs over plain TCP and TLS."""

from __future__ import annotations

import asyncio

import pytest
from faultkit import reset_writer
from kit.clients import connect
from kit.tunnels import OpenTunnel, StartServer
from kit.waiting import wait_until

from tunnelgate import Address, Gateway

pytestmark = pytest.mark.timeout(120)

WORKERS = 8  # clients at once
ROUNDS = 25  # connections each, one after another


def channel_counts(gateway: Gateway) -> tuple[int, int]:
    """Data channels the agent opened, and how often one was pooled again."""
    (agent,) = gateway.statistics().agents
    return agent.data_channels, agent.channel_reuses


def answer_to(request: bytes) -> bytes:
    """The service's answer: a different length for every request (some past the relay's
    small-read size, so both its copy and its bulk path carry answers)."""
    return b"answer to " + request * (1 + len(request) * 97 % 9000)


async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request to its end, answers, closes; resets on a request to."""
    request = await reader.read()
    if request.startswith(b"reset"):
        reset_writer(writer)
        return
    writer.write(answer_to(request))
    await writer.drain()
    writer.close()


async def exchange(address: Address, request: bytes) -> bytes:
    """Send ``request``, half-close, read the answer to its end."""
    async with connect(address) as (reader, writer):
        writer.write(request)
        writer.write_eof()
        return await reader.read()


async def test_every_client_gets_exactly_its_own_answer_over_reused_channels(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """Clients at once, each a series of connections with its own request and an answer of
    its own length: each gets exactly its answer, nothing of another's, while most
    connections ride channels that carried one before."""
    tunnel = await open_tunnel(await start_server(answering), pool_size=1)

    async def client(worker: int) -> None:
        for n in range(ROUNDS):
            request = f"client {worker} connection {n};".encode()
            assert await exchange(tunnel.address, request) == answer_to(request)

    async with asyncio.timeout(90), asyncio.TaskGroup() as group:
        for worker in range(WORKERS):
            group.create_task(client(worker))
    total = WORKERS * ROUNDS
    # Each connection rode a new channel or a reused one.
    await wait_until(
        lambda: sum(channel_counts(tunnel.gateway)) >= total, what="every end handshake"
    )
    opened, reused = channel_counts(tunnel.gateway)
    assert opened < total // 4, (opened, reused)


async def test_a_connection_that_ends_abnormally_does_not_give_its_channel_back(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """A service's reset ends its connection abnormally: its channel is closed, not pooled;
    the clean connections before and after it are both pooled again."""
    tunnel = await open_tunnel(await start_server(answering), pool_size=1)
    async with asyncio.timeout(30):
        assert await exchange(tunnel.address, b"first") == answer_to(b"first")
        await wait_until(lambda: channel_counts(tunnel.gateway)[1] == 1, what="a reuse")
        with pytest.raises(ConnectionResetError):
            await exchange(tunnel.address, b"reset please")
        assert await exchange(tunnel.address, b"last") == answer_to(b"last")
        await wait_until(lambda: channel_counts(tunnel.gateway)[1] == 2, what="a second reuse")
        assert channel_counts(tunnel.gateway)[1] == 2


async def test_a_clients_slot_is_free_as_its_connection_ends_while_its_channel_finishes(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """One connection at a time per client address: each next one, opened the moment the
    last one ended, is admitted (the end handshake of the last one's channel holds no slot)."""
    tunnel = await open_tunnel(
        await start_server(answering),
        gateway_options={"access": {"max_connections_per_client": 1}},
        pool_size=1,
    )
    async with asyncio.timeout(60):
        for n in range(30):
            request = f"one at a time {n}".encode()
            assert await exchange(tunnel.address, request) == answer_to(request), n


async def test_reuse_can_be_turned_off_on_the_gateway(
    start_server: StartServer, open_tunnel: OpenTunnel
) -> None:
    """With reuse_data_channels off, every client gets a channel of its own."""
    tunnel = await open_tunnel(
        await start_server(answering),
        gateway_options={"reuse_data_channels": False},
        pool_size=1,
    )
    async with asyncio.timeout(30):
        for n in range(10):
            request = f"connection {n}".encode()
            assert await exchange(tunnel.address, request) == answer_to(request)
    opened, reused = channel_counts(tunnel.gateway)
    assert (reused, opened >= 10) == (0, True)
