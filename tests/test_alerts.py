"""Alerts by webhook: a real gateway and agents, and a real HTTP server on loopback that
receives the webhooks; the grace rule on its own, with time passed in; the [[alerts]]
tables checked like the rest of the config."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kit.clients import echo_roundtrip
from kit.logs import LogRecorder
from kit.ports import refusing_port
from kit.processes import Launch, start_gateway
from kit.services import LocalServer
from kit.tokens import TOKEN, new_token
from kit.tunnels import OpenAgent, OpenGateway
from kit.waiting import DEADLINE, LONGER_THAN_ANY_TEST, wait_until

from tunnelgate import Agent, ExposedService, Gateway
from tunnelgate import config as c
from tunnelgate.admin.alerts import Alert, Alerts, Watch
from tunnelgate.admin.sites import GatewaySite
from tunnelgate.errors import ConfigError
from tunnelgate.stats import Event

SECRET = "webhook-secret-for-the-tests-42"
FAST = 0.02  # seconds: the event log's polling and the first retry's delay, in these tests


@pytest.fixture
def mode() -> str:
    """Alerts do not depend on the transport: plain TCP only."""
    return "plain"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """A webhook on loopback: records every request; answers 204, or never (``hang``)."""

    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Received(dict(request.headers), await request.read()))
        if self.hang:
            await self._released.wait()
        return web.Response(status=204)

    def events(self) -> list[str]:
        return [r.payload["event"] for r in self.requests]

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        app = web.Application()
        app.router.add_post("/hook/{rest:.*}", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hook/secret-path"
        try:
            yield self
        finally:
            self._released.set()
            await runner.cleanup()


StartReceiver = Callable[..., Awaitable[Receiver]]
OpenAlerts = Callable[..., Awaitable[Alerts]]


@pytest.fixture
def start_receiver(stack: contextlib.AsyncExitStack) -> StartReceiver:
    async def start(hang: bool = False) -> Receiver:
        return await stack.enter_async_context(Receiver(hang).serving())

    return start


@pytest.fixture
def open_alerts(stack: contextlib.AsyncExitStack) -> OpenAlerts:
    """``await open_alerts(gateway, **options)``: the gateway's [[alerts]] being sent."""

    async def open_(gateway: Gateway, **options: Any) -> Alerts:
        options = {"poll_interval": FAST, "retry_interval": FAST, **options}
        return await stack.enter_async_context(Alerts(gateway, **options))

    return open_


def signed(received: Received, secret: str = SECRET) -> bool:
    scheme, _, digest = received.headers["X-Tunnelgate-Signature"].partition("=")
    expected = hmac.new(secret.encode(), received.body, hashlib.sha256).hexdigest()
    return scheme == "sha256" and hmac.compare_digest(digest, expected)


async def wait_read_up(alerts: Alerts) -> None:
    """Until the alerts have read every event the gateway logged so far."""
    events = alerts.gateway.totals.events.since()
    last = events[-1].id if events else 0
    await wait_until(lambda: alerts.last_event >= last, DEADLINE, "the alerts to read the log")


async def open_echo_agent(
    open_agent: OpenAgent, gateway: Gateway, echo: LocalServer, name: str
) -> tuple[Agent, str, ExposedService]:
    """An agent ``name`` exposing ``echo``, ready: the agent, its service's name and address."""
    agent = await open_agent(gateway, expose=[f"0:{echo.local}"], name=name)
    [(service, exposed)] = (await agent.wait_ready(DEADLINE)).items()
    return agent, service, exposed


# --- the whole path ---------------------------------------------------------------


