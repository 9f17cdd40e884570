"""Forwarding between two gateways of a fleet, in-process, with the fault kit on the
gateway-to-gateway link (the first gateway announces a FaultProxy in front of its fleet port):
latency costs nothing but time; a reset of the link resets the client it carried, never with a
clean end, and the next client passes; a black hole fails the clients that meet it (reset,
counted) until the path heals. And the join of a client with its link, alone: a half-close
crosses, a reset crosses after the bytes before it."""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from faultkit import FaultProxy
from kit.waiting import DEADLINE, wait_until

from tunnelgate import Address, Agent, Gateway
from tunnelgate.gateway.forwarding import join

pytestmark = pytest.mark.usefixtures("no_unexpected_errors")
CAS: dict[str, trustme.CA] = {}  # a fleet CA per test's directory


def fleet_options(tmp_path: Path, redis_port: int, node: str) -> dict[str, Any]:
    """The fleet settings of gateway ``node``, with a certificate of this test's fleet CA."""
    certs = tmp_path / "certs"
    if str(certs) not in CAS:
        certs.mkdir()
        CAS[str(certs)] = trustme.CA()
        CAS[str(certs)].cert_pem.write_to_path(certs / "ca.crt")
    cert = CAS[str(certs)].issue_cert(f"{node}.fleet.test")
    cert.cert_chain_pems[0].write_to_path(certs / f"{node}.crt")
    cert.private_key_pem.write_to_path(certs / f"{node}.key")
    return {
        "fleet": f"redis://127.0.0.1:{redis_port}/0",
        "fleet_name": tmp_path.name,
        "fleet_node": node,
        "fleet_lease": 3.0,
        "fleet_ca": str(certs / "ca.crt"),
        "fleet_cert": str(certs / f"{node}.crt"),
        "fleet_key": str(certs / f"{node}.key"),
    }


