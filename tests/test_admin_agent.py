"""The agent's admin listener on a real gateway and agent: its counts per gateway
(sessions, reconnects, heartbeat round trip) and per service (connections, dial
time and errors, bytes), its open connections and closing one, asserted after
real traffic through the tunnel; and the pure parts those counts rest on."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from kit.admin import Metrics, get_json, labels, post, scrape, wait_metrics
from kit.clients import connect, read_to_end
from kit.ports import refusing_port
from kit.services import LocalServer
from kit.tunnels import OpenAgent, OpenGateway, gateway_defaults

from tunnelgate import Address, Agent, Gateway
from tunnelgate.admin.server import AdminServer
from tunnelgate.admin.sites import AgentSite
from tunnelgate.agent.agent import reconnect_reason
from tunnelgate.agent.session import dial_error_reason
from tunnelgate.errors import (
    ConnectionClosed,
    RemoteProtocolError,
    TransportError,
)
from tunnelgate.stats import (
    DIAL_ERROR_REASONS,
    RECONNECT_REASONS,
    AgentServiceTotals,
    GatewayRecord,
)

# --- the agent's admin listener -------------------------------------------------


@pytest.fixture
async def serve(stack: contextlib.AsyncExitStack) -> Callable[[Agent], Awaitable[AdminServer]]:
    """``await serve(agent)``: the agent's admin listener on loopback port 0."""

    async def serve_(agent: Agent) -> AdminServer:
        server = AdminServer(AgentSite(agent), Address("127.0.0.1", 0))
        await server.start()
        stack.push_async_callback(server.close)
        return server

    return serve_


Serve = Callable[[Agent], Awaitable[AdminServer]]


# --- through a real tunnel ---------------------------------------------------------