async def test_alerts_agent_offline_after_grace_then_online_signed(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    open_alerts: OpenAlerts,
    start_receiver: StartReceiver,
    echo_server: LocalServer,
) -> None:
    """An agent gone longer than the grace period is reported offline, with its service
    down, in signed requests; its return is reported too."""
    receiver = await start_receiver()
    hook = {"url": receiver.url, "grace": 0.2, "secret": SECRET}
    gateway = await open_gateway(alerts=[hook])
    alerts = await open_alerts(gateway)
    agent, service, _ = await open_echo_agent(open_agent, gateway, echo_server, "site-a")
    await wait_read_up(alerts)
    assert receiver.requests == []  # coming up without an offline before is not news

    await agent.aclose()
    await wait_until(
        lambda: {"agent_offline", "service_down"} <= set(receiver.events()),
        DEADLINE,
        lambda: f"agent_offline and service_down, got {receiver.events()}",
    )
    by_event = {r.payload["event"]: r for r in receiver.requests}
    offline = by_event["agent_offline"].payload
    assert offline["agent"] == "site-a" and offline["service"] is None
    assert offline["gateway"] == str(gateway.address)
    assert isinstance(offline["time"], float) and offline["detail"]
    assert by_event["service_down"].payload["service"] == service
    for received in receiver.requests:
        assert signed(received) and not signed(received, "another secret of the same size")
        assert received.headers["X-Tunnelgate-Timestamp"].isdigit()
        assert received.headers["Content-Type"] == "application/json"

    await open_echo_agent(open_agent, gateway, echo_server, "site-a")
    await wait_until(
        lambda: {"agent_online", "service_up"} <= set(receiver.events()),
        DEADLINE,
        lambda: f"agent_online and service_up, got {receiver.events()}",
    )
    assert sorted(receiver.events()) == sorted(c.ALERT_EVENTS)  # each once
    assert all(signed(r) for r in receiver.requests)
    assert alerts.statistics().ok == 4


async def test_alerts_agent_back_within_grace_sends_nothing(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    open_alerts: OpenAlerts,
    start_receiver: StartReceiver,
    echo_server: LocalServer,
) -> None:
    """An agent that reconnects within the grace period is reported neither offline nor
    online: nothing is left waiting to be sent."""
    receiver = await start_receiver()
    gateway = await open_gateway(alerts=[{"url": receiver.url, "grace": 5}])
    alerts = await open_alerts(gateway)
    await open_echo_agent(open_agent, gateway, echo_server, "site-a")
    assert await gateway.disconnect("site-a", "the test cuts it off")

    def services_up() -> int:
        return sum(e.kind == "service_up" for e in gateway.totals.events.since())

    await wait_until(lambda: services_up() == 2, DEADLINE, "the agent to come back")
    await wait_read_up(alerts)
    kinds = [e.kind for e in gateway.totals.events.since()]
    assert kinds.count("agent_down") == 1 and kinds.count("agent_up") == 2
    assert alerts.statistics().pending == 0  # the offline was dropped, not merely not yet due
    assert receiver.requests == []