async def exchange(host: str, port: int, payload: bytes) -> tuple[bytes, str]:
    """Send ``payload`` and half-close; what came back, and how it ended ("eof" or "reset")."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        writer.write_eof()
        received = b""
        while chunk := await reader.read(65536):
            received += chunk
        return received, "eof"
    except ConnectionResetError:
        return received, "reset"
    finally:
        writer.close()


async def forwarding_pair(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
    service: Any,
    redis_port: int,
    tmp_path: Path,
    proxy: FaultProxy | None = None,
) -> tuple[Gateway, Gateway, int]:
    """Two gateways of a fleet, an agent on the first exposing ``service``, the second
    forwarding its port (on 127.0.0.2); with ``proxy``, the first announces it in front of
    its fleet port. Both gateways, and the port."""
    advertise = {"fleet_advertise": proxy.address} if proxy is not None else {}
    one = await open_gateway(
        **fleet_options(tmp_path, redis_port, "one"), fleet_listen="127.0.0.1:0", **advertise
    )
    if proxy is not None:
        assert one.forwarder is not None and one.forwarder.link is not None
        proxy.target = one.forwarder.link.address
    two = await open_gateway(
        **fleet_options(tmp_path, redis_port, "two"),
        listen="127.0.0.2:0",
        fleet_listen="127.0.0.2:0",
        state_dir=str(tmp_path / "two"),
    )
    agent = await open_agent(one, expose=[f"0:{service.local}"])
    port: int = next(iter((await agent.wait_ready(DEADLINE)).values())).address.port
    forwarder = two.forwarder
    assert forwarder is not None
    await wait_until(lambda: port in forwarder.forwarded_ports(), DEADLINE, "two to forward")
    return one, two, port


async def test_the_fault_kit_on_the_gateway_to_gateway_link(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
    start_proxy: Callable[..., Awaitable[FaultProxy]],
    echo_server: Any,
    redis_port: int,
    tmp_path: Path,
) -> None:
    proxy = await start_proxy(Address("127.0.0.1", 9))  # its target: the link, once it listens
    one, two, port = await forwarding_pair(
        open_gateway, open_agent, echo_server, redis_port, tmp_path, proxy
    )
    assert one.forwarder is not None and two.forwarder is not None
    forwarder = two.forwarder

    payload = b"through the link " * 4096
    assert await exchange("127.0.0.2", port, payload) == (payload, "eof")

    proxy.delay(0.05)  # latency: slower, never wrong
    assert await exchange("127.0.0.2", port, payload) == (payload, "eof")
    proxy.heal()

    # A reset of the link while it carries a client: the client is reset, never ended cleanly.
    reader, writer = await asyncio.open_connection("127.0.0.2", port)
    writer.write(b"before the reset")
    assert await reader.readexactly(16) == b"before the reset"
    await proxy.reset()
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(DEADLINE):
            await reader.readexactly(1)
    writer.close()
    assert await exchange("127.0.0.2", port, b"the next client") == (b"the next client", "eof")

    # A black hole: the client that meets it is reset once the link's deadline passes, and
    # counted; healed, the next client passes.
    proxy.blackhole()
    failed = forwarder.totals.failed
    async with asyncio.timeout(4 * DEADLINE):
        assert await exchange("127.0.0.2", port, b"into the hole") == (b"", "reset")
    assert forwarder.totals.failed == failed + 1
    proxy.heal()
    assert await exchange("127.0.0.2", port, payload) == (payload, "eof")
    assert forwarder.totals.out >= 4 and one.forwarder.totals.into >= 4


async def test_small_writes_in_a_burst_all_cross_the_hop(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
    echo_server: Any,
    redis_port: int,
    tmp_path: Path,
) -> None:
    """A client that writes a 4-byte length and then its message at once (many do): each
    write is a TLS record on the link, and the far gateway, which may read the second one
    ahead with the first, must pass both on without waiting for more to arrive."""
    _, _, port = await forwarding_pair(open_gateway, open_agent, echo_server, redis_port, tmp_path)
    for round_ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.2", port)
        message = f"message {round_} ".encode() * 8
        writer.write(len(message).to_bytes(4, "big"))
        await writer.drain()
        writer.write(message)
        await writer.drain()
        async with asyncio.timeout(DEADLINE):
            assert await reader.readexactly(4 + len(message)) == (
                len(message).to_bytes(4, "big") + message
            ), f"round {round_}"
        writer.close()


async def test_a_reset_after_the_services_end_of_stream_reaches_the_client(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
    start_server: Callable[..., Awaitable[Any]],
    redis_port: int,
    tmp_path: Path,
) -> None:
    """The service replies, half-closes, then resets while the client, which got its EOF,
    sends nothing: the forwarding gateway watches the link meanwhile, so the client's
    connection is reset too (not left half-open until the client writes)."""
    told = asyncio.Event()

    async def reply_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"the reply")
        writer.write_eof()
        await told.wait()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    service = await start_server(reply_then_reset)
    _, _, port = await forwarding_pair(open_gateway, open_agent, service, redis_port, tmp_path)
    with socket.create_connection(("127.0.0.2", port), timeout=DEADLINE) as sock:
        received = b""
        while chunk := await asyncio.to_thread(sock.recv, 65536):
            received += chunk
        assert received == b"the reply"
        told.set()
        poll = select.poll()
        poll.register(sock, select.POLLERR)

        def reset() -> bool:  # an RST after the FIN: EPIPE (CLOSE_WAIT), else ECONNRESET
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if poll.poll(0) else 0
            return error in (errno.ECONNRESET, errno.EPIPE)

        await wait_until(reset, 2 * DEADLINE, "the client's connection to be reset")


async def test_join_carries_a_half_close_and_a_reset_after_the_bytes_before_it() -> None:
    """A client and a link, joined: the client's half-close reaches the link and the answer
    still comes back; then a link that sends bytes and resets: the client gets the bytes,
    then the reset."""
    from tunnelgate.transport import connect, open_listener

    async def pair() -> tuple[Any, Any]:
        listener = open_listener("127.0.0.1", 0)
        accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(listener.accept_forever(
            lambda stream, peer: accepted.set_result(stream), lambda exc: None))  # fmt: skip
        near = await connect(listener.address, DEADLINE)
        far = await accepted
        task.cancel()
        listener.close()
        return near, far

    client_near, client_far = await pair()  # the client, and the gateway's end of it
    link_near, link_far = await pair()  # the link, and the other gateway's end
    joined = asyncio.create_task(join(client_far, link_near))

    await client_near.send(b"question")
    client_near.send_eof()
    buffer = memoryview(bytearray(64))
    received = b""
    while n := await link_far.receive_into(buffer):
        received += bytes(buffer[:n])
    assert received == b"question"
    await link_far.send(b"last reply before the reset")
    await link_far.wait_delivered()
    link_far.abort()
    received = b""
    with pytest.raises(Exception, match=r"reset|Connection"):
        while n := await client_near.receive_into(buffer):
            received += bytes(buffer[:n])
    assert received == b"last reply before the reset"
    up, down, how = await joined
    assert (up, down) == (8, 27) and how.startswith("reset"), how
    client_near.abort()
