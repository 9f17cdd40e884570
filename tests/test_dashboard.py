"""The dashboard in a real headless browser (the system's chromium, driven by
Playwright) against a real gateway and agent: it loads with no console error,
shows the agent and the service, counts the connections a test holds open, and
its buttons disconnect an agent and close a connection; the Fleet view shows the
gateways of a fleet on a real Redis, the ports leased and the one forwarded, and
stays hidden on a gateway in no fleet. A screenshot of each view is kept in
``test-artifacts/`` (or $TUNNELGATE_ARTIFACTS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from kit.clients import echo_roundtrip
from kit.ports import refusing_port
from kit.processes import require_tool
from kit.services import LocalServer
from kit.tunnels import OpenAgent, OpenGateway
from kit.waiting import DEADLINE, wait_until

from tunnelgate import Address, __version__
from tunnelgate.admin.server import AdminServer
from tunnelgate.admin.sites import GatewaySite

playwright = pytest.importorskip("playwright.async_api")

ARTIFACTS = Path(os.environ.get("TUNNELGATE_ARTIFACTS", "test-artifacts"))
VIEWS = ["overview", "agents", "services", "connections", "events"]
WAIT_MS = DEADLINE * 1000  # for the page; the fleet's view is read every 5 s


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    executable = require_tool("chromium")
    async with playwright.async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            await browser.close()


def watch(page: Any) -> list[str]:
    """The page's errors, as they come: uncaught exceptions and console errors. A gateway in
    no fleet answers the page's one question about its fleet with 404, which chromium logs
    as a failed load: that one is no error."""

    def console(message: Any) -> None:
        asked = message.location.get("url", "").endswith("/api/v1/fleet")
        if message.type == "error" and not (asked and "404" in message.text):
            problems.append(message.text)

    problems: list[str] = []
    page.on("console", console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return problems


@pytest.mark.parametrize("mode", ["plain"])
async def test_dashboard_shows_the_tunnel_live_and_its_buttons_work(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    stack: contextlib.AsyncExitStack,
    browser: Any,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    [(name, service)] = (await agent.wait_ready(10)).items()
    site = GatewaySite(gateway, history=tmp_path / "history.sqlite3")
    server = AdminServer(site, Address("127.0.0.1", 0))
    await server.start()
    stack.push_async_callback(server.close)

    page = await browser.new_page(viewport={"width": 1200, "height": 800})
    problems = watch(page)
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.goto(server.url)
    await page.wait_for_function("document.getElementById('agents-online').textContent === '1 / 1'")
    assert await page.text_content("#link") == "live"  # Server-Sent Events, not polling

    # Connections held open show up in the overview, live.
    held = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection(service.address.host, service.address.port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        held.append(writer)
    await page.wait_for_function("document.getElementById('open-connections').textContent === '3'")

    for view in VIEWS:
        await page.goto(f"{server.url}#{view}")
        await page.wait_for_selector(f"#{view}:not([hidden])")
        await page.screenshot(path=str(artifacts / f"dashboard-{view}.png"), full_page=True)
    await page.goto(f"{server.url}#agents")
    assert "site-a" in await page.text_content("#agents-table")
    await page.goto(f"{server.url}#services")
    assert name in await page.text_content("#services-table")

    # Close one connection from the page: the client sees its end.
    await page.goto(f"{server.url}#connections")
    await page.wait_for_selector("#connections-table tbody tr button")
    await page.click("#connections-table tbody tr button")
    await page.wait_for_function("document.getElementById('open-connections').textContent === '2'")

    # Disconnect the agent from the page: it comes back with a new session.
    first = agent.session_id
    await page.goto(f"{server.url}#agents")
    await page.click("#agents-table tbody tr button")
    await wait_until(lambda: agent.session_id not in (None, first), what="the agent back")
    for writer in held:
        writer.close()
    assert problems == []


@pytest.mark.parametrize("mode", ["plain"])
async def test_dashboard_fits_a_phone_and_a_thousand_services(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    stack: contextlib.AsyncExitStack,
    browser: Any,
    artifacts: Path,
) -> None:
    gateway = await open_gateway()
    for site in ("a", "b", "c", "d"):  # 1,000 services: an agent registers at most 256
        agent = await open_agent(
            gateway, name=f"site-{site}", expose=[f"0:{echo_server.local}"] * 250
        )
        await agent.wait_ready(30)
    server = AdminServer(GatewaySite(gateway), Address("127.0.0.1", 0))
    await server.start()
    stack.push_async_callback(server.close)
    page = await browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    await page.goto(f"{server.url}#services")
    await page.wait_for_function(
        "document.querySelectorAll('#services-table tbody tr').length === 1000",
        timeout=30_000,
    )
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, "the page scrolls sideways on a phone (only tables may)"
    await page.fill("#services .filter", "#250")  # the last one of each agent
    await page.wait_for_function(
        "[...document.querySelectorAll('#services-table tbody tr')]"
        ".filter(r => !r.hidden).length === 4"
    )
    await page.screenshot(path=str(artifacts / "dashboard-phone.png"))
    assert problems == []


def fleet_options(tmp_path: Path, redis_port: int, ca: trustme.CA, node: str, host: str) -> Any:
    """The options of gateway ``node`` of this test's fleet, forwarding, listening on ``host``."""
    certs = tmp_path / "certs"
    certs.mkdir(exist_ok=True)
    ca.cert_pem.write_to_path(certs / "ca.crt")
    cert = ca.issue_cert(f"{node}.fleet.test")
    cert.cert_chain_pems[0].write_to_path(certs / f"{node}.crt")
    cert.private_key_pem.write_to_path(certs / f"{node}.key")
    return {
        "listen": f"{host}:0",
        "fleet": f"redis://127.0.0.1:{redis_port}/0",
        "fleet_name": tmp_path.name,
        "fleet_node": node,
        "fleet_listen": f"{host}:0",
        "fleet_ca": str(certs / "ca.crt"),
        "fleet_cert": str(certs / f"{node}.crt"),
        "fleet_key": str(certs / f"{node}.key"),
        "state_dir": str(tmp_path / node),
    }


