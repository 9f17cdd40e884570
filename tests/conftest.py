"""pytest hooks and fixtures; the helpers they use live in the kit (``kit/``).

Fixtures open gateways, agents, local services and a faulty proxy in the
test's own event loop, on loopback port 0, and close them after the test;
others run ``tunnelgate`` as a subprocess, or record its log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
from faultkit import FaultProxy
from kit.clients import Payload
from kit.logs import LogRecorder, recording, unexpected_lines
from kit.ports import start_listening
from kit.processes import TUNNELGATE, Launch, Proc, require_tool
from kit.services import EchoHandler, Handler, LocalServer, echo_handler, tcp_service
from kit.tokens import OTHER_TOKEN, TOKEN, TOKEN_ENV, new_token
from kit.tunnels import MODES, Tunnel, agent_tls_options, gateway_defaults
from kit.waiting import close_within

from tunnelgate import Address, Agent, Gateway

# Properties assert on results, never on time: a per-example deadline would
# only fail on a loaded CI machine (speed is measured by `make bench`).
hypothesis.settings.register_profile("tunnelgate", deadline=None)
hypothesis.settings.load_profile("tunnelgate")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "loop_errors_checked_by_test: the test checks asyncio's error log itself",
    )
    config.addinivalue_line(
        "markers",
        "errors_logged_on_purpose(why): the test makes tunnelgate log a traceback, or "
        "asyncio an error, on purpose (no_unexpected_errors does not check it)",
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The stock asyncio loop, or uvloop with ``TUNNELGATE_LOOP=uvloop``
    (``make test`` runs the in-process tests both ways; the CLI uses uvloop)."""
    if os.environ.get("TUNNELGATE_LOOP") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def ipv6_loopback() -> None:
    """Skip a test on a machine without IPv6 loopback."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")


# --- gateways, agents and services in the test's loop -------------------------


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """Either "plain" (tls=False on both sides) or "tls" (self-signed identity, pinned)."""
    return str(request.param)


@pytest.fixture
def no_unexpected_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test during which tunnelgate logged a traceback (an unexpected
    exception: a bug), a line it could not format, or a token, or during which
    asyncio reported a lost task or exception.

    Every test that runs gateways or agents in its loop gets this through
    ``stack``; a unit test asks for it with ``usefixtures``. A test that makes
    tunnelgate log a traceback on purpose says so with ``errors_logged_on_purpose``.
    """
    if request.node.get_closest_marker("errors_logged_on_purpose"):
        yield
        return
    with (
        recording("tunnelgate", logging.DEBUG) as ours,
        recording("asyncio", logging.ERROR) as loop,
    ):
        yield
    if request.node.get_closest_marker("loop_errors_checked_by_test"):
        loop.records.clear()
    problems = unexpected_lines(ours, loop, (TOKEN, OTHER_TOKEN))
    if problems:
        # The records hold tracebacks, whose frames may hold sockets: free them
        # now, or their ResourceWarnings would fail whichever test runs later.
        ours.records.clear()
        loop.records.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    assert not problems, "unexpected log lines:\n" + "\n".join(problems)


@pytest.fixture
async def stack(no_unexpected_errors: None) -> AsyncIterator[contextlib.AsyncExitStack]:
    """Closes the gateways, services and proxies a test opened, last opened first;
    what tunnelgate logs meanwhile, and while they close, is checked."""
    exit_stack = contextlib.AsyncExitStack()
    async with exit_stack:
        yield exit_stack
        await close_within(exit_stack, "gateways, services and proxies")


@pytest.fixture
async def agent_stack(
    stack: contextlib.AsyncExitStack,
) -> AsyncIterator[contextlib.AsyncExitStack]:
    """Closes the agents a test opened, before anything else: an agent outliving
    its gateway would only reconnect into the gateway's shutdown."""
    exit_stack = contextlib.AsyncExitStack()
    async with exit_stack:
        yield exit_stack
        await close_within(exit_stack, "agents")


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "gateway-state"


@pytest.fixture
def open_gateway(
    stack: contextlib.AsyncExitStack, mode: str, state_dir: Path
) -> Callable[..., Awaitable[Gateway]]:
    """``await open_gateway(**options)``: a started gateway, closed after the test."""

    async def open_(**options: Any) -> Gateway:
        gateway = Gateway(**{**gateway_defaults(mode, state_dir), **options})
        return await stack.enter_async_context(gateway)

    return open_


@pytest.fixture
def open_agent(
    agent_stack: contextlib.AsyncExitStack, mode: str
) -> Callable[..., Awaitable[Agent]]:
    """``await open_agent(gateway, expose=[...], via=None, **options)``: a running agent.

    ``via`` is another address to dial (a proxy); TLS options follow ``mode``
    and the gateway's fingerprint. Reconnects are fast unless overridden.
    """

    async def open_(
        gateway: Gateway, *, expose: list[str] | None = None, via: str | None = None, **options: Any
    ) -> Agent:
        defaults: dict[str, Any] = {
            "gateway": via or str(gateway.address),
            "token": TOKEN,
            "name": "site-a",
            "reconnect_min": 0.05,
            "reconnect_max": 0.2,
            **agent_tls_options(mode, gateway),
        }
        if expose is not None:
            defaults["expose"] = expose
        agent = Agent(**{**defaults, **options})
        return await agent_stack.enter_async_context(agent)

    return open_


