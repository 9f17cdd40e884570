"""Public ports across reconnects: a service that asked for any port keeps the
one the gateway chose, so its public address survives a gateway restart."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from kit.clients import echo_roundtrip
from kit.logs import LogRecorder
from kit.services import LocalServer
from kit.tunnels import OpenAgent, OpenGateway, gateway_defaults
from kit.waiting import wait_until

from tunnelgate import Address, Gateway

pytestmark = pytest.mark.timeout(60)


async def restart_with_agent(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    mode: str,
    state_dir: Path,
    between: Callable[[int], None] = lambda port: None,
) -> tuple[int, list[Address]]:
    """Expose with port 0, restart the gateway on its port, and return the first
    public port and the addresses registered with the second gateway."""
    async with Gateway(**gateway_defaults(mode, state_dir)) as first:
        assert first.address is not None
        control_port = first.address.port
        agent = await open_agent(first, expose=[f"0:{echo_server.local}"])
        (service,) = (await agent.wait_ready(10)).values()
        public = service.address.port
        await echo_roundtrip(service.address)
        old_session = agent.session_id
    await wait_until(lambda: agent.session_id != old_session, what="the agent to notice")
    between(public)
    second = await open_gateway(listen=f"127.0.0.1:{control_port}")
    addresses = await wait_until(
        lambda: second.sessions().get("site-a"), timeout=10, what="the agent to register again"
    )
    return public, addresses


async def test_any_port_service_keeps_its_port_across_gateway_restart(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    mode: str,
    state_dir: Path,
) -> None:
    """After a gateway restart, a service exposed with port 0 is back on the same port."""
    public, addresses = await restart_with_agent(
        open_gateway, open_agent, echo_server, mode, state_dir
    )
    assert addresses == [Address("127.0.0.1", public)]
    await echo_roundtrip(addresses[0])


async def test_any_port_service_moves_when_its_old_port_is_taken(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    mode: str,
    state_dir: Path,
    tunnel_log: LogRecorder,
) -> None:
    """If another process took the old port meanwhile, the service gets a new one
    in the same session, and the agent says why."""
    squatter = socket.socket()

    def take(port: int) -> None:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()

    try:
        public, addresses = await restart_with_agent(
            open_gateway, open_agent, echo_server, mode, state_dir, between=take
        )
        assert len(addresses) == 1 and addresses[0].port != public
        await echo_roundtrip(addresses[0])
        assert tunnel_log.find("cannot have its former port", logging.WARNING)
    finally:
        squatter.close()
