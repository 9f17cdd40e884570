"""The dashboard in a real headless browser (the system's chromium, driven by
Playwright) against a real gateway and agent: it loads with no console error,
shows the agent and the service, counts the connections a test holds open, and
its buttons disconnect an agent and close a connection. A screenshot of each
view is kept in ``test-artifacts/`` (or $TUNNELGATE_ARTIFACTS)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kit.processes import require_tool
from kit.services import LocalServer
from kit.tunnels import OpenAgent, OpenGateway
from kit.waiting import wait_until

from tunnelgate import Address
from tunnelgate.admin.server import AdminServer
from tunnelgate.admin.sites import GatewaySite

playwright = pytest.importorskip("playwright.async_api")

ARTIFACTS = Path(os.environ.get("TUNNELGATE_ARTIFACTS", "test-artifacts"))
VIEWS = ["overview", "agents", "services", "connections", "events"]


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
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
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