@pytest.fixture
def start_server(
    stack: contextlib.AsyncExitStack,
) -> Callable[..., Awaitable[LocalServer]]:
    """``await start_server(handler, host=..., port=...)``: a local service."""

    async def start(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> LocalServer:
        return await stack.enter_async_context(LocalServer(handler, host, port))

    return start


@pytest.fixture
def start_proxy(stack: contextlib.AsyncExitStack) -> Callable[..., Awaitable[FaultProxy]]:
    """``await start_proxy(gateway.address, port=0)``: a :class:`~faultkit.FaultProxy`
    to the gateway (the agent dials ``proxy.address``), closed after the test."""

    async def start(target: Address, port: int = 0) -> FaultProxy:
        return await stack.enter_async_context(FaultProxy(target, port=port))

    return start


@pytest.fixture
def open_tunnel(
    open_gateway: Callable[..., Awaitable[Gateway]],
    open_agent: Callable[..., Awaitable[Agent]],
) -> Callable[..., Awaitable[Tunnel]]:
    """``await open_tunnel(server, gateway_options={}, **agent_options)``: ready to use."""

    async def open_(
        *servers: LocalServer, gateway_options: dict[str, Any] | None = None, **agent_options: Any
    ) -> Tunnel:
        gateway = await open_gateway(**(gateway_options or {}))
        expose = [f"0:{server.local}" for server in servers]
        agent = await open_agent(gateway, expose=expose, **agent_options)
        services = await agent.wait_ready(10)
        assert len(services) == len(servers), services
        return Tunnel(gateway, agent, services)

    return open_


@pytest.fixture
async def echo_server(start_server: Callable[..., Awaitable[LocalServer]]) -> LocalServer:
    return await start_server(echo_handler)


@pytest.fixture
async def echo_tunnel(
    open_tunnel: Callable[..., Awaitable[Tunnel]], echo_server: LocalServer
) -> Tunnel:
    """A gateway and an agent exposing an echo service, in this test's mode."""
    return await open_tunnel(echo_server)


@pytest.fixture(scope="session")
def big_payloads() -> tuple[Payload, Payload]:
    """Two different 64 MiB blocks of random bytes, made once per run."""
    return Payload.random(64 << 20), Payload.random(64 << 20)


# --- logs -----------------------------------------------------------------------


@pytest.fixture
def tunnel_log() -> Iterator[LogRecorder]:
    """tunnelgate's log lines (INFO and up) during the test."""
    with recording("tunnelgate", logging.INFO) as recorder:
        yield recorder


@pytest.fixture
def tunnel_debug_log() -> Iterator[LogRecorder]:
    """tunnelgate's log lines (all levels) during the test."""
    with recording("tunnelgate", logging.DEBUG) as recorder:
        yield recorder


# --- the CLI and other programs in subprocesses ---------------------------------


@pytest.fixture
def echo_port() -> Iterator[int]:
    """The port of a threaded echo service on loopback."""
    with tcp_service(EchoHandler) as port:
        yield port


# The test's own credentials, and systemd's when pytest runs under it, stay out of the
# programs a test starts.
NOT_PASSED_ON = (
    TOKEN_ENV,
    "TUNNELGATE_ADMIN_TOKEN",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


@pytest.fixture
def launch_command(tmp_path: Path) -> Iterator[Launch]:
    """Start ``PROGRAM ARGS...`` (``token=`` goes in the environment, ``env=`` adds more to
    it, ``cwd=`` is where); all killed at the end, last started first."""
    procs: list[Proc] = []
    base_env = dict(os.environ)
    for name in NOT_PASSED_ON:
        base_env.pop(name, None)
    base_env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")  # never the user's own
    base_env["PYTHONUNBUFFERED"] = "1"

    def start(
        *argv: str,
        token: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        full_env = {**base_env, **(env or {})}
        if token is not None:
            full_env[TOKEN_ENV] = token
        proc = Proc(list(argv), full_env, cwd)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(procs):
            proc.stop()
    # A traceback in a log is an unexpected exception: a bug, whatever the test checked.
    broken = [
        proc.describe()
        for proc in procs
        if proc.is_tunnelgate and any("Traceback" in line for line in proc.stderr + proc.stdout)
    ]
    assert not broken, "a tunnelgate process logged a traceback:\n" + "\n".join(broken)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A file holding a new agent group's secret."""
    path = tmp_path / "group-secret"
    path.write_text(new_token())
    return path


@pytest.fixture
def redis_port(launch_command: Launch, tmp_path: Path) -> int:
    """A throwaway ``redis-server`` on loopback (no persistence); its port."""
    server = require_tool("redis-server")

    def start(port: int) -> Proc:
        return launch_command(
            server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path),
            cwd=tmp_path,
        )  # fmt: skip

    _, port = start_listening(start)
    return port


@pytest.fixture
def launch(launch_command: Launch) -> Launch:
    """Start ``tunnelgate ARGS...``, as :func:`launch_command` does."""

    def start(
        *args: str,
        token: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        return launch_command(*TUNNELGATE, *args, token=token, cwd=cwd, env=env)

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for admin listeners, closed after the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session
