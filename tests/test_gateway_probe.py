"""The gateway's probe channel (what ``tunnelgate doctor`` measures against), in process
over TLS and plain TCP: its bounds, so that a token holder cannot make it a load
generator, and that it never touches a session. The doctor's whole run is in
tests/test_doctor.py."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
from kit.logs import LogRecorder
from kit.tokens import TOKEN
from kit.tunnels import agent_tls_options
from kit.waiting import wait_until

from tunnelgate import Gateway
from tunnelgate.agent.session import Dialer
from tunnelgate.channel import Channel
from tunnelgate.config import load_agent_config
from tunnelgate.errors import ConnectionClosed, TransportError
from tunnelgate.logs import ContextLogger
from tunnelgate.protocol import wire
from tunnelgate.protocol.session import State

OpenGateway = Callable[..., Awaitable[Gateway]]


def dialer_for(gateway: Gateway, mode: str) -> Dialer:
    flags = {
        "gateway": str(gateway.address),
        "token": TOKEN,
        "name": "site-a",
        "expose": ["0:127.0.0.1:1"],
    }
    config, _ = load_agent_config(None, {**flags, **agent_tls_options(mode, gateway)})
    return Dialer(config, config.gateways[0], ContextLogger(logging.getLogger("tunnelgate.test")))


async def accepted_probe(dialer: Dialer) -> Channel:
    channel = await dialer.open("probe")
    await channel.send_message(wire.Ping(0))
    assert await channel.receive() == wire.Pong(0)
    return channel


async def test_probe_measures_each_way_once_then_is_cut_off(
    open_gateway: OpenGateway, mode: str, tunnel_log: LogRecorder
) -> None:
    """A second measurement the same way is past the probe's bounds: the gateway ends
    the channel with an ABORT saying which limit, and logs the probe once."""
    gateway = await open_gateway()
    channel = await accepted_probe(dialer_for(gateway, mode))
    await channel.send_message(wire.Measure("source", 0.05))
    events = []
    while not isinstance(event := await channel.receive_event(), wire.Measured):
        events.append(type(event))
    assert set(events) == {wire.Data, wire.End} and events[-1] is wire.End
    assert event.size > 0
    assert channel.conversation.state is State.PROBE

    await channel.send_message(wire.Measure("source", 0.05))
    event = await channel.receive_event()
    assert isinstance(event, wire.Abort)
    assert event.reason == "probe limit reached: a second source measurement"
    with pytest.raises((ConnectionClosed, TransportError)):
        await channel.receive_event()
    channel.abort()
    await wait_until(lambda: tunnel_log.find("probe from"), what="the probe's line")
    [line] = tunnel_log.find("probe from")
    assert "ended: probe limit reached" in line
    assert not gateway.sessions()


async def test_second_probe_of_an_agent_is_refused_while_one_runs(
    open_gateway: OpenGateway, mode: str
) -> None:
    """One probe per agent name at a time: the next one is told the gateway is busy."""
    gateway = await open_gateway()
    dialer = dialer_for(gateway, mode)
    first = await accepted_probe(dialer)
    second = await dialer.open("probe")
    await second.send_message(wire.Ping(0))
    refused = await second.receive()
    assert isinstance(refused, wire.Refused) and refused.code == "busy"
    second.abort()
    await first.send_message(wire.Ping(1))  # the first one is unaffected
    assert await first.receive() == wire.Pong(1)
    await first.send_message(wire.Bye("done"))
    first.abort()
