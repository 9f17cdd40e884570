"""The traffic history and the stored events: written from a real gateway's
counters, served by the admin API, still there after a restart, and a broken
database never in the tunnel's way."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from kit.admin import get_json
from kit.clients import echo_roundtrip
from kit.logs import recording
from kit.services import LocalServer
from kit.tunnels import OpenAgent, OpenGateway

from tunnelgate import Address
from tunnelgate.admin.history import History
from tunnelgate.admin.server import AdminServer
from tunnelgate.admin.sites import GatewaySite


async def serve(stack: contextlib.AsyncExitStack, site: GatewaySite) -> AdminServer:
    server = AdminServer(site, Address("127.0.0.1", 0))
    await server.start()
    stack.push_async_callback(server.close)
    return server


async def test_traffic_is_kept_across_a_gateway_restart(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    stack: contextlib.AsyncExitStack,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    database = tmp_path / "history.sqlite3"
    gateway = await open_gateway()
    site = GatewaySite(gateway, history=database)
    server = await serve(stack, site)
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    [(name, service)] = (await agent.wait_ready(10)).items()
    for _ in range(3):
        await echo_roundtrip(service.address, b"x" * 1000)
    assert site.recorder is not None
    await site.recorder.write()
    traffic = await get_json(http, server.url + f"api/v1/services/{name}/traffic?range=1h")
    assert traffic["agent"] == "site-a"
    [point] = traffic["points"]
    assert (point["connections"], point["up"], point["down"]) == (3, 3000, 3000)
    await agent.aclose()
    await server.close()  # writes what is left, closes the database
    await gateway.aclose()

    again = await open_gateway()
    site = GatewaySite(again, history=database)
    server = await serve(stack, site)
    url = server.url + f"api/v1/services/{name}/traffic?range=30d&agent=site-a"
    [day] = (await get_json(http, url))["points"]
    assert (day["connections"], day["up"], day["down"]) == (3, 3000, 3000)
    kinds = [e["kind"] for e in await get_json(http, server.url + "api/v1/history/events")]
    assert kinds[:2] == ["agent_up", "service_up"] and "agent_down" in kinds
    assert await get_json(http, server.url + f"api/v1/services/{name}/traffic?range=2y", 400)
    assert (await get_json(http, server.url + "api/v1/services/nothing/traffic", 400))["error"]


@pytest.mark.errors_logged_on_purpose("the broken history is reported as a warning")
def test_a_corrupt_database_is_moved_aside_and_made_anew(tmp_path: Path) -> None:
    database = tmp_path / "history.sqlite3"
    database.write_bytes(b"not a database at all, " * 100)
    history = History(database)
    with recording("tunnelgate", logging.WARNING) as log:
        history.add(120.0, {("a", "s"): (1, 10, 20)}, [])
    assert log.find("is unusable")
    [aside] = tmp_path.glob("history.sqlite3.corrupt-*")
    assert aside.read_bytes().startswith(b"not a database")
    assert history.traffic("a", "s", "30d", 120.0) == [
        {"t": 0, "connections": 1, "up": 10, "down": 20}
    ]
    history.close()


@pytest.mark.errors_logged_on_purpose("the unwritable history is reported as a warning")
async def test_an_unwritable_history_pauses_and_the_tunnel_goes_on(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    stack: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    database = tmp_path / "history.sqlite3"
    database.mkdir()  # a directory where the file should be: cannot be opened
    gateway = await open_gateway()
    site = GatewaySite(gateway, history=database)
    await serve(stack, site)
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    [service] = (await agent.wait_ready(10)).values()
    assert site.recorder is not None
    with recording("tunnelgate", logging.WARNING) as log:
        await site.recorder.write()
        await echo_roundtrip(service.address)
    assert log.find("history paused")
    assert site.recorder.writes == 0
    database.rmdir()  # the disk is fixed: the counts that waited are written
    await site.recorder.write()
    assert site.recorder.writes == 1
    with sqlite3.connect(database) as db:
        [(up,)] = db.execute("SELECT SUM(up) FROM days").fetchall()
    assert up > 0
