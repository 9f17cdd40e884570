"""Fixtures for the whole-system tests: gateways, agents, local services, a faulty proxy.

Everything runs in the test's own event loop on loopback, always on port 0.
Nothing here sleeps for a fixed time: helpers poll a condition under a
deadline (:func:`wait_until`) or await an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import re
import shlex
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import hypothesis
import pytest
from faultkit import FaultProxy as FaultProxy
from faultkit import reset_writer as reset_writer
from faultkit import shutdown_writer as shutdown_writer

from tunnelgate import Address, Agent, ExposedService, Gateway
from tunnelgate import protocol as p
from tunnelgate.credentials import generate_token

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "another-token-fedcba9876543210"
MODES = ["plain", "tls"]
READ_SIZE = 1 << 20

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# Properties assert on results, never on time: a per-example deadline would
# only fail on a loaded CI machine (speed is measured by `make bench`).
hypothesis.settings.register_profile("tunnelgate", deadline=None)
hypothesis.settings.load_profile("tunnelgate")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "loop_errors_checked_by_test: the test checks asyncio's error log itself",
    )


# --- waiting ------------------------------------------------------------------


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The stock asyncio loop, or uvloop with ``TUNNELGATE_LOOP=uvloop``
    (``make test`` runs the in-process tests both ways; the CLI uses uvloop)."""
    if os.environ.get("TUNNELGATE_LOOP") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    what: str | Callable[[], str] = "the condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    ``what`` names the condition in the failure; a callable is asked only then,
    so it can describe the state at that moment.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        await asyncio.sleep(0.01)


# --- local services -----------------------------------------------------------


class LocalServer:
    """An asyncio TCP server on loopback running ``handler`` per connection.

    Handler errors from the network (resets, broken pipes, early EOF) end the
    connection quietly; every connection is closed when the server stops.
    """

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    @property
    def local(self) -> str:
        """The ``LOCAL_HOST:LOCAL_PORT`` part of an ``--expose`` spec."""
        return str(self.address)

    async def __aenter__(self) -> LocalServer:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, backlog=1024, limit=READ_SIZE
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except RuntimeError:
            # uvloop raises RuntimeError ("the handler is closed"), not
            # OSError, on a write to a transport already closed by a reset.
            if not writer.is_closing():
                raise
        except asyncio.CancelledError:
            # Stopped by __aexit__. Returning normally matters on Python 3.11,
            # whose stream callback calls task.exception() on a cancelled task.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo everything; half-close after the peer did."""
    while data := await reader.read(READ_SIZE):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def banner_handler(banner: bytes) -> Handler:
    """Send ``banner`` and close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()

    return handle


# --- clients ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connect(
    address: Address | tuple[str, int], **kwargs: Any
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection, closed on exit whatever happened to it."""
    host, port = (address.host, address.port) if isinstance(address, Address) else address
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE, **kwargs)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def next_event(reader: asyncio.StreamReader, decoder: p.FrameDecoder) -> p.Event | None:
    """The next event a raw control-port connection brings, or None when the
    peer closes first."""
    while data := await reader.read(READ_SIZE):
        if events := list(decoder.feed(data)):
            return events[0]
    return None


async def echo_roundtrip(address: Address, payload: bytes = b"ping through the tunnel") -> None:
    """Send ``payload`` to an echo service and check it comes back whole."""
    async with asyncio.timeout(5), connect(address) as (reader, writer):
        writer.write(payload)
        await writer.drain()
        assert await reader.readexactly(len(payload)) == payload


