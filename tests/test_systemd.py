"""systemd's notification protocol, received on a real AF_UNIX datagram socket bound where
systemd would listen: the real gateway and agent in subprocesses with ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC`` say READY=1 once they serve, ping the watchdog again and again, and say
STOPPING=1 on SIGTERM; the notifier itself reads its environment, skips a watchdog meant for
another process, and goes on when nobody listens."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from kit.ports import listening_ports
from kit.processes import Launch, start_gateway
from kit.tokens import new_token
from kit.waiting import DEADLINE

from tunnelgate.systemd import Notifier, notify_address, watchdog_interval

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets"),
]

WATCHDOG_USEC = "200000"  # a ping every 0.1 s
MAX_UNIX_PATH = 107


class NotifySocket:
    """Where systemd would listen: a datagram socket that collects the notifications."""

    def __init__(self, name: str) -> None:
        """``name`` as ``$NOTIFY_SOCKET`` holds it: a path, or ``@name`` (abstract)."""
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + name[1:] if name.startswith("@") else name)
        self.received: list[list[str]] = []

    def close(self) -> None:
        self.sock.close()

    def next(self, timeout: float = DEADLINE) -> list[str]:
        """The assignment lines of the next datagram; fail if none comes in time."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            pytest.fail(f"no notification within {timeout} s; received before: {self.received}")
        message = data.decode().split("\n")
        self.received.append(message)
        return message

    async def receive(self, timeout: float = DEADLINE) -> list[str]:
        """:meth:`next` without blocking the event loop (for a notifier in this process)."""
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(self.sock, 4096)
        message = data.decode().split("\n")
        self.received.append(message)
        return message

    def wait_for(self, assignment: str, timeout: float = DEADLINE) -> list[str]:
        """The next datagram holding ``assignment``, passing over the others."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.001, deadline - time.monotonic()))
            if assignment in message:
                return message
            if time.monotonic() > deadline:
                pytest.fail(f"no {assignment} within {timeout} s; received: {self.received}")


@pytest.fixture
def notify_path(tmp_path: Path) -> Path:
    path = tmp_path / "notify"
    if len(str(path)) > MAX_UNIX_PATH:
        pytest.skip(f"the temporary directory's path is too long for a Unix socket: {path}")
    return path


def test_gateway_tells_systemd_ready_watchdog_and_stopping(
    launch: Launch, tmp_path: Path, notify_path: Path
) -> None:
    """READY=1 once the control port accepts connections; WATCHDOG=1 again and again;
    STOPPING=1 on SIGTERM, then a clean exit."""
    notify = NotifySocket(str(notify_path))
    try:
        env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": WATCHDOG_USEC}
        proc = launch(
            "gateway", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
            token=new_token(), env=env,
        )  # fmt: skip
        ready = notify.wait_for("READY=1")
        listening = listening_ports(proc.popen.pid)  # as it was when READY=1 arrived
        port = int(proc.wait_line(r"gateway listening on 127\.0\.0\.1:(\d+)").group(1))
        assert port in listening, (port, listening)
        assert f"STATUS=listening on 127.0.0.1:{port}" in ready, ready
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
            pass
        pings = [notify.wait_for("WATCHDOG=1") for _ in range(3)]
        assert pings == [["WATCHDOG=1"]] * 3

        proc.signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING=1")
        assert any(line.startswith("STATUS=stopping") for line in stopping), stopping
        assert proc.wait_exit() == 0
    finally:
        notify.close()
    ready_count = sum("READY=1" in message for message in notify.received)
    assert ready_count == 1, notify.received


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets: Linux only")
def test_agent_tells_systemd_ready_once_its_service_is_registered(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """On an abstract socket: READY=1 once the gateway listens on the agent's service port,
    WATCHDOG=1 again and again, STOPPING=1 on SIGTERM."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token, tls=False)
    notify = NotifySocket(f"@tunnelgate-test-{secrets.token_hex(8)}")
    try:
        env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": WATCHDOG_USEC}
        agent = launch(
            "agent", "--gateway", f"127.0.0.1:{gateway.port}", "--no-tls",
            "--expose", f"0:127.0.0.1:{echo_port}",
            token=token, env=env,
        )  # fmt: skip
        ready = notify.wait_for("READY=1")
        listening = listening_ports(gateway.pid)  # as it was when READY=1 arrived
        public = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
        assert public in listening, (public, listening)
        status = f"STATUS=1 service(s) exposed through 127.0.0.1:{gateway.port}"
        assert status in ready, ready
        for _ in range(3):
            notify.wait_for("WATCHDOG=1")

        agent.signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert agent.wait_exit() == 0
    finally:
        notify.close()


# --- the notifier in this process -------------------------------------------------


def test_notifier_reads_socket_and_watchdog_from_the_environment() -> None:
    """A path or @name; the watchdog at half WATCHDOG_USEC, only for the pid it names."""
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract") == "\0abstract"
    assert notify_address("relative") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, pid=7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, pid=7) is None
    assert watchdog_interval({}, pid=7) is None

    off = Notifier.from_environment({"WATCHDOG_USEC": "200000"}, pid=7)
    assert (off.enabled, off.watchdog_interval) == (False, None)
    on = Notifier.from_environment({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "200000"}, pid=7)
    assert (on.address, on.watchdog_interval) == ("\0x", 0.1)


@pytest.mark.usefixtures("no_unexpected_errors")
async def test_notifier_without_a_listener_logs_once_at_debug_and_goes_on(
    notify_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody at NOTIFY_SOCKET: no exception, one debug line however many sends fail."""
    caplog.set_level(logging.DEBUG, logger="tunnelgate.systemd")
    async with Notifier(str(notify_path), watchdog_interval=0.01) as notifier:
        notifier.ready("serving")
        notifier.status("still serving")
        notifier.stopping()
    failures = [r for r in caplog.records if r.name == "tunnelgate.systemd"]
    assert [r.levelno for r in failures] == [logging.DEBUG], caplog.text
    assert "cannot notify systemd" in failures[0].getMessage()


@pytest.mark.usefixtures("no_unexpected_errors")
async def test_notifier_says_ready_only_when_the_wait_succeeds(notify_path: Path) -> None:
    """READY=1 with the status the wait returns; nothing when the wait fails."""
    notify = NotifySocket(str(notify_path))
    try:
        async with Notifier(str(notify_path)) as notifier:

            async def fails() -> str:
                raise ConnectionError("the agent gave up")

            async def succeeds() -> str:
                return "2 service(s) exposed"

            notifier.ready_after(fails)
            notifier.ready_after(succeeds)
            assert await notify.receive() == ["READY=1", "STATUS=2 service(s) exposed"]
        async with Notifier(str(notify_path)) as marker:
            marker.notify("MARKER=1")  # sent after every task above ended
        assert await notify.receive() == ["MARKER=1"]
    finally:
        notify.close()


@pytest.mark.usefixtures("no_unexpected_errors")
async def test_notifier_without_notify_socket_does_nothing() -> None:
    """Outside systemd (even with WATCHDOG_USEC): no task, and the wait for readiness is
    never started."""
    started = []

    async def wait() -> str:
        started.append(True)
        return "ready"

    tasks = asyncio.all_tasks()
    environ = {"WATCHDOG_USEC": WATCHDOG_USEC}
    async with Notifier.from_environment(environ, pid=os.getpid()) as notifier:
        notifier.ready_after(wait)
        notifier.ready("serving")
        notifier.stopping()
        assert asyncio.all_tasks() == tasks
    assert not notifier.enabled and not started