async def test_alerts_hanging_webhook_bounded_attempts_tunnel_unaffected(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    open_alerts: OpenAlerts,
    start_receiver: StartReceiver,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """A webhook that never answers gets its attempts (1 + retries), then a warning; the
    tunnel carries data all along."""
    receiver = await start_receiver(hang=True)
    hook = {"url": receiver.url, "grace": 0, "events": ["agent_offline"]}
    gateway = await open_gateway(alerts=[{**hook, "timeout": 0.2, "retries": 2}])
    alerts = await open_alerts(gateway)
    _, _, exposed = await open_echo_agent(open_agent, gateway, echo_server, "site-a")
    leaving, _, _ = await open_echo_agent(open_agent, gateway, echo_server, "site-b")

    await leaving.aclose()
    await wait_until(lambda: receiver.requests, DEADLINE, "the first attempt")
    await echo_roundtrip(exposed.address)  # while the webhook hangs
    await wait_until(lambda: alerts.statistics().failed == 1, DEADLINE, "the alert to fail")
    assert len(receiver.requests) == 3 and alerts.statistics().attempts == 3
    assert {r.payload["agent"] for r in receiver.requests} == {"site-b"}
    [warning] = tunnel_log.find("not delivered after 3 attempt(s)", logging.WARNING)
    assert "no answer within 0.2 s" in warning and "secret-path" not in warning
    await echo_roundtrip(exposed.address)


async def test_alerts_refusing_webhook_bounded_attempts_tunnel_unaffected(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    open_alerts: OpenAlerts,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """A webhook whose port refuses connections gets its attempts, then a warning."""
    with refusing_port() as port:
        hook = {"url": f"http://127.0.0.1:{port}/", "grace": 0, "retries": 2}
        gateway = await open_gateway(alerts=[{**hook, "events": ["agent_offline"]}])
        alerts = await open_alerts(gateway)
        _, _, exposed = await open_echo_agent(open_agent, gateway, echo_server, "site-a")
        leaving, _, _ = await open_echo_agent(open_agent, gateway, echo_server, "site-b")
        await leaving.aclose()
        await wait_until(lambda: alerts.statistics().failed == 1, DEADLINE, "the alert to fail")
        await echo_roundtrip(exposed.address)
    assert alerts.statistics().attempts == 3 and alerts.statistics().ok == 0
    assert tunnel_log.find("not delivered after 3 attempt(s)", logging.WARNING)


async def test_alerts_queue_full_drops_the_oldest_and_counts_them(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    open_alerts: OpenAlerts,
    start_receiver: StartReceiver,
    echo_server: LocalServer,
) -> None:
    """Behind a webhook that holds its first request, the queue keeps only the newest
    alerts; the dropped ones are counted in the metrics."""
    receiver = await start_receiver(hang=True)
    hook = {"url": receiver.url, "grace": 0, "timeout": LONGER_THAN_ANY_TEST, "retries": 0}
    gateway = await open_gateway(alerts=[hook])
    alerts = await open_alerts(gateway, max_queued=1)
    _, _, exposed = await open_echo_agent(open_agent, gateway, echo_server, "site-a")
    leaving, _, _ = await open_echo_agent(open_agent, gateway, echo_server, "site-b")
    await leaving.aclose()  # agent_offline (held by the webhook), service_down (queued)
    await wait_until(lambda: receiver.requests, DEADLINE, "the first request")
    await open_echo_agent(open_agent, gateway, echo_server, "site-b")  # 2 more: 2 dropped
    await wait_until(lambda: alerts.statistics().dropped == 2, DEADLINE, "two alerts dropped")
    assert alerts.statistics().queued == 1 and len(receiver.requests) == 1
    await echo_roundtrip(exposed.address)
    families = {f.name: f for f in await GatewaySite(gateway, alerts=alerts).collect()}
    samples = {s.labels["result"]: s.value for s in families["tunnelgate_alerts_sent"].samples}
    assert samples == {"ok": 0, "failed": 0, "dropped": 2}
    assert "tunnelgate_alerts_sent" not in {f.name for f in await GatewaySite(gateway).collect()}


async def test_alerts_follow_a_reload(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    open_alerts: OpenAlerts,
    start_receiver: StartReceiver,
    echo_server: LocalServer,
) -> None:
    """A reload that changes the [[alerts]] applies at once: the events chosen now."""
    receiver = await start_receiver()
    hook = {"url": receiver.url, "grace": 0, "events": ["service_up"]}
    gateway = await open_gateway(alerts=[hook])
    alerts = await open_alerts(gateway)
    leaving, _, _ = await open_echo_agent(open_agent, gateway, echo_server, "site-a")
    flags = {"token": TOKEN, "listen": "127.0.0.1:0", "tls": False}
    changed = {**hook, "events": ["agent_offline"]}
    reloaded, _ = c.load_gateway_config(None, {**flags, "alerts": [changed]})
    await gateway.reload(reloaded)
    await wait_read_up(alerts)
    await leaving.aclose()
    await wait_until(lambda: receiver.events() == ["agent_offline"], DEADLINE, "agent_offline")


# --- the command line ---------------------------------------------------------------


@pytest.fixture
def threaded_receiver() -> Iterator[tuple[str, list[Received]]]:
    """A webhook on loopback in a thread, for a gateway in a subprocess: its URL and the
    requests it received (answered 204)."""
    received: list[Received] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(Received(dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Hook) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
        finally:
            server.shutdown()
            thread.join()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_cli_gateway_sends_alerts_without_admin(
    launch: Launch,
    echo_port: int,
    tmp_path: Path,
    threaded_receiver: tuple[str, list[Received]],
    workers: int,
) -> None:
    """`tunnelgate gateway` with [[alerts]] and no --admin reports a killed agent, signed,
    and still stops cleanly; with two workers, once for the gateway (the agent's session on
    each worker ends)."""
    url, received = threaded_receiver
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[alerts]]\nurl = "{url}"\ngrace = 0\nevents = ["agent_offline"]\nsecret = "{SECRET}"\n',
        encoding="utf-8",
    )
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", "--config", str(config),
                            "--workers", str(workers), token=token, tls=False)  # fmt: skip
    gateway.proc.wait_line(r"alerts: sending agent_offline to http://127\.0\.0\.1:\d+$")
    agent = launch(
        "agent", "--gateway", f"127.0.0.1:{gateway.port}", "--no-tls",
        "--expose", f"0:127.0.0.1:{echo_port}", "--name", "site-a",
        token=token,
    )  # fmt: skip
    agent.wait_line(r"exposed at gateway port (\d+)", count=workers)
    agent.stop()  # SIGKILL
    for worker in range(workers if workers > 1 else 0):
        gateway.proc.wait_line(rf"\[worker={worker} session=\w+ agent=site-a\] session ended")
    deadline = time.monotonic() + DEADLINE
    while not received:
        assert time.monotonic() < deadline, gateway.proc.describe()
        time.sleep(0.05)  # polling interval under a deadline
    [alert] = received
    assert alert.payload["event"] == "agent_offline" and alert.payload["agent"] == "site-a"
    assert signed(alert)
    gateway.proc.signal(signal.SIGTERM)
    assert gateway.proc.wait_exit() == 0
    assert not gateway.proc.lines_matching(r"admin listening")