async def test_agent_metrics_count_a_connection_and_its_bytes_while_open(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    """A connection held open shows on the agent as active, dialed once, with bytes
    both ways that grow as it runs and stay counted after it ends."""
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    [(name, service)] = (await agent.wait_ready(10)).items()
    server = await serve(agent)
    svc = labels(service=name)
    up, down = labels(service=name, direction="up"), labels(service=name, direction="down")
    metrics = await scrape(http, server)
    assert metrics[("tunnelgate_agent_service_connections_total", svc)] == 0
    assert metrics[("tunnelgate_agent_service_transmit_bytes_total", up)] == 0

    def moved(total: int) -> Callable[[Metrics], bool]:
        def check(m: Metrics) -> bool:
            sent = m[("tunnelgate_agent_service_transmit_bytes_total", up)]
            received = m[("tunnelgate_agent_service_transmit_bytes_total", down)]
            return sent == received == total

        return check

    async with connect(service.address) as (reader, writer):
        total = 0
        for size in (1000, 2000):  # the counters move while the connection stays open
            writer.write(b"x" * size)
            await writer.drain()
            await reader.readexactly(size)
            total += size
            metrics = await wait_metrics(http, server, moved(total), f"{total} bytes each way")
            assert metrics[("tunnelgate_agent_service_active_connections", svc)] == 1
        assert metrics[("tunnelgate_agent_service_connections_total", svc)] == 1
        assert metrics[("tunnelgate_agent_service_dial_seconds_count", svc)] == 1
        gateway_label = labels(gateway=str(gateway.address))
        assert metrics[("tunnelgate_agent_active_connections", gateway_label)] == 1
        [connection] = await get_json(http, server.url + "api/v1/connections")
        assert (connection["service"], connection["state"]) == (name, "relaying")
        assert (connection["up"], connection["down"]) == (3000, 3000)
        [view] = await get_json(http, server.url + "api/v1/services")
        assert (view["connections"], view["connections_total"]) == (1, 1)

    metrics = await wait_metrics(
        http,
        server,
        lambda m: m[("tunnelgate_agent_service_active_connections", svc)] == 0,
        "the connection counted as ended",
    )
    assert moved(3000)(metrics)  # moved from the open connection to the totals, not lost
    assert metrics[("tunnelgate_agent_service_connections_total", svc)] == 1
    info = await get_json(http, server.url + "api/v1")
    assert (info["connections"], info["connections_total"]) == (0, 1)
    assert info["up"] == info["down"] == 3000


async def test_agent_counts_a_service_that_refuses(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    """A client for a service that refuses connections is counted as a refused dial."""
    gateway = await open_gateway()
    with refusing_port() as port:
        agent = await open_agent(gateway, expose=[f"0:127.0.0.1:{port}"])
        [(name, service)] = (await agent.wait_ready(10)).items()
        server = await serve(agent)
        async with connect(service.address) as (reader, _):
            assert (await read_to_end(reader))[0] == 0
        refused = (
            "tunnelgate_agent_service_dial_errors_total",
            labels(reason="refused", service=name),
        )
        metrics = await wait_metrics(http, server, lambda m: m[refused] == 1, "a refused dial")
    svc = labels(service=name)
    assert metrics[("tunnelgate_agent_service_connections_total", svc)] == 0
    assert metrics[("tunnelgate_agent_service_dial_seconds_count", svc)] == 0
    assert metrics[("tunnelgate_agent_service_active_connections", svc)] == 0
    info = await get_json(http, server.url + "api/v1")
    assert info["dial_errors"] == {"refused": 1, "timeout": 0, "unreachable": 0, "other": 0}


async def test_agent_counts_reconnects_while_its_gateway_restarts(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    serve: Serve,
    http: aiohttp.ClientSession,
    mode: str,
    state_dir: Path,
) -> None:
    """A gateway that goes away shows as control down, a goodbye and refused dials;
    once it is back, the control channel is up again in a second session."""
    async with Gateway(**gateway_defaults(mode, state_dir)) as first:
        assert first.address is not None
        port = first.address.port
        agent = await open_agent(first, expose=[f"0:{echo_server.local}"])
        await agent.wait_ready(10)
        server = await serve(agent)
        g = labels(gateway=str(first.address))
        metrics = await scrape(http, server)
        assert metrics[("tunnelgate_agent_control_up", g)] == 1
        assert metrics[("tunnelgate_agent_sessions_total", g)] == 1
        assert metrics[("tunnelgate_agent_gateway_connected_timestamp_seconds", g)] > 0

    def reconnects(reason: str) -> tuple[str, str]:
        return (
            "tunnelgate_agent_reconnects_total",
            labels(gateway=str(first.address), reason=reason),
        )

    metrics = await wait_metrics(
        http,
        server,
        lambda m: m[("tunnelgate_agent_control_up", g)] == 0 and m[reconnects("refused")] >= 1,
        "control down and a refused dial",
    )
    assert metrics[reconnects("goodbye")] == 1  # the gateway said goodbye as it closed
    assert metrics[reconnects("heartbeat")] == 0
    assert (await get_json(http, server.url + "readyz", 503))["ready"] is False

    await open_gateway(listen=f"127.0.0.1:{port}")
    metrics = await wait_metrics(
        http,
        server,
        lambda m: m[("tunnelgate_agent_control_up", g)] == 1,
        "the control channel up again",
    )
    assert metrics[("tunnelgate_agent_sessions_total", g)] == 2
    assert metrics[reconnects("goodbye")] == 1
    [view] = (await get_json(http, server.url + "api/v1"))["gateways"]
    assert (view["up"], view["sessions"]) == (True, 2)
    assert view["reconnects"]["refused"] >= 1


async def test_agent_shows_the_heartbeat_round_trip(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    """After a heartbeat is answered, the agent shows its round trip and when it connected."""
    gateway = await open_gateway(heartbeat_interval=0.2, heartbeat_timeout=2)
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    await agent.wait_ready(10)
    server = await serve(agent)
    g = labels(gateway=str(gateway.address))
    metrics = await wait_metrics(
        http,
        server,
        lambda m: ("tunnelgate_agent_heartbeat_rtt_seconds", g) in m,
        "a heartbeat answered",
    )
    assert metrics[("tunnelgate_agent_heartbeat_rtt_seconds", g)] > 0
    assert metrics[("tunnelgate_agent_heartbeat_round_trip_seconds_count", g)] >= 1
    assert metrics[("tunnelgate_agent_heartbeat_round_trip_seconds_sum", g)] > 0
    [session] = await get_json(http, server.url + "api/v1/sessions")
    assert session["rtt"] > 0 and session["connected_at"] > 0
    assert session["id"] == agent.session_id


async def test_agent_closes_one_connection_on_request(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    """An open connection is listed under the gateway's id; closing it resets the client."""
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    [(name, service)] = (await agent.wait_ready(10)).items()
    server = await serve(agent)
    async with connect(service.address) as (reader, writer):
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        [connection] = await get_json(http, server.url + "api/v1/connections")
        [[client]] = [s.clients for s in gateway.statistics().sessions]
        assert connection["id"] == client.conn
        assert connection["client"] == client.client
        assert (connection["service"], connection["up"], connection["down"]) == (name, 5, 5)
        status, body = await post(http, server.url + f"api/v1/connections/{connection['id']}/close")
        assert (status, body) == (200, {"closed": connection["id"]})
        assert await read_to_end(reader) == (0, "reset")
    assert await get_json(http, server.url + "api/v1/connections") == []
    assert (await post(http, server.url + f"api/v1/connections/{connection['id']}/close"))[0] == 404
    assert (await post(http, server.url + "api/v1/connections/nope/close"))[0] == 404
    up = labels(service=name, direction="up")
    metrics = await scrape(http, server)
    assert metrics[("tunnelgate_agent_service_transmit_bytes_total", up)] == 5


# --- the pure parts ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ECONNREFUSED, "refused"),
        (errno.ETIMEDOUT, "timeout"),
        (errno.EHOSTUNREACH, "unreachable"),
        (errno.ENETUNREACH, "unreachable"),
        (errno.ECONNRESET, "other"),
        (None, "other"),
    ],
)
def test_dial_error_reason_from_the_error_number(code: int | None, reason: str) -> None:
    """A failed connect is labelled by its error number, within the fixed set."""
    assert dial_error_reason(TransportError("cannot connect", code)) == reason
    assert reason in DIAL_ERROR_REASONS


@pytest.mark.parametrize(
    ("exc", "welcomed", "reason"),
    [
        (TimeoutError(), True, "heartbeat"),
        (TimeoutError(), False, "error"),
        (ConnectionClosed("eof"), True, "closed"),
        (TransportError("connection reset by peer", errno.ECONNRESET), True, "closed"),
        (ConnectionClosed("closed", "gateway refused: busy"), False, "refused"),
        (TransportError("cannot connect", errno.ECONNREFUSED), False, "refused"),
        (TransportError("cannot connect", errno.ETIMEDOUT), False, "unreachable"),
        (TransportError("cannot connect", errno.EHOSTUNREACH), False, "unreachable"),
        (TransportError("TLS handshake failed"), False, "error"),
        (RemoteProtocolError("bad frame"), True, "error"),
    ],
)
def test_reconnect_reason_from_how_the_session_ended(
    exc: Exception, welcomed: bool, reason: str
) -> None:
    """Each way a session or an attempt ends is counted under one fixed reason."""
    assert reconnect_reason(exc, welcomed) == reason
    assert reason in RECONNECT_REASONS


def test_gateway_record_keeps_counts_across_sessions() -> None:
    """Sessions and round trips add up; the last round trip is forgotten once down."""
    record = GatewayRecord("gw:8080")
    record.connected(100.0)
    record.answered(0.004)
    record.disconnected(160.0)
    record.reconnecting("heartbeat")
    record.connected(170.0)
    stats = record.statistics(200.0)
    assert (stats.up, stats.sessions, stats.connected_at, stats.last_seen) == (True, 2, 170, 200)
    assert stats.rtt is None and stats.heartbeat.count == 1
    assert dict(stats.reconnects) == dict.fromkeys(RECONNECT_REASONS, 0) | {"heartbeat": 1}
    record.disconnected(210.0)
    assert record.statistics(300.0).last_seen == 210


def test_service_totals_add_the_open_connections() -> None:
    """Bytes shown are the ended connections' plus the open ones', never less."""
    totals = AgentServiceTotals()
    totals.started(0.0002)
    totals.ended(up=10, down=20)
    totals.failed("refused")
    counts = totals.counts(active=1, open_up=5, open_down=7)
    assert (counts.connections, counts.active, counts.up, counts.down) == (1, 1, 15, 27)
    assert counts.dial.count == 1 and dict(counts.dial_errors)["refused"] == 1