@pytest.mark.parametrize("mode", ["plain"])
async def test_dashboard_shows_the_fleet(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    stack: contextlib.AsyncExitStack,
    browser: Any,
    artifacts: Path,
    tmp_path: Path,
    redis_port: int,
) -> None:
    """Two gateways of a fleet on a real Redis, an agent on the first: the second's dashboard
    shows both gateways (itself marked), the agent's port leased to it on the first and
    forwarded by the second, and counts a client carried to the first."""
    ca = trustme.CA()
    one = await open_gateway(**fleet_options(tmp_path, redis_port, ca, "one", "127.0.0.1"))
    two = await open_gateway(**fleet_options(tmp_path, redis_port, ca, "two", "127.0.0.2"))
    agent = await open_agent(one, expose=[f"0:{echo_server.local}"])
    [service] = (await agent.wait_ready(DEADLINE)).values()
    port = service.address.port
    forwarder = two.forwarder
    assert forwarder is not None
    await wait_until(
        lambda: port in forwarder.forwarded_ports(), DEADLINE, f"two to forward port {port}"
    )
    # Names come from the registry, whoever wrote them there: the page shows them as text.
    with redis.Redis(port=redis_port, socket_timeout=DEADLINE) as client:
        about = {"address": "<i>nowhere</i>", "version": "0", "agents": ["<img src=x>"]}
        client.set(f"tunnelgate:{tmp_path.name}:node:<b>x</b>", json.dumps(about), ex=60)
    server = AdminServer(GatewaySite(two), Address("127.0.0.1", 0))
    await server.start()
    stack.push_async_callback(server.close)

    page = await browser.new_page(viewport={"width": 1200, "height": 800})
    problems = watch(page)
    await page.goto(f"{server.url}#fleet")
    await page.wait_for_selector("#fleet:not([hidden])", timeout=WAIT_MS)
    assert await page.is_visible("#fleet-nav")
    assert await page.text_content("#fleet-name") == tmp_path.name
    assert await page.text_content("#fleet-node") == "two"
    assert await page.text_content("#fleet-registry") == "up"
    assert await page.is_hidden("#fleet-warning")
    # one announces its agent when it renews: the page shows it within a few of its reads.
    await page.wait_for_function(
        "document.querySelector('#fleet-nodes-table tr[data-node=\"one\"]')"
        "?.cells[3].textContent === 'site-a'",
        timeout=5 * WAIT_MS,
    )
    nodes = await page.eval_on_selector_all(
        "#fleet-nodes-table tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )
    assert nodes == [
        ["<b>x</b>", "<i>nowhere</i>", "0", "<img src=x>"],
        ["one", str(one.address), __version__, "site-a"],
        ["two this gateway", str(two.address), __version__, "\u2013"],  # none: a dash
    ], nodes
    assert await page.locator("#fleet b, #fleet i, #fleet img").count() == 0
    lease = await page.eval_on_selector_all(
        f"#fleet-leases-table tr[data-port='{port}']",
        "rows => rows.map(r => [...r.cells].map(c => c.textContent))",
    )
    assert lease == [[str(port), "site-a", "one", "forwarded"]], lease

    # A client through two is carried to one: the page counts it at its next read.
    await echo_roundtrip(Address("127.0.0.2", port))
    await page.wait_for_function(
        "document.getElementById('fleet-out').textContent === '1'", timeout=WAIT_MS
    )
    assert str(port) in (await page.text_content("#fleet-forwarding-note") or "")
    await page.screenshot(path=str(artifacts / "dashboard-fleet.png"), full_page=True)
    assert problems == []


@pytest.mark.parametrize("mode", ["plain"])
async def test_dashboard_warns_that_the_fleets_registry_is_down(
    open_gateway: OpenGateway,
    stack: contextlib.AsyncExitStack,
    browser: Any,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    """A gateway whose Redis refuses connections serves all the same: the Fleet view says the
    registry is down, and why, and the tab is marked."""
    port = stack.enter_context(refusing_port())
    gateway = await open_gateway(fleet=f"redis://127.0.0.1:{port}/0", fleet_node="lone",
                                 fleet_name=tmp_path.name)  # fmt: skip
    assert gateway.fleet is not None and not gateway.fleet.up
    server = AdminServer(GatewaySite(gateway), Address("127.0.0.1", 0))
    await server.start()
    stack.push_async_callback(server.close)
    page = await browser.new_page()
    problems = watch(page)
    await page.goto(f"{server.url}#fleet")
    await page.wait_for_selector("#fleet-warning:not([hidden])", timeout=WAIT_MS)
    warning = await page.text_content("#fleet-warning") or ""
    assert "registry cannot be reached" in warning and str(port) in warning, warning
    assert await page.text_content("#fleet-registry") == "down"
    assert await page.text_content("#fleet-node") == "lone"
    assert "warn" in (await page.get_attribute("#fleet-nav", "class") or "")
    assert "registry is down" in (await page.text_content("#fleet-nodes-table tbody") or "")
    assert "no fleet_listen" in (await page.text_content("#fleet-forwarding-note") or "")
    assert await page.is_hidden("#fleet-forwarding")
    await page.screenshot(path=str(artifacts / "dashboard-fleet-down.png"), full_page=True)
    assert problems == []


@pytest.mark.parametrize("mode", ["plain"])
async def test_dashboard_hides_the_fleet_of_a_gateway_in_none(
    open_gateway: OpenGateway,
    stack: contextlib.AsyncExitStack,
    browser: Any,
) -> None:
    gateway = await open_gateway()
    server = AdminServer(GatewaySite(gateway), Address("127.0.0.1", 0))
    await server.start()
    stack.push_async_callback(server.close)
    page = await browser.new_page()
    problems = watch(page)
    async with page.expect_response(lambda r: r.url.endswith("/api/v1/fleet")) as asked:
        await page.goto(f"{server.url}#fleet")
    assert (await asked.value).status == 404
    await page.wait_for_function(
        "document.getElementById('fleet').dataset.state === 'none'", timeout=WAIT_MS
    )
    assert await page.is_hidden("#fleet") and await page.is_hidden("#fleet-nav")
    assert await page.is_visible("#overview")  # #fleet, in no fleet: the overview instead
    assert problems == []
