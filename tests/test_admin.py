"""The admin listener on a real gateway and agent: health, metrics and the JSON
API, asserted after real traffic through the tunnel."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import math
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from kit.admin import get_json, post, scrape, wait_async, wait_metrics
from kit.clients import echo_roundtrip
from kit.services import LocalServer, banner_handler
from kit.tokens import OTHER_TOKEN
from kit.tunnels import OpenAgent, OpenGateway, OpenTunnel, StartServer, Tunnel
from kit.waiting import wait_until
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

import tunnelgate
from tunnelgate import Address
from tunnelgate.admin.metrics import exposition, gateway_metrics
from tunnelgate.admin.server import AdminServer, Limits, Site
from tunnelgate.admin.sites import AgentSite, GatewaySite
from tunnelgate.errors import AuthenticationError

ADMIN_TOKEN = "admin-secret-for-the-tests-0123"

Serve = Callable[..., Awaitable[AdminServer]]


@pytest.fixture
async def serve(stack: contextlib.AsyncExitStack) -> Serve:
    """``await serve(site, token=None)``: an admin listener on loopback port 0."""

    async def serve_(site: Site, token: str | None = None, host: str = "127.0.0.1") -> AdminServer:
        server = AdminServer(site, Address(host, 0), token)
        await server.start()
        stack.push_async_callback(server.close)
        return server

    return serve_


SERVICE = "agent=site-a,service=svc"


async def test_health_and_readiness_need_no_credentials(
    echo_tunnel: Tunnel, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(GatewaySite(echo_tunnel.gateway), token=ADMIN_TOKEN)
    assert await get_json(http, server.url + "healthz") == {"status": "ok"}
    assert await get_json(http, server.url + "readyz") == {"ready": True}


async def test_metrics_count_bytes_while_a_connection_is_open(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    [(name, service)] = (await agent.wait_ready(10)).items()
    labels = f"agent=site-a,service={name}"
    up_labels = f"agent=site-a,direction=up,service={name}"
    down_labels = f"agent=site-a,direction=down,service={name}"
    server = await serve(GatewaySite(gateway))
    metrics = await scrape(http, server)
    assert metrics[("tunnelgate_agent_up", "agent=site-a")] == 1
    assert metrics[("tunnelgate_service_up", labels)] == 1
    assert metrics[("tunnelgate_service_connections_total", labels)] == 0

    public = service.address
    reader, writer = await asyncio.open_connection(public.host, public.port)
    try:
        for size, total in ((1000, 1000), (2000, 3000)):
            writer.write(b"x" * size)
            assert await reader.readexactly(size) == b"x" * size

            async def counted(total: int = total) -> bool:
                m = await scrape(http, server)
                up = m[("tunnelgate_service_transmit_bytes_total", up_labels)]
                down = m[("tunnelgate_service_transmit_bytes_total", down_labels)]
                return up == down == total

            await wait_async(counted, f"{total} bytes each way counted while open")
        metrics = await scrape(http, server)
        assert metrics[("tunnelgate_service_active_connections", labels)] == 1
        connections = await get_json(http, server.url + "api/v1/connections")
        assert [(c["service"], c["up"], c["down"]) for c in connections] == [(name, 3000, 3000)]
    finally:
        writer.close()
    active = ("tunnelgate_service_active_connections", labels)
    metrics = await wait_metrics(
        http, server, lambda m: m.get(active) == 0, "the connection counted as ended"
    )
    assert metrics[("tunnelgate_service_connections_total", labels)] == 1
    assert metrics[("tunnelgate_service_connection_duration_seconds_count", labels)] == 1
    assert metrics[("tunnelgate_service_transmit_bytes_total", up_labels)] == 3000


async def test_api_lists_agents_services_and_connections(
    echo_tunnel: Tunnel, serve: Serve, http: aiohttp.ClientSession, mode: str
) -> None:
    server = await serve(GatewaySite(echo_tunnel.gateway))
    info = await get_json(http, server.url + "api/v1")
    assert info["side"] == "gateway" and info["agents_connected"] == 1
    [agent] = await get_json(http, server.url + "api/v1/agents")
    assert agent["name"] == "site-a" and agent["online"] is True
    assert agent["version"] == f"tunnelgate {tunnelgate.__version__}"
    assert agent["tls"] == ("TLSv1.3" if mode == "tls" else "")
    assert agent["certificate"] == ""  # no mutual TLS here
    [service] = await get_json(http, server.url + "api/v1/services")
    assert service["agent"] == "site-a"
    assert service["address"].endswith(f":{echo_tunnel.address.port}")
    await echo_roundtrip(echo_tunnel.address)
    detail = await get_json(http, server.url + "api/v1/agents/site-a")
    [traffic] = detail["traffic"].values()
    assert traffic["connections"] == 1 and traffic["up"] == traffic["down"] > 0
    assert (await get_json(http, server.url + "api/v1/agents/nobody", 404))["error"]
    assert (await get_json(http, server.url + "api/v1/nothing", 404))["error"]


async def test_close_a_connection_and_disconnect_an_agent(
    echo_tunnel: Tunnel, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(GatewaySite(echo_tunnel.gateway))
    public = echo_tunnel.address
    reader, writer = await asyncio.open_connection(public.host, public.port)
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    [connection] = await get_json(http, server.url + "api/v1/connections")
    status, body = await post(http, server.url + f"api/v1/connections/{connection['id']}/close")
    assert (status, body) == (200, {"closed": connection["id"]})
    with contextlib.suppress(ConnectionError):
        assert await reader.read() == b""  # reset or closed: ended by the gateway
    writer.close()
    assert (await post(http, server.url + "api/v1/connections/999999/close"))[0] == 404

    first = echo_tunnel.agent.session_id
    status, body = await post(http, server.url + "api/v1/agents/site-a/disconnect")
    assert (status, body) == (200, {"disconnected": "site-a"})
    await wait_until(
        lambda: echo_tunnel.agent.session_id not in (None, first), what="the agent back"
    )
    metrics = await scrape(http, server)
    assert metrics[("tunnelgate_agent_disconnects_total", "agent=site-a,reason=closed")] == 1
    assert metrics[("tunnelgate_agent_connects_total", "agent=site-a")] == 2


async def test_actions_refuse_cross_site_requests(
    echo_tunnel: Tunnel, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(GatewaySite(echo_tunnel.gateway))
    url = server.url + "api/v1/agents/site-a/disconnect"
    form = await post(http, url, json=None, data={"a": "b"})
    assert form[0] == 403 and "Content-Type" in form[1]["error"]
    foreign = await post(http, url, headers={"Origin": "http://evil.example"})
    assert foreign[0] == 403 and "cross-site" in foreign[1]["error"]
    assert echo_tunnel.gateway.statistics().sessions  # still connected


@pytest.mark.errors_logged_on_purpose
async def test_credentials_bearer_or_basic_and_failures_delayed(
    echo_tunnel: Tunnel, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(GatewaySite(echo_tunnel.gateway), token=ADMIN_TOKEN)
    url = server.url + "api/v1"
    async with http.get(url) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    async with http.get(url, headers={"Authorization": "Bearer wrong"}) as response:
        assert response.status == 401
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await get_json_with(http, url, bearer))["side"] == "gateway"
    basic = base64.b64encode(f"anyone:{ADMIN_TOKEN}".encode()).decode()
    assert (await get_json_with(http, url, {"Authorization": f"Basic {basic}"}))["side"]
    async with http.get(server.url + "metrics", headers=bearer) as response:
        assert response.status == 200


async def get_json_with(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def test_a_listener_off_loopback_needs_a_token() -> None:
    with pytest.raises(ValueError, match="needs a token"):
        AdminServer(GatewaySite.__new__(GatewaySite), Address("0.0.0.0", 0))


async def test_agent_side_ready_and_metrics(
    echo_tunnel: Tunnel, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(AgentSite(echo_tunnel.agent))
    assert await get_json(http, server.url + "readyz") == {"ready": True}
    metrics = await scrape(http, server)
    gateway = f"gateway={echo_tunnel.gateway.address}"
    assert metrics[("tunnelgate_agent_control_up", gateway)] == 1
    [service] = await get_json(http, server.url + "api/v1/services")
    assert service["public"].endswith(f":{echo_tunnel.address.port}")
    await echo_tunnel.gateway.aclose()
    body = await get_json(http, server.url + "readyz", 503)
    assert body["ready"] is False and body["reason"]


async def test_events_tell_agents_and_services_coming_and_going(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await open_gateway()
    server = await serve(GatewaySite(gateway))
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    [name] = await agent.wait_ready(10)
    events = await get_json(http, server.url + "api/v1/events")
    assert [(e["kind"], e["agent"], e["service"]) for e in events] == [
        ("agent_up", "site-a", ""),
        ("service_up", "site-a", name),
    ]
    last = events[-1]["id"]
    await agent.shutdown()
    await wait_async(
        lambda: _has_event(http, server, last, "agent_down"), "the agent's goodbye as an event"
    )
    later = await get_json(http, server.url + f"api/v1/events?after={last}")
    assert [(e["kind"], e["service"]) for e in later] == [
        ("service_down", name),
        ("agent_down", ""),
    ]
    assert "goodbye" in later[-1]["detail"]
    assert (await get_json(http, server.url + "api/v1/events?after=x", 400))["error"]


async def _has_event(
    http: aiohttp.ClientSession, server: AdminServer, after: int, kind: str
) -> bool:
    events = await get_json(http, server.url + f"api/v1/events?after={after}")
    return any(e["kind"] == kind for e in events)


@pytest.mark.errors_logged_on_purpose("the refused agent logs its refusal")
async def test_an_authentication_failure_is_counted_and_an_event(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await open_gateway()
    server = await serve(GatewaySite(gateway))
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], token=OTHER_TOKEN)
    with pytest.raises(AuthenticationError):
        await agent.wait_ready(10)
    metrics = await scrape(http, server)
    assert metrics[("tunnelgate_auth_failures_total", "reason=token")] == 1
    [event] = await get_json(http, server.url + "api/v1/events")
    assert (event["kind"], event["agent"]) == ("auth_failure", "site-a")
    assert "token is wrong" in event["detail"] and OTHER_TOKEN not in event["detail"]
    # A name that failed to authenticate is not an agent the gateway knows.
    assert ("tunnelgate_agent_up", "agent=site-a") not in metrics


async def test_heartbeat_round_trip_is_measured(
    open_tunnel: OpenTunnel, echo_server: LocalServer, serve: Serve, http: aiohttp.ClientSession
) -> None:
    tunnel = await open_tunnel(
        echo_server, gateway_options={"heartbeat_interval": 0.05, "heartbeat_timeout": 5}
    )
    server = await serve(GatewaySite(tunnel.gateway))

    async def measured() -> bool:
        rtt = (await scrape(http, server)).get(
            ("tunnelgate_agent_heartbeat_rtt_seconds", "agent=site-a")
        )
        return rtt is not None and rtt > 0

    await wait_async(measured, "a heartbeat round trip measured")
    [agent] = await get_json(http, server.url + "api/v1/agents")
    assert agent["heartbeat_rtt"] > 0


def _parsed(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_exposition_says_what_prometheus_client_would(echo_tunnel: Tunnel) -> None:
    """The fast writer's text parses to the same samples as generate_latest's, odd
    label values and special numbers included."""
    await echo_roundtrip(echo_tunnel.address)
    stats = echo_tunnel.gateway.statistics()
    odd = GaugeMetricFamily("odd", "help with \\ and\nnewline", labels=["v"])
    odd.add_metric(['quote " backslash \\ newline \n end'], 1.5)
    odd.add_metric(["inf"], math.inf)
    odd.add_metric(["big"], 1.7966592674937894e09)

    def families() -> list[Metric]:
        return [*gateway_metrics(stats), odd]

    class Fixed(Collector):
        def collect(self) -> list[Metric]:
            return families()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())
    ours = exposition(families()).decode()
    assert _parsed(ours) == _parsed(generate_latest(registry).decode())
    assert len(_parsed(ours)) > 50


# --- hostile or slow clients on the admin port ---------------------------------------


async def test_a_request_head_that_never_ends_gets_408_and_others_are_served(
    echo_tunnel: Tunnel, stack: contextlib.AsyncExitStack, http: aiohttp.ClientSession
) -> None:
    server = AdminServer(
        GatewaySite(echo_tunnel.gateway), Address("127.0.0.1", 0), limits=Limits(head_timeout=0.3)
    )
    await server.start()
    stack.push_async_callback(server.close)
    assert server.address is not None
    reader, writer = await asyncio.open_connection(server.address.host, server.address.port)
    writer.write(b"GET /api/v1 HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and nothing more
    assert await get_json(http, server.url + "healthz") == {"status": "ok"}
    await echo_roundtrip(echo_tunnel.address)  # the tunnel does not notice
    async with asyncio.timeout(30):
        answer = await reader.read()
    assert answer.startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_bad_bodies_get_a_clear_4xx(
    echo_tunnel: Tunnel, serve: Serve, http: aiohttp.ClientSession
) -> None:
    server = await serve(GatewaySite(echo_tunnel.gateway))
    url = server.url + "api/v1/reload"
    status, body = await post(http, url, json=None, data=b"{not json",
                              headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and "not JSON" in body["error"]
    status, body = await post(http, url, json=None, data=b"[1, 2]",
                              headers={"Content-Type": "application/json"})  # fmt: skip
    assert status == 400 and "JSON object" in body["error"]
    async with http.post(
        url,
        data=io.BytesIO(b"{" + b" " * (1 << 20) + b"}"),
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 413
    assert echo_tunnel.gateway.statistics().sessions  # nothing else noticed


async def test_a_dashboard_that_stops_reading_is_dropped(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    stack: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"] * 100)
    await agent.wait_ready(10)
    limits = Limits(stream_interval=0.001, stream_write_timeout=0.5)
    server = AdminServer(GatewaySite(gateway), Address("127.0.0.1", 0), limits=limits)
    await server.start()
    stack.push_async_callback(server.close)
    assert server.address is not None
    _, writer = await asyncio.open_connection(server.address.host, server.address.port)
    writer.write(b"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\n\r\n")  # then never reads
    await wait_until(lambda: server.streams == 1, what="the stream open")
    async with http.get(server.url + "api/v1/stream") as live:  # a reader, meanwhile
        first = await live.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {")
        await wait_until(lambda: server.streams == 1, timeout=60, what="the stalled stream dropped")
        assert (await live.content.readuntil(b"\n\n")).startswith(b"data: {")
    writer.close()


DOWNLOAD = 48 << 20


async def test_a_long_download_shows_its_bytes_while_it_runs(
    open_tunnel: OpenTunnel,
    start_server: StartServer,
    serve: Serve,
    http: aiohttp.ClientSession,
) -> None:
    """Big reads go the splice path (plain TCP) or the copy path (TLS): either way the
    byte counter moves while the connection is open, not only when it ends."""
    service = await start_server(banner_handler(b"x" * DOWNLOAD))
    tunnel = await open_tunnel(service)
    server = await serve(GatewaySite(tunnel.gateway))
    [name] = tunnel.services
    down = ("tunnelgate_service_transmit_bytes_total",
            f"agent=site-a,direction=down,service={name}")  # fmt: skip
    reader, writer = await asyncio.open_connection(tunnel.address.host, tunnel.address.port)
    try:
        await reader.readexactly(8 << 20)  # then stop reading: the transfer stalls, open
        metrics = await wait_metrics(
            http, server, lambda m: m.get(down, 0) >= 8 << 20, "8 MiB counted", timeout=30
        )
        assert metrics[down] < DOWNLOAD, "counted as if it had ended"
        rest = DOWNLOAD - (8 << 20)
        assert len(await reader.readexactly(rest)) == rest
    finally:
        writer.close()
    await wait_metrics(
        http, server, lambda m: m.get(down) == DOWNLOAD, "all of it counted", timeout=30
    )