async def read_to_end(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read until the stream ends; return (bytes read, "eof" or "reset")."""
    total = 0
    try:
        while data := await reader.read(READ_SIZE):
            total += len(data)
    except OSError:
        return total, "reset"
    return total, "eof"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for tests that need a fixed port)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


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


# --- gateways and agents ------------------------------------------------------


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """Either "plain" (tls=False on both sides) or "tls" (self-signed identity, pinned)."""
    return str(request.param)


TEARDOWN_TIMEOUT = 10.0


def describe_tasks() -> str:
    """Where every other task of the loop is waiting, innermost call last."""
    lines = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        lines.append(f"task {task.get_name()} (cancelling={task.cancelling()}):")
        awaitable: Any = task.get_coro()
        while awaitable is not None:
            frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
            if frame is not None:
                where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                lines.append(f"    {where} in {frame.f_code.co_name}")
            awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
    return "\n".join(lines)


async def close_within(exit_stack: contextlib.AsyncExitStack, what: str) -> None:
    """Close ``exit_stack``; a hang fails the test with every task's stack."""
    closing = asyncio.create_task(exit_stack.aclose())
    done, _ = await asyncio.wait({closing}, timeout=TEARDOWN_TIMEOUT)
    if not done:
        tasks = describe_tasks()
        closing.cancel()
        with contextlib.suppress(BaseException):
            await closing
        pytest.fail(f"closing the test's {what} hung for {TEARDOWN_TIMEOUT} s:\n{tasks}")
    closing.result()


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    """Closes the gateways, services and proxies a test opened, last opened first."""
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


def agent_tls_options(mode: str, gateway: Gateway) -> dict[str, Any]:
    if mode == "tls":
        assert gateway.fingerprint
        return {"fingerprint": gateway.fingerprint}
    return {"tls": False}


def gateway_defaults(mode: str, state_dir: Path) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "token": TOKEN,
        "tls": mode == "tls",
        "state_dir": str(state_dir),
    }


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
def start_proxy(stack: contextlib.AsyncExitStack) -> StartProxy:
    """``await start_proxy(gateway.address, port=0)``: a :class:`~faultkit.FaultProxy`
    to the gateway (the agent dials ``proxy.address``), closed after the test."""

    async def start(target: Address, port: int = 0) -> FaultProxy:
        return await stack.enter_async_context(FaultProxy(target, port=port))

    return start


@dataclass
class Tunnel:
    """A gateway, an agent and the services it exposes."""

    gateway: Gateway
    agent: Agent
    services: dict[str, ExposedService]

    @property
    def address(self) -> Address:
        """The public address of the (first) service."""
        return next(iter(self.services.values())).address


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


# --- data ---------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    data: bytes
    sha256: str


@pytest.fixture(scope="session")
def big_payloads() -> tuple[Payload, Payload]:
    """Two different 64 MiB blocks of random bytes, made once per run."""
    blocks = [os.urandom(64 << 20) for _ in range(2)]
    return Payload(blocks[0], hashlib.sha256(blocks[0]).hexdigest()), Payload(
        blocks[1], hashlib.sha256(blocks[1]).hexdigest()
    )


# --- logs ---------------------------------------------------------------------