# --- the grace rule, time passed in -------------------------------------------------

_ids = iter(range(1, 1_000_000))


def event(time: float, kind: str, agent: str = "a", service: str = "") -> Event:
    return Event(next(_ids), time, kind, agent, service, "why")


def test_watch_reports_down_after_grace_and_back_after_a_report() -> None:
    """Down for the grace period: reported once; back: reported once."""
    watch = Watch(grace=10)
    assert watch.observe(event(0, "agent_up")) == []
    assert watch.observe(event(1, "agent_down")) == []
    assert watch.due(10.9) == [] and watch.pending == 1
    assert watch.due(11) == [Alert("agent_offline", "a", "", 1, "why")]
    assert watch.due(100) == [] and watch.pending == 0
    assert watch.observe(event(200, "agent_up")) == [Alert("agent_online", "a", "", 200, "why")]


def test_watch_flap_within_grace_reports_nothing() -> None:
    """Back within the grace period: neither down nor up, however late it is checked."""
    watch = Watch(grace=10)
    watch.observe(event(0, "service_up", service="web"))
    assert watch.observe(event(1, "service_down", service="web")) == []
    assert watch.observe(event(5, "service_up", service="web")) == []
    assert watch.due(1000) == [] and watch.pending == 0


def test_watch_due_by_the_events_time_when_read_late() -> None:
    """Events read together, long after: what lasted its grace is still reported, in order."""
    watch = Watch(grace=10)
    alerts = [a for e in (event(0, "agent_down"), event(30, "agent_up")) for a in watch.observe(e)]
    assert [a.event for a in alerts] == ["agent_offline", "agent_online"]


def test_watch_overlapping_sessions_down_when_the_last_ends() -> None:
    """A reconnect whose new session starts before the old one ends is no transition."""
    watch = Watch(grace=0)
    watch.observe(event(0, "agent_up"))
    watch.observe(event(1, "agent_up"))
    assert watch.observe(event(2, "agent_down")) == [] and watch.due(100) == []
    watch.observe(event(3, "agent_down"))
    assert [a.event for a in watch.due(3)] == ["agent_offline"]


# --- the [[alerts]] tables ----------------------------------------------------------


def alert_problems(*tables: Any) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        c.load_gateway_config(None, {"token": TOKEN, "alerts": list(tables)})
    return {p.key: p.message for p in info.value.problems}


def test_alerts_config_defaults_and_values() -> None:
    """A table with only a URL gets every event, 30 s grace, 5 s timeout, 3 retries."""
    config, _ = c.load_gateway_config(
        None,
        {
            "token": TOKEN,
            "alerts": [
                {"url": "https://hooks.example/a?key=k"},
                {"url": "http://[::1]:9000/b", "events": "agent_offline", "grace": 0,
                 "secret": SECRET, "timeout": 1, "retries": 0},
            ],
        },
    )  # fmt: skip
    first, second = config.alerts
    assert (first.events, first.grace, first.timeout, first.retries) == (c.ALERT_EVENTS, 30, 5, 3)
    assert first.secret is None and first.origin == "https://hooks.example"
    assert second.events == ("agent_offline",) and second.secret == SECRET.encode()
    assert second.origin == "http://[::1]:9000"
    assert "key=k" not in repr(config) and SECRET not in repr(config)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ({"url": "ftp://hooks.example/"}, "alerts[0].url", "http:// or https://"),
        ({"url": "hooks.example/x"}, "alerts[0].url", "http:// or https://"),
        ({"url": "http://hooks.example:99999/"}, "alerts[0].url", "Port out of range"),
        ({"url": "http://a/", "events": ["agent_gone"]}, "alerts[0].events", "unknown event"),
        ({"url": "http://a/", "events": []}, "alerts[0].events", "at least one"),
        ({"url": "http://a/", "grace": -1}, "alerts[0].grace", "seconds in [0, 86400]"),
        ({"url": "http://a/", "timeout": 0}, "alerts[0].timeout", "seconds in (0, 3600]"),
        ({"url": "http://a/", "retries": 11}, "alerts[0].retries", "[0, 10]"),
        ({"url": "http://a/", "secret": "short"}, "alerts[0].secret", "at least 16"),
        ({"url": "http://a/", "secret_file": "/nonexistent"}, "alerts[0].secret_file", "cannot"),
        ({"url": "http://a/", "colour": "red"}, "alerts[0].colour", "unknown key"),
        ({"grace": 1}, "alerts[0].url", "missing"),
        ("http://a/", "alerts[0]", "expected a table"),
    ],
)
def test_alerts_config_errors_name_the_key(table: Any, key: str, message: str) -> None:
    """Each mistake in an [[alerts]] table is reported with its key path."""
    found = alert_problems(table)
    assert key in found and message in found[key], found


def test_alerts_config_secret_twice_or_url_twice() -> None:
    """secret and secret_file together, or one URL in two tables, are refused."""
    both = {"url": "http://a/", "secret": SECRET, "secret_file": "/x"}
    assert "not both" in alert_problems(both)["alerts[0].secret_file"]
    assert "another" in alert_problems({"url": "http://a/"}, {"url": "http://a/"})["alerts[1].url"]


def test_alerts_config_url_not_shown_in_problems() -> None:
    """A URL may carry the receiver's secret: a problem with it does not repeat it."""
    found = alert_problems({"url": "gopher://hooks.example/TOPSECRET"})
    assert "TOPSECRET" not in found["alerts[0].url"]