class LogRecorder(logging.Handler):
    """Keeps tunnelgate's log records of one test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def find(self, text: str, level: int = logging.INFO) -> list[str]:
        return [m for m in self.messages(level) if text in m]


@contextlib.contextmanager
def recording(name: str, level: int) -> Iterator[LogRecorder]:
    logger = logging.getLogger(name)
    recorder = LogRecorder()
    old_level = logger.level
    logger.addHandler(recorder)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)


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


@pytest.fixture(autouse=True)
def no_unexpected_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """In the tunnel tests: fail a test during which tunnelgate logged a
    traceback (an unexpected exception: a bug), a line it could not format, or
    a token, or during which asyncio reported a lost task or exception."""
    if not request.node.path.name.startswith("test_tunnel"):
        yield
        return
    with (
        recording("tunnelgate", logging.DEBUG) as ours,
        recording("asyncio", logging.ERROR) as loop,
    ):
        yield
    if request.node.get_closest_marker("loop_errors_checked_by_test"):
        loop.records.clear()
    problems = [ours.format(r) for r in ours.records if r.exc_info]
    problems += [loop.format(r) for r in loop.records]
    for record in ours.records:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string or arguments
            problems.append(f"cannot format {record.msg!r} % {record.args!r}: {exc!r}")
            continue
        if TOKEN in message or OTHER_TOKEN in message:
            problems.append(f"a token in the log: {message}")
    if problems:
        # The records hold tracebacks, whose frames may hold sockets: free them
        # now, or their ResourceWarnings would fail whichever test runs later.
        ours.records.clear()
        loop.records.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
    assert not problems, "unexpected log lines:\n" + "\n".join(problems)


# --- the CLI in subprocesses --------------------------------------------------
#
# For tests that run ``tunnelgate`` (and the services and tools around it) as
# real processes: ``launch`` starts ``python -m tunnelgate ARGS...``,
# ``launch_command`` any program; either way every process is killed when the
# test ends. Tests wait on output lines and exits under deadlines.

TOKEN_ENV = "TUNNELGATE_TOKEN"
TUNNELGATE = [sys.executable, "-m", "tunnelgate"]
DEADLINE = 10.0  # for what should happen "at once": a log line, a connection
EXIT_DEADLINE = 5.0  # "exits within a few seconds"


class Proc:
    """A subprocess; threads collect its stdout and stderr lines."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def is_tunnelgate(self) -> bool:
        return self.argv[: len(TUNNELGATE)] == TUNNELGATE

    @property
    def command(self) -> str:
        """The command line as a user would type it."""
        if self.is_tunnelgate:
            return shlex.join(["tunnelgate", *self.argv[len(TUNNELGATE) :]])
        return shlex.join(self.argv)

    def _read(self, pipe: IO[str], lines: list[str]) -> None:
        for line in pipe:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _output_done(self) -> bool:
        return not any(reader.is_alive() for reader in self._readers)

    def describe(self) -> str:
        with self._changed:
            return (
                f"$ {self.command}  (exit code {self.popen.poll()})\n"
                + "--- stdout ---\n"
                + "\n".join(self.stdout)
                + "\n--- stderr ---\n"
                + "\n".join(self.stderr)
            )

    def wait_line(
        self, pattern: str, *, stdout: bool = False, count: int = 1, timeout: float = DEADLINE
    ) -> re.Match[str]:
        """The ``count``-th line of stderr (or stdout) matching ``pattern``; fail if none
        comes in time."""
        regex = re.compile(pattern)
        lines = self.stdout if stdout else self.stderr
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for line in lines if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._output_done():
                    why = "timed out" if remaining <= 0 else "output ended"
                    pytest.fail(
                        f"{why} waiting for line #{count} matching {pattern!r}\n{self.describe()}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def lines_matching(self, pattern: str, *, stdout: bool = False) -> list[str]:
        with self._changed:
            return [
                line
                for line in (self.stdout if stdout else self.stderr)
                if re.search(pattern, line)
            ]

    def wait_exit(self, timeout: float = EXIT_DEADLINE) -> int:
        """The exit code; fail if the process is still running after ``timeout``."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s\n{self.describe()}")
        for reader in self._readers:
            reader.join(DEADLINE)
        return code

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def stop(self) -> None:
        """Kill if still running; reap; close the pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for reader in self._readers:
            reader.join(DEADLINE)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


Launch = Callable[..., Proc]

SYSTEM_DIRS = ("/usr/sbin", "/sbin")  # daemons (nginx) live here, often off a user's PATH


def require_tool(name: str) -> str:
    """The path of ``name``; skip without it, or fail when TUNNELGATE_REQUIRE_TOOLS=1."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SYSTEM_DIRS])
    path = shutil.which(name, path=search)
    if path is None:
        if os.environ.get("TUNNELGATE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} not found on PATH, and TUNNELGATE_REQUIRE_TOOLS=1")
        pytest.skip(f"{name} not found on PATH")
    return path


def wait_connectable(port: int, timeout: float = DEADLINE, host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling interval under a deadline


FINGERPRINT_RE = r"SHA256:[0-9A-F]{64}"
# The banner's suggested agent command, maybe after environment assignments.
AGENT_COMMAND_RE = r"^\s+((?:[A-Z_]+=\S+\s+)*tunnelgate agent .*)$"


@dataclass
class GatewayProc:
    proc: Proc
    port: int
    fingerprint: str | None  # None with --no-tls

    @property
    def pid(self) -> int:
        return self.proc.popen.pid


def start_gateway(
    launch: Launch,
    state_dir: Path,
    *flags: str,
    token: str | None = None,
    tls: bool = True,
    listen: str = "127.0.0.1:0",
) -> GatewayProc:
    """A gateway whose banner has been printed; its control port read from its log."""
    args = ["gateway", "--listen", listen, "--state-dir", str(state_dir), *flags]
    if not tls:
        args.append("--no-tls")
    proc = launch(*args, token=token)
    port = int(proc.wait_line(r"gateway listening on 127\.0\.0\.1:(\d+)").group(1))
    proc.wait_line(AGENT_COMMAND_RE, stdout=True)  # the banner's last line
    fingerprint = None
    for line in proc.lines_matching(r"^certificate fingerprint: ", stdout=True):
        fingerprint = line.split(": ", 1)[1].strip()
        assert re.fullmatch(FINGERPRINT_RE, fingerprint), line
    assert (fingerprint is not None) == tls, proc.describe()
    return GatewayProc(proc, port, fingerprint)


def new_token() -> str:
    """A fresh strong token for a test's gateway and agents, made as
    ``tunnelgate token`` makes one (so never starting with "-", which a
    command line would take for an option)."""
    return generate_token()


class EchoHandler(socketserver.BaseRequestHandler):
    """A threaded service that echoes until the peer ends, for the tests of
    real processes (``socketserver``, so the test's own loop is not involved)."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(262144):
                self.request.sendall(data)


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="tunnelgate")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- blocking clients, for the tests of real processes ------------------------


def read_until_end(sock: socket.socket, received: bytearray, timeout: float) -> str:
    """Read into ``received`` until the connection ends: "reset", "eof" or "timeout"."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(262144)
        except TimeoutError:
            return "timeout"
        except OSError:
            return "reset"
        if not chunk:
            return "eof"
        received += chunk


def echo_exchange(port: int, payload: bytes, timeout: float = DEADLINE) -> tuple[bytes, str]:
    """Send ``payload`` and EOF to an echo through ``port``; return what came back
    and how it ended ("eof", "reset", "timeout"). Raises ConnectionRefusedError."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        failed: list[OSError] = []

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                failed.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = bytearray()
        how = read_until_end(sock, received, timeout)
        sender.join(timeout)
        if failed and how == "eof":
            how = "reset"
        return bytes(received), how


@contextlib.contextmanager
def tcp_service(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    """A threaded TCP server on loopback port 0 in this process; yields its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)


@pytest.fixture
def echo_port() -> Iterator[int]:
    with tcp_service(EchoHandler) as port:
        yield port


@pytest.fixture
def launch_command(tmp_path: Path) -> Iterator[Launch]:
    """Start ``PROGRAM ARGS...`` (``token=`` goes in the environment, ``cwd=`` is where);
    all killed at the end, last started first."""
    procs: list[Proc] = []
    base_env = dict(os.environ)
    base_env.pop(TOKEN_ENV, None)
    base_env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")  # never the user's own
    base_env["PYTHONUNBUFFERED"] = "1"

    def start(*argv: str, token: str | None = None, cwd: Path | None = None) -> Proc:
        env = dict(base_env)
        if token is not None:
            env[TOKEN_ENV] = token
        proc = Proc(list(argv), env, cwd)
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
def launch(launch_command: Launch) -> Launch:
    """Start ``tunnelgate ARGS...``, as :func:`launch_command` does."""

    def start(*args: str, token: str | None = None, cwd: Path | None = None) -> Proc:
        return launch_command(*TUNNELGATE, *args, token=token, cwd=cwd)

    return start


# Types of the factory fixtures above, for the tests' signatures.
OpenGateway = Callable[..., Awaitable[Gateway]]
OpenAgent = Callable[..., Awaitable[Agent]]
OpenTunnel = Callable[..., Awaitable[Tunnel]]
StartServer = Callable[..., Awaitable[LocalServer]]
StartProxy = Callable[..., Awaitable[FaultProxy]]


# --- a service that answers an error and resets, for the last-reply tests -----

ERROR_REPLY = b"-ERR Protocol error: unexpected input\r\n"
WRITE_CHUNK = 64 * 1024
WRITE_LIMIT = 16 * 1024 * 1024  # a client that is never stopped gives up here


class ErrorThenCloseHandler(socketserver.BaseRequestHandler):
    """A service refusing its client's input, as Redis does on a protocol error:
    it reads 16 bytes, answers one error line and closes while more input
    waits unread, so that its kernel ends the connection with an RST."""

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(DEADLINE)
        with contextlib.suppress(OSError):
            received = 0
            while received < 16 and (chunk := sock.recv(16 - received)):
                received += len(chunk)
            sock.recv(1, socket.MSG_PEEK)  # more input is there, and it stays unread
            sock.sendall(ERROR_REPLY)
        sock.close()


def send_until_reset(port: int, first: bytes = b"", timeout: float = DEADLINE) -> tuple[bytes, str]:
    """A client that writes ``first``, then zeros, until a write fails (or
    ``WRITE_LIMIT`` bytes went), then reads to the end. Returns what it read and
    how the connection ended: "reset" (a write or the read failed; Linux reports
    an RST to the first call after it, so the read may then see EOF), "eof" (no
    call failed) or "timeout"."""
    chunk = bytes(WRITE_CHUNK)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        write_failed = False
        try:
            sock.sendall(first)
            for _ in range(WRITE_LIMIT // WRITE_CHUNK):
                sock.sendall(chunk)
        except TimeoutError:
            return b"", "timeout"
        except OSError:  # ECONNRESET, or EPIPE once an earlier call took the reset
            write_failed = True
        received = bytearray()
        how = read_until_end(sock, received, timeout)
        return bytes(received), "reset" if write_failed and how == "eof" else how


def send_until_reset_trials(
    port: int, trials: int, first: bytes = b"", at_once: int = 4
) -> Counter[tuple[bytes, str]]:
    """What ``trials`` runs of :func:`send_until_reset` read and how each ended,
    counted; ``at_once`` clients at a time (fewer than a service's listen backlog)."""
    with ThreadPoolExecutor(at_once) as pool:
        return Counter(pool.map(lambda _: send_until_reset(port, first), range(trials)))
