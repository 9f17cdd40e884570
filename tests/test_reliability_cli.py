"""Reliability and abuse, against the real processes: restarts, killed and
frozen agents, takeover of a half-dead session, and floods of bad or idle
connections.

Gateway and agent run as subprocesses (``python -m tunnelgate``) on loopback;
services and clients run in this process, in threads. Every transfer is
checked end to end with SHA-256, and every wait polls a condition under a
deadline. Descriptors and memory are read from ``/proc/PID`` of the
tunnelgate processes themselves (``Proc.popen.pid``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import re
import resource
import selectors
import signal
import socket
import socketserver
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kit.clients import client_hello, echo_exchange, read_until_end
from kit.processes import GatewayProc, Launch, Proc, rss_kib, start_gateway
from kit.services import EchoHandler
from kit.tokens import new_token
from kit.waiting import DEADLINE, LONGER_THAN_ANY_TEST, wait_for

from tunnelgate import credentials
from tunnelgate.config import AGENT, GATEWAY, options
from tunnelgate.protocol import wire as p
from tunnelgate.relay import CHUNK_SIZE, IDLE_PIPES, PIPE_SIZE
from tunnelgate.tls import READ_BUFFER_SIZE

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 2.0
HEARTBEAT_FLAGS = (
    "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
    "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
)  # fmt: skip
RECONNECT_MAX = 1.0
AGENT_FLAGS = ("--reconnect-max", str(RECONNECT_MAX))
AGENT_NAME = "site-a"
MARGIN = 2.0  # slack for a loaded machine on top of a documented bound
# Only a heartbeat deadline can end a session these tests expect to end otherwise.
NO_HEARTBEAT_DEADLINE = ("--heartbeat-timeout", f"{LONGER_THAN_ANY_TEST:g}")
POLL_INTERVAL = 0.05
MiB = 1 << 20


# --- processes ----------------------------------------------------------------


def start_agent(launch: Launch, gateway: GatewayProc, token: str, *expose: str) -> Proc:
    """An agent with short reconnect backoff, not yet waited for. Every agent
    has the same name, so a second one takes over the first one's session."""
    args = ["agent", "--gateway", f"127.0.0.1:{gateway.port}", "--name", AGENT_NAME, *AGENT_FLAGS]
    for spec in expose:
        args += ["--expose", spec]
    if gateway.fingerprint:
        args += ["--fingerprint", gateway.fingerprint]
    else:
        args.append("--no-tls")
    return launch(*args, token=token)


def wait_exposed(agent: Proc, port: int | None = None, *, count: int = 1, **kw: Any) -> int:
    """The public port of the ``count``-th "exposed" line (of ``port``, if given)."""
    number = str(port) if port else r"\d+"
    pattern = rf"exposed at gateway port ({number})\b"
    return int(agent.wait_line(pattern, count=count, **kw).group(1))


def reconnect_waits(agent: Proc) -> list[float]:
    """The waits the agent announced before its reconnects, in seconds."""
    lines = agent.lines_matching(r"reconnecting to \S+ in [\d.]+ s")
    return [float(re.findall(r" in ([\d.]+) s \(attempt", line)[0]) for line in lines]


def line_number(proc: Proc, pattern: str, count: int = 1) -> int:
    """Where the ``count``-th stderr line of ``proc`` matching ``pattern`` is."""
    return [i for i, line in enumerate(proc.stderr) if re.search(pattern, line)][count - 1]


def log_time(line: str) -> float:
    """The timestamp of a text log line, in seconds (UTC)."""
    stamp = line.split(" ", 1)[0]
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


# --- what a process holds -------------------------------------------------------


def fd_census(pid: int) -> Counter[str]:
    """Open descriptors of ``pid`` by kind: socket, pipe, anon_inode, file."""
    kinds: Counter[str] = Counter()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            kind = target.split(":", 1)[0] if re.match(r"^[a-z_]+:", target) else "file"
            kinds[kind] += 1
    return kinds


def fd_total(census: Counter[str]) -> int:
    return sum(census.values())


def back_to_baseline(pid: int, baseline: Counter[str], extra_sockets: int = 0) -> bool:
    """No socket beyond the baseline (plus ``extra_sockets``), no other file;
    the relay's pooled pipes and its epoll set may remain."""
    now = fd_census(pid)
    return (
        now["socket"] <= baseline["socket"] + extra_sockets
        and now["file"] == baseline["file"]
        and now["pipe"] <= baseline["pipe"] + 2 * IDLE_PIPES
        and now["anon_inode"] <= baseline["anon_inode"] + 2
    )


def wait_fds_back(pid: int, baseline: Counter[str]) -> None:
    """Wait until the process holds no more descriptors of any kind than ``baseline``."""
    wait_for(
        lambda: back_to_baseline(pid, baseline),
        DEADLINE,
        lambda: f"fds of {pid} back to {dict(baseline)}, now {dict(fd_census(pid))}",
    )


def tcp_sockets(pid: int) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket ``pid`` holds."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    local, remote = fields[1], fields[2]
                    found.append(
                        (
                            int(local.rsplit(":", 1)[1], 16),
                            int(remote.rsplit(":", 1)[1], 16),
                            fields[3],
                        )
                    )
    return found


def accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listener on ``port``."""
    waiting = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    waiting += int(fields[4].split(":")[1], 16)
    return waiting


def remote_ports(pid: int) -> set[int]:
    """The peers' ports of the connected TCP sockets of ``pid``."""
    return {remote for _, remote, _ in tcp_sockets(pid) if remote}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def many_files() -> Iterator[int]:
    """This process's open-files soft limit raised to the hard one, for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- payloads -------------------------------------------------------------------

PATTERN_SIZE = 1_000_003  # prime: no chunk size lines up with it
_PATTERN = random.Random(20261130).randbytes(PATTERN_SIZE)
_PATTERN_TWICE = _PATTERN + _PATTERN


def pattern(offset: int, length: int) -> bytes:
    """``length`` bytes of the endless deterministic stream, from ``offset``."""
    pieces = []
    while length > 0:
        start = offset % PATTERN_SIZE
        piece = _PATTERN_TWICE[start : start + min(length, PATTERN_SIZE)]
        pieces.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(pieces)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_stream_prefix(received: bytes | bytearray) -> None:
    """What a client got of the stream is exactly its beginning."""
    expected = pattern(0, len(received))
    assert digest(received) == digest(expected), f"corrupted stream ({len(received)} bytes)"


# --- services (threads in this process) ---------------------------------------

STREAM_CHUNK = 16 * 1024
STREAM_PACING = 0.002  # the service's own pace: at most ~8 MB/s per client


class _Stream(socketserver.BaseRequestHandler):
    """Reads an 8-byte length, then sends that much of :func:`pattern`, paced, and closes."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            header = b""
            while len(header) < 8:
                chunk = self.request.recv(8 - len(header))
                if not chunk:
                    return
                header += chunk
            total, sent = int.from_bytes(header, "big"), 0
            while sent < total:
                piece = pattern(sent, min(STREAM_CHUNK, total - sent))
                self.request.sendall(piece)
                sent += len(piece)
                time.sleep(STREAM_PACING)  # pacing of the service, not a wait of the test


class _Firehose(socketserver.BaseRequestHandler):
    """Writes as fast as the connection takes it; counts what the kernel accepted."""

    server: _FirehoseServer

    def handle(self) -> None:
        chunk = b"\xa5" * 65536
        self.server.active += 1
        try:
            while True:
                self.server.written += self.request.send(chunk)
        except OSError:
            pass
        finally:
            self.server.active -= 1


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 4096  # the listen() backlog: floods reach the service too


class _FirehoseServer(_Server):
    written = 0
    active = 0


@contextlib.contextmanager
def tcp_service(
    handler: type[socketserver.BaseRequestHandler], server_class: type[_Server] = _Server
) -> Iterator[_Server]:
    """A threaded TCP server on loopback port 0 in this process."""
    server = server_class(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)


def service_port(server: _Server) -> int:
    return int(server.server_address[1])


# --- clients --------------------------------------------------------------------


def set_linger_zero(sock: socket.socket) -> None:
    """Make ``close()`` send an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def echo_checked(port: int, size: int = MiB, timeout: float = DEADLINE) -> float:
    """A checksummed echo transfer of ``size`` random bytes; returns its duration."""
    payload = os.urandom(size)
    started = time.monotonic()
    received, how = echo_exchange(port, payload, timeout)
    elapsed = time.monotonic() - started
    assert how == "eof", f"echo of {size} bytes ended by {how} after {len(received)} bytes"
    assert len(received) == size and digest(received) == digest(payload), (
        f"echo corrupted: sent {size} bytes, got {len(received)}"
    )
    return elapsed


def try_echo(port: int, size: int) -> str:
    """One echo transfer that may fail cleanly: "ok", "reset" or "refused".
    A clean end with wrong or missing bytes fails the test."""
    payload = os.urandom(size)
    try:
        received, how = echo_exchange(port, payload)
    except ConnectionRefusedError:
        return "refused"
    except ConnectionError:  # reset before or while sending
        return "reset"
    if how == "eof":
        assert digest(received) == digest(payload), (
            f"clean end after {len(received)} of {size} bytes, or corrupted bytes"
        )
        return "ok"
    assert how == "reset", f"echo hung ({how}) after {len(received)} of {size} bytes"
    return "reset"


def download(port: int, size: int) -> None:
    """A checksummed download of ``size`` bytes from the stream service."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(size.to_bytes(8, "big"))
        received = bytearray()
        how = read_until_end(sock, received, DEADLINE)
    assert how == "eof" and len(received) == size, f"{how} after {len(received)} of {size}"
    assert_stream_prefix(received)


def probe(port: int, bound: float) -> tuple[str, float]:
    """Connect to ``port`` and send a little: refused, closed or reset, or
    served (an echo), all within ``bound``; hanging fails. Returns (how, seconds)."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=bound) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(b"probe")
            received = bytearray()
            how = read_until_end(sock, received, bound - (time.monotonic() - started))
            if how == "timeout" and received == b"probe":
                how = "served"
    except ConnectionRefusedError:
        how = "refused"
    elapsed = time.monotonic() - started
    assert how != "timeout", f"a client on port {port} was left hanging for {bound} s"
    return how, elapsed


def gateway_took(gateway: GatewayProc, sock: socket.socket) -> str | None:
    """ "waiting" once the gateway holds this client connection, "closed" or
    "reset" if it ended it, None while it is still in the accept queue."""
    if sock.getsockname()[1] in remote_ports(gateway.pid):
        return "waiting"
    sock.setblocking(False)
    try:
        return None if sock.recv(1, socket.MSG_PEEK) else "closed"
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return "reset"


def is_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
            return False
    except ConnectionRefusedError:
        return True


# --- 1. gateway restart -----------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_gateway_restart_agent_returns_within_backoff_and_gap_clients_never_hang(
    launch: Launch, tmp_path: Path, signum: int
) -> None:
    """A gateway restarted on the same ports: clients in the gap are refused at
    once, the agent is back having never waited longer than its backoff cap,
    and bytes flow again intact."""
    token = new_token()
    state = tmp_path / "state"
    gateway = start_gateway(launch, state, *HEARTBEAT_FLAGS, token=token)
    listen = f"127.0.0.1:{gateway.port}"  # the port the first one was given, again
    with tcp_service(EchoHandler) as echo:
        agent = start_agent(launch, gateway, token, f"0:127.0.0.1:{service_port(echo)}")
        public = wait_exposed(agent)  # and kept across the restart
        echo_checked(public)

        gateway.proc.signal(signum)
        gateway.proc.wait_exit()
        agent.wait_line(r"reconnecting to")
        gap = [probe(public, bound=1.0) for _ in range(3)]
        assert all(how == "refused" for how, _ in gap), gap

        again = start_gateway(launch, state, *HEARTBEAT_FLAGS, listen=listen, token=token)
        listening = time.monotonic()
        assert again.fingerprint == gateway.fingerprint
        # Until the agent is back, a client is refused or served, never left waiting.
        how, _ = probe(public, bound=1.0)
        assert how in ("refused", "served"), how
        wait_exposed(agent, public, count=2)
        back_after = time.monotonic() - listening
        waits = reconnect_waits(agent)
        assert waits and max(waits) <= RECONNECT_MAX, f"the agent waited {waits} s"
        echo_checked(public, 4 * MiB)
        assert agent.popen.poll() is None
    probes = ", ".join(f"{how} in {seconds * 1000:.1f} ms" for how, seconds in gap)
    print(
        f"gateway restart ({signal.Signals(signum).name}): gap probes {probes}; "
        f"agent back {back_after:.2f} s after the gateway listened"
    )


# --- 2. agent killed or frozen mid-transfer -------------------------------------------

MID_TRANSFER = 256 * 1024  # each client has this much of its download before the signal
STALLED_CLIENTS = 4


@pytest.mark.parametrize(
    ("signum", "tls"),
    [(signal.SIGKILL, True), (signal.SIGKILL, False), (signal.SIGSTOP, True)],
    ids=["SIGKILL-tls", "SIGKILL-plain-tcp", "SIGSTOP-tls"],
)
def test_agent_death_mid_transfer_resets_clients_and_frees_gateway(
    launch: Launch, tmp_path: Path, signum: int, tls: bool
) -> None:
    """A killed or frozen agent: every client mid-download sees a reset, the
    gateway drops every socket of that session and frees the port, and the
    agent (restarted, or continued) gets the same port back."""
    token = new_token()
    # A killed agent's connections end at once; only a frozen one needs the
    # heartbeat deadline, which otherwise never comes while the test runs.
    heartbeat = HEARTBEAT_FLAGS if signum == signal.SIGSTOP else NO_HEARTBEAT_DEADLINE
    gateway = start_gateway(launch, tmp_path / "state", *heartbeat, tls=tls, token=token)
    baseline = fd_census(gateway.pid)
    with tcp_service(_Stream) as stream, contextlib.ExitStack() as closing:
        agent = start_agent(launch, gateway, token, f"0:127.0.0.1:{service_port(stream)}")
        public = wait_exposed(agent)
        expose = f"{public}:127.0.0.1:{service_port(stream)}"  # for the restarted agent
        clients = []
        for _ in range(STALLED_CLIENTS):
            sock = closing.enter_context(socket.create_connection(("127.0.0.1", public), DEADLINE))
            sock.sendall((1 << 40).to_bytes(8, "big"))  # far more than will ever come
            clients.append((sock, bytearray()))
        for sock, received in clients:
            while len(received) < MID_TRANSFER:
                chunk = sock.recv(65536)
                assert chunk, f"the download ended after {len(received)} bytes"
                received += chunk

        agent.signal(signum)
        signalled = time.monotonic()
        for sock, received in clients:
            how = read_until_end(sock, received, DEADLINE)
            assert how == "reset", f"a client saw {how} after {len(received)} bytes"
            assert_stream_prefix(received)
        reset_after = time.monotonic() - signalled
        if signum == signal.SIGSTOP:
            gateway.proc.wait_line(r"session ended .*no heartbeat within the deadline")
        during = fd_census(gateway.pid)

        wait_fds_back(gateway.pid, baseline)
        after = fd_census(gateway.pid)
        assert is_refused(public), "the dead session's port still accepts clients"

        if signum == signal.SIGKILL:
            agent.wait_exit()
            restarted = time.monotonic()
            agent = start_agent(launch, gateway, token, expose)
            wait_exposed(agent, public)
        else:
            agent.signal(signal.SIGCONT)
            restarted = time.monotonic()
            wait_exposed(agent, public, count=2)
            waits = reconnect_waits(agent)
            assert waits and max(waits) <= RECONNECT_MAX, f"the agent waited {waits} s"
        back_after = time.monotonic() - restarted
        assert not agent.lines_matching("not exposed"), agent.describe()
        download(public, 2 * MiB)
    print(
        f"agent {signal.Signals(signum).name} ({'tls' if tls else 'plain'}): clients reset "
        f"{reset_after:.3f} s after the signal; gateway fds {fd_total(baseline)} before the "
        f"agent, {fd_total(during)} at the reset, then {dict(after)}; "
        f"port served again after {back_after:.2f} s"
    )


# --- 3. takeover of a half-dead session -----------------------------------------------


def test_agent_takeover_of_frozen_session_is_immediate(launch: Launch, tmp_path: Path) -> None:
    """An agent reconnecting while its old self is frozen gets its port without
    waiting for the frozen session's heartbeat deadline, the frozen session's
    clients are reset, and no byte is ever corrupted while the two take the
    port from each other."""
    token = new_token()
    # No heartbeat deadline passes while the test runs: only the takeover can
    # free the port.
    gateway = start_gateway(launch, tmp_path / "state", *NO_HEARTBEAT_DEADLINE, token=token)
    with tcp_service(EchoHandler) as echo, contextlib.ExitStack() as closing:
        first = start_agent(launch, gateway, token, f"0:127.0.0.1:{service_port(echo)}")
        public = wait_exposed(first)
        expose = f"{public}:127.0.0.1:{service_port(echo)}"  # the second asks for it by number
        echo_checked(public)
        # A client in the middle of an exchange through the first agent.
        stalled = closing.enter_context(socket.create_connection(("127.0.0.1", public), DEADLINE))
        stalled.sendall(b"x" * 65536)
        got = bytearray()
        while len(got) < 65536:
            got += stalled.recv(65536)

        first.signal(signal.SIGSTOP)
        stalled.sendall(b"y" * 65536)  # into the socket buffers; no echo will come
        launched = time.monotonic()
        second = start_agent(launch, gateway, token, expose)
        wait_exposed(second, public)
        exposed_after = time.monotonic() - launched
        replacing_pattern = r"agent reconnected; replacing its session"
        exposed_pattern = rf"service \S+ exposed on 127\.0\.0\.1:{public}\b"
        replacing = gateway.proc.wait_line(replacing_pattern)
        exposed = gateway.proc.wait_line(exposed_pattern, count=2)
        assert line_number(gateway.proc, replacing_pattern) < line_number(
            gateway.proc, exposed_pattern, count=2
        ), "the port went to the second agent before its old session was replaced"
        takeover = log_time(exposed.string) - log_time(replacing.string)
        how = read_until_end(stalled, got, DEADLINE)
        assert how == "reset", f"the frozen session's client saw {how}"
        echo_checked(public, 4 * MiB)

        # The first agent wakes up to a dead session and takes the port back;
        # the second does the same in turn. Clients in between are refused or
        # reset, never served wrong bytes.
        first.signal(signal.SIGCONT)
        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + 3 * RECONNECT_MAX
        while time.monotonic() < deadline:
            outcomes[try_echo(public, 256 * 1024)] += 1
        assert outcomes["ok"] >= 3, outcomes

        first.signal(signal.SIGTERM)
        assert first.wait_exit() == 0
        served = wait_for(lambda: try_echo(public, MiB) == "ok", DEADLINE, "the second agent")
        assert served
        waits = reconnect_waits(second)
        assert waits and max(waits) <= RECONNECT_MAX, f"the second agent waited {waits} s"
        echo_checked(public, 4 * MiB)
        assert second.popen.poll() is None
    print(
        f"takeover: {takeover:.3f} s in the gateway's log, exposed {exposed_after:.2f} s after "
        f"launch; while both agents took turns: {dict(outcomes)}"
    )


# --- 4. bounded resources under abuse --------------------------------------------------

SLOWLORIS = 300
SHORT_HANDSHAKE = 1.0
ATTACKER = "127.0.0.2"  # the source address of the slow handshakes


class Slowloris:
    """Holds ``count`` connections to a port, each sending a fragment of a
    handshake and then nothing; reopens each one the peer closes, until stopped.
    Records how long each lived and every local port it used."""

    def __init__(self, port: int, count: int, fragments: list[bytes]) -> None:
        self.port = port
        self.count = count
        self.fragments = fragments
        self.lifetimes: list[float] = []
        self.ports: set[int] = set()
        self.opened = 0
        self._stopping = threading.Event()
        self._aborting = threading.Event()
        self._open: dict[socket.socket, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Slowloris:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._aborting.set()
        self._thread.join(DEADLINE)

    def wait_all_closed_by_peer(self, timeout: float) -> None:
        """Stop reopening; wait until the peer has closed every connection."""
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._aborting.set()
            self._thread.join(DEADLINE)
            pytest.fail(f"{len(self._open)} connections still open after {timeout} s")

    def _open_one(self, selector: selectors.BaseSelector) -> None:
        # From an address of its own: handshakes left to time out count
        # against their source, which soon gets only a few at once.
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.port), DEADLINE, source_address=(ATTACKER, 0)
            )
        except ConnectionResetError:  # reset at once, as a suspect address
            self.opened += 1
            self.lifetimes.append(0.0)
            return
        fragment = self.fragments[self.opened % len(self.fragments)]
        self.opened += 1
        if fragment:
            with contextlib.suppress(OSError):  # reset at once, as a suspect address
                sock.sendall(fragment)
        sock.setblocking(False)
        self.ports.add(sock.getsockname()[1])
        self._open[sock] = time.monotonic()
        selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            try:
                while not self._aborting.is_set():
                    while not self._stopping.is_set() and len(self._open) < self.count:
                        self._open_one(selector)
                    if self._stopping.is_set() and not self._open:
                        return
                    for key, _ in selector.select(POLL_INTERVAL):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        try:
                            if sock.recv(65536):
                                continue  # the peer spoke; we never answer
                        except BlockingIOError:
                            continue
                        except OSError:
                            pass  # a reset: closed by the peer too
                        selector.unregister(sock)
                        self.lifetimes.append(time.monotonic() - self._open.pop(sock))
                        sock.close()
            finally:
                for sock in self._open:
                    sock.close()


def test_control_port_slowloris_closed_after_handshake_timeout(
    launch: Launch, tmp_path: Path
) -> None:
    """Hundreds of connections that never finish a TLS handshake are closed
    after the handshake timeout, their address then gets only a few at once,
    a real agent connects and serves meanwhile, and the gateway's descriptors
    go back to where they were."""
    token = new_token()
    gateway = start_gateway(
        launch, tmp_path / "state", *HEARTBEAT_FLAGS,
        "--handshake-timeout", str(SHORT_HANDSHAKE), token=token,
    )  # fmt: skip
    baseline = fd_census(gateway.pid)
    hello = client_hello()
    fragments = [b"", hello[:5], hello[: len(hello) // 2], hello[:-1]]
    with tcp_service(EchoHandler) as echo, Slowloris(gateway.port, SLOWLORIS, fragments) as attack:
        wait_for(lambda: attack.opened >= SLOWLORIS, DEADLINE, "the attack to start")
        connecting = time.monotonic()
        agent = start_agent(launch, gateway, token, f"0:127.0.0.1:{service_port(echo)}")
        public = wait_exposed(agent)
        exposed_after = time.monotonic() - connecting
        for _ in range(3):
            echo_checked(public)
        # Turned over at least twice while the agent connected and served.
        wait_for(lambda: attack.opened >= 3 * SLOWLORIS, DEADLINE, "the attack to turn over")
        attack.wait_all_closed_by_peer(SHORT_HANDSHAKE + MARGIN + 1)
        echo_checked(public)

    longest = max(attack.lifetimes)
    agent_ports = {local for local, _, _ in tcp_sockets(agent.popen.pid)}
    held = remote_ports(gateway.pid) & (attack.ports - agent_ports)
    assert not held, f"the gateway still holds {len(held)} connections of the attack"
    gateway.proc.wait_line(
        r"WARNING .*closing connection from 127\.0\.0\.2:\d+: handshake timed out"
    )
    gateway.proc.wait_line(  # its timeouts count against the attacker's address
        r"dropping connection from 127\.0\.0\.2:\d+: it failed to authenticate repeatedly"
    )
    agent.signal(signal.SIGTERM)
    assert agent.wait_exit() == 0
    wait_fds_back(gateway.pid, baseline)
    print(
        f"slowloris: {attack.opened} connections, longest {longest:.2f} s, "
        f"agent exposed after {exposed_after:.2f} s, gateway fds {dict(fd_census(gateway.pid))}"
    )


ABANDONED = 5000
ABANDON_BATCH = 500
# A flood's memory peaks with the handshakes in flight (at most max_handshakes),
# each holding up to a TLS read buffer.
FLOOD_RSS_BOUND_KIB = options(GATEWAY)["max_handshakes"].default * READ_BUFFER_SIZE // 1024
FLOOD_FD_TOLERANCE = options(AGENT)["pool_size"].default + 4  # the agent's idle pool, and a few
# A 32 KiB echo beside a flood: the gateway works through the flood's 5,000
# accepts at its own pace, and a live client may wait behind them, but it must
# never fail (how long it waited is printed; speed is for `make bench`).


@dataclass
class EchoLoop:
    """New connections, one after another, each a checksummed echo, until stopped."""

    port: int
    size: int = 32 * 1024
    rounds: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> EchoLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for(lambda: self.rounds >= 3, DEADLINE, "the first echoes")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        assert self._thread is not None
        self._thread.join(DEADLINE)

    def wait_more(self, rounds: int) -> None:
        target = self.rounds + rounds
        wait_for(lambda: self.rounds >= target, DEADLINE, f"{rounds} more echoes")

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.latencies.append(echo_checked(self.port, self.size))
            except (AssertionError, OSError) as exc:
                self.failures.append(str(exc).splitlines()[0])
            self.rounds += 1


def abandon(port: int, count: int) -> float:
    """Open ``count`` connections to ``port`` and drop them at once, in batches,
    every other one with an RST; returns the seconds it took. A connection the
    gateway resets first (a limit reached) counts as dropped too."""
    started = time.monotonic()
    for start in range(0, count, ABANDON_BATCH):
        with contextlib.ExitStack() as batch:
            for index in range(min(ABANDON_BATCH, count - start)):
                try:
                    sock = batch.enter_context(
                        socket.create_connection(("127.0.0.1", port), DEADLINE)
                    )
                except ConnectionResetError:
                    continue
                if index % 2:
                    set_linger_zero(sock)
    return time.monotonic() - started


@dataclass
class Footprint:
    """Descriptors and memory of the gateway and the agent at one moment."""

    gateway: GatewayProc
    agent: Proc
    fds: dict[str, Counter[str]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, pid in self.pids.items():
            self.fds[name] = fd_census(pid)
            self.rss[name] = rss_kib(pid)

    @property
    def pids(self) -> dict[str, int]:
        return {"gateway": self.gateway.pid, "agent": self.agent.popen.pid}

    def wait_back(self, port: int, tolerance: int, rss_bound_kib: int) -> str:
        """Once the flood on ``port`` is all accepted, wait until both have at most
        ``tolerance`` more descriptors than then (sockets included); check their
        memory grew less than ``rss_bound_kib``. Returns the figures."""
        wait_for(lambda: accept_queue(port) == 0, DEADLINE, "the flood to be accepted")
        figures = []
        for name, pid in self.pids.items():
            before = self.fds[name]

            def settled(pid: int = pid, before: Counter[str] = before) -> bool:
                return fd_total(fd_census(pid)) <= fd_total(before) + tolerance and (
                    back_to_baseline(pid, before, extra_sockets=tolerance)
                )

            def describe(name: str = name, pid: int = pid, before: Counter[str] = before) -> str:
                return (
                    f"{name} fds back to {dict(before)} + {tolerance}, now {dict(fd_census(pid))}"
                )

            wait_for(settled, 3 * DEADLINE, describe)
            after = fd_census(pid)
            growth = rss_kib(pid) - self.rss[name]
            assert growth < rss_bound_kib, f"{name} RSS grew by {growth} KiB"
            figures.append(
                f"{name} fds {fd_total(before)} -> {fd_total(after)}, "
                f"RSS {self.rss[name]} KiB {growth:+d} KiB"
            )
        return "; ".join(figures)


def open_echo_tunnel(
    launch: Launch, tmp_path: Path, echo: _Server
) -> tuple[GatewayProc, Proc, int]:
    """A TLS gateway and an agent exposing ``echo``, checked with one transfer."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", *HEARTBEAT_FLAGS, token=token)
    agent = start_agent(launch, gateway, token, f"0:127.0.0.1:{service_port(echo)}")
    public = wait_exposed(agent)
    echo_checked(public)
    return gateway, agent, public


def test_control_port_abandoned_connections_leave_no_trace(
    launch: Launch, tmp_path: Path, many_files: int
) -> None:
    """5,000 connections opened and dropped on the control port: clients of the
    tunnel are served throughout, and descriptors and memory come back."""
    with tcp_service(EchoHandler) as echo:
        gateway, agent, public = open_echo_tunnel(launch, tmp_path, echo)
        before = Footprint(gateway, agent)
        with EchoLoop(public) as loop:
            flood_time = abandon(gateway.port, ABANDONED)
            loop.wait_more(3)
        assert not loop.failures, loop.failures[:5]
        slowest = max(loop.latencies)
        figures = before.wait_back(gateway.port, FLOOD_FD_TOLERANCE, FLOOD_RSS_BOUND_KIB)
        echo_checked(public, 4 * MiB)
    print(
        f"control-port flood: {ABANDONED} in {flood_time:.2f} s, {loop.rounds} echoes beside "
        f"it, slowest {slowest:.3f} s; {figures}"
    )


def test_service_port_abandoned_connections_leave_no_trace(
    launch: Launch, tmp_path: Path, many_files: int
) -> None:
    """5,000 connections opened and dropped on a service port: every one is
    closed on both sides, and descriptors and memory of gateway and agent come
    back to where they were."""
    with tcp_service(EchoHandler) as echo:
        gateway, agent, public = open_echo_tunnel(launch, tmp_path, echo)
        before = Footprint(gateway, agent)
        flood_time = abandon(public, ABANDONED)
        figures = before.wait_back(public, FLOOD_FD_TOLERANCE, FLOOD_RSS_BOUND_KIB)
        echo_checked(public, 4 * MiB)
    print(f"service-port flood: {ABANDONED} in {flood_time:.2f} s; {figures}")


def test_service_port_abandoned_connections_do_not_disturb_other_clients(
    launch: Launch, tmp_path: Path, many_files: int
) -> None:
    """While 5,000 connections are opened and dropped on a service port, other
    clients of that service are served, intact."""
    with tcp_service(EchoHandler) as echo:
        gateway, _, public = open_echo_tunnel(launch, tmp_path, echo)
        with EchoLoop(public) as loop:
            abandon(public, ABANDONED)
            loop.wait_more(3)
        assert not loop.failures, (
            loop.failures[:3],
            gateway.proc.lines_matching(r"no data channel from the agent")[-1:],
        )
        print(f"service-port flood: slowest echo beside it {max(loop.latencies):.3f} s")


MAX_PENDING = 20
LONG_TIMEOUT = 30.0  # neither the heartbeat nor the pending timeout ends anything here


def test_service_port_client_hanging_up_while_waiting_is_dropped(
    launch: Launch, tmp_path: Path
) -> None:
    """Clients that hang up while they wait for a data channel are forgotten at
    once: their sockets are closed, and they take no place from a client that
    stays, which is served as soon as the agent can."""
    token = new_token()
    config = tmp_path / "gateway.toml"
    config.write_text(f"max_pending_clients = {MAX_PENDING}\n")
    gateway = start_gateway(
        launch, tmp_path / "state", "--config", str(config),
        "--heartbeat-interval", "0.5", "--heartbeat-timeout", str(LONG_TIMEOUT),
        "--pending-timeout", str(LONG_TIMEOUT), token=token,
    )  # fmt: skip
    baseline = fd_census(gateway.pid)
    with tcp_service(EchoHandler) as echo:
        # No pooled data channel: every client waits for one the agent opens.
        agent = launch(
            "agent", "--gateway", f"127.0.0.1:{gateway.port}", "--fingerprint",
            str(gateway.fingerprint), "--pool-size", "0", "--expose",
            f"0:127.0.0.1:{service_port(echo)}", token=token,
        )  # fmt: skip
        public = wait_exposed(agent)
        session = baseline["socket"] + 2  # the control channel and the service's listener
        assert fd_census(gateway.pid)["socket"] == session, fd_census(gateway.pid)
        agent.signal(signal.SIGSTOP)  # now no data channel can come

        for index in range(2 * MAX_PENDING):
            with socket.create_connection(("127.0.0.1", public), DEADLINE) as sock:
                state = wait_for(
                    functools.partial(gateway_took, gateway, sock),
                    DEADLINE,
                    "the gateway to take the client",
                )
                assert state == "waiting", (
                    f"client {index + 1} was {state} while only clients that had left waited"
                )
                set_linger_zero(sock)
        wait_for(
            lambda: fd_census(gateway.pid)["socket"] == session,
            MARGIN,
            lambda: f"the gateway to close the clients that left: {dict(fd_census(gateway.pid))}",
        )
        payload = os.urandom(MiB)
        with socket.create_connection(("127.0.0.1", public), DEADLINE) as stays:
            stays.sendall(payload)
            stays.shutdown(socket.SHUT_WR)
            stays.setblocking(False)
            with pytest.raises(BlockingIOError):  # waiting, not reset
                stays.recv(1)
            agent.signal(signal.SIGCONT)
            received = bytearray()
            how = read_until_end(stays, received, DEADLINE)
        assert how == "eof" and digest(received) == digest(payload), (how, len(received))


OVERSIZED_HEADERS = {
    "message-16MiB": (p.KIND_MESSAGE, 0xFFFFFF),
    "message-64KiB+1": (p.KIND_MESSAGE, p.MAX_MESSAGE_SIZE + 1),
    "data-16MiB": (p.KIND_DATA, 0xFFFFFF),
    "abort-1KiB+1": (p.KIND_ABORT, p.MAX_ABORT_SIZE + 1),
}
OVERSIZED_COPIES = 10  # connections per header


def frame_header(kind: int, length: int) -> bytes:
    return struct.pack(">I", (kind << 24) | length)


def open_control(gateway: GatewayProc) -> socket.socket:
    """A connection to the control port, TLS as the gateway speaks it."""
    sock = socket.create_connection(("127.0.0.1", gateway.port), DEADLINE)
    if gateway.fingerprint is None:
        return sock
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname="tunnelgate")


def receive_message(sock: socket.socket, decoder: p.FrameDecoder) -> p.Message:
    while True:
        data = sock.recv(65536)
        assert data, "closed before a message came"
        events = list(decoder.feed(data))
        if events:
            message = events[0]
            assert not isinstance(message, (p.Data, p.End, p.Abort)), message
            return message


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_control_port_oversized_frames_closed_with_warning(
    launch: Launch, tmp_path: Path, tls: bool
) -> None:
    """Frame headers announcing more than the protocol allows, before and after
    authentication, are closed at once with a WARNING naming the size; the
    tunnel keeps serving and the gateway keeps none of those sockets."""
    token = new_token()
    # Neither a handshake nor a heartbeat deadline passes while the test runs:
    # only the oversized frames can close these connections.
    never = f"{LONGER_THAN_ANY_TEST:g}"
    gateway = start_gateway(
        launch, tmp_path / "state", *NO_HEARTBEAT_DEADLINE, "--handshake-timeout", never,
        tls=tls, token=token,
    )  # fmt: skip
    baseline = fd_census(gateway.pid)
    with tcp_service(EchoHandler) as echo, contextlib.ExitStack() as closing:
        agent = start_agent(launch, gateway, token, f"0:127.0.0.1:{service_port(echo)}")
        public = wait_exposed(agent)
        echo_checked(public)

        attackers: list[socket.socket] = []
        for kind, length in OVERSIZED_HEADERS.values():
            for _ in range(OVERSIZED_COPIES):
                sock = closing.enter_context(open_control(gateway))
                assert isinstance(receive_message(sock, p.FrameDecoder()), p.Challenge)
                sock.sendall(frame_header(kind, length) + b"\0" * 1024)
                attackers.append(sock)
        # One more that authenticates as a second agent, then oversteps.
        intruder = closing.enter_context(open_control(gateway))
        decoder = p.FrameDecoder()
        challenge = receive_message(intruder, decoder)
        assert isinstance(challenge, p.Challenge)
        proof = credentials.proof_for(token.encode(), challenge.nonce, "control", "intruder", "")
        intruder.sendall(
            p.encode_message(p.Hello(p.PROTOCOL_VERSION, "control", "intruder", proof))
        )
        assert isinstance(receive_message(intruder, decoder), p.Welcome)
        intruder.sendall(frame_header(p.KIND_MESSAGE, 0xFFFFFF))
        attackers.append(intruder)
        attacker_ports = {sock.getsockname()[1] for sock in attackers}

        for sock in attackers:
            junk = bytearray()
            how = read_until_end(sock, junk, DEADLINE)
            assert how in ("eof", "reset"), f"an oversized frame was met with {how}"

        message_size = rf"message frame of {0xFFFFFF} bytes \(limit {p.MAX_MESSAGE_SIZE}\)"
        gateway.proc.wait_line(rf"WARNING .*session ended after .*{message_size}")
        for problem in [
            message_size,
            rf"message frame of {p.MAX_MESSAGE_SIZE + 1} bytes",
            rf"data frame of {0xFFFFFF} bytes",
            rf"abort frame of {p.MAX_ABORT_SIZE + 1} bytes",
        ]:
            gateway.proc.wait_line(
                rf"WARNING .*closing connection from 127\.0\.0\.1:\d+: .*{problem}"
            )
        assert not remote_ports(gateway.pid) & attacker_ports, "attackers' sockets kept"
        echo_checked(public, 4 * MiB)
        assert agent.popen.poll() is None
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit() == 0
    wait_fds_back(gateway.pid, baseline)


MAX_CONNECTIONS = 50


def wait_accepted(gateway: GatewayProc, ports: set[int]) -> None:
    """Wait until the gateway holds a connection from each of ``ports``."""
    wait_for(
        lambda: ports <= remote_ports(gateway.pid),
        DEADLINE,
        lambda: (
            f"{len(ports - remote_ports(gateway.pid))} of {len(ports)} clients to be "
            f"accepted\n{gateway.proc.describe()}"
        ),
    )


def test_service_port_idle_clients_capped_by_max_connections(
    launch: Launch, tmp_path: Path
) -> None:
    """With ``max_connections = 50``, fifty clients that never send are held,
    the fifty-first is closed at once with a WARNING, and once the idle ones
    leave, new clients are served again."""
    token = new_token()
    config = tmp_path / "gateway.toml"
    config.write_text(f"max_connections = {MAX_CONNECTIONS}\n")
    gateway = start_gateway(
        launch, tmp_path / "state", "--config", str(config), *HEARTBEAT_FLAGS, token=token
    )
    with tcp_service(EchoHandler) as echo:
        agent = start_agent(launch, gateway, token, f"0:127.0.0.1:{service_port(echo)}")
        public = wait_exposed(agent)
        served = 0  # clients whose end the gateway has logged, so no longer counted

        def wait_all_closed() -> None:
            closed = r"closed client=127\.0\.0\.1:"
            wait_for(
                lambda: len(gateway.proc.lines_matching(closed)) >= served,
                DEADLINE,
                lambda: f"{served} clients to be closed\n{gateway.proc.describe()}",
            )
            # A client is logged as closed a loop iteration before it stops
            # counting; a new control connection is served only after that.
            with open_control(gateway) as barrier:
                assert isinstance(receive_message(barrier, p.FrameDecoder()), p.Challenge)

        echo_checked(public)
        served += 1
        for _ in range(2):  # the count goes down as clients leave
            wait_all_closed()
            with contextlib.ExitStack() as closing:
                idle = [
                    closing.enter_context(socket.create_connection(("127.0.0.1", public), DEADLINE))
                    for _ in range(MAX_CONNECTIONS)
                ]
                served += MAX_CONNECTIONS
                wait_accepted(gateway, {sock.getsockname()[1] for sock in idle})
                # Relayed instead, it would stay open: nothing else ends an idle client.
                try:
                    with socket.create_connection(("127.0.0.1", public), DEADLINE) as extra:
                        how = read_until_end(extra, bytearray(), DEADLINE)
                except ConnectionResetError:  # reset before connect() returned
                    how = "reset"
                assert how in ("eof", "reset"), f"client {MAX_CONNECTIONS + 1} saw {how}"
                # Logged once per interval under a flood: the first refusal at least.
                gateway.proc.wait_line(r"WARNING .*max_connections")
                for sock in idle:  # still held
                    sock.setblocking(False)
                    with pytest.raises(BlockingIOError):
                        sock.recv(1)
            wait_all_closed()
            for _ in range(3):
                echo_checked(public)
            served += 3


NEVER_READ_RSS_BOUND_KIB = 16 * 1024


def in_flight_bound() -> int:
    """The most bytes the kernel can hold between a service and a client that
    does not read: three TCP connections (service-agent, agent-gateway,
    gateway-client), each with a full send and receive buffer, and a pipe per
    relay; plus a copy-path chunk per relay in tunnelgate itself."""
    with open("/proc/sys/net/ipv4/tcp_rmem") as rmem, open("/proc/sys/net/ipv4/tcp_wmem") as wmem:
        per_connection = int(rmem.read().split()[2]) + int(wmem.read().split()[2])
    return 3 * per_connection + 2 * (PIPE_SIZE + CHUNK_SIZE)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_client_that_never_reads_stalls_service_with_bounded_memory(
    launch: Launch, tmp_path: Path, tls: bool
) -> None:
    """A client that never reads while the service writes flat out: the
    service's writes stall after a bounded amount, gateway and agent memory
    stay bounded and idle, and another client's transfer goes through intact."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", *HEARTBEAT_FLAGS, tls=tls, token=token)
    with (
        tcp_service(EchoHandler) as echo,
        tcp_service(_Firehose, _FirehoseServer) as firehose,
    ):
        assert isinstance(firehose, _FirehoseServer)
        agent = start_agent(
            launch, gateway, token,
            f"0:127.0.0.1:{service_port(firehose)}", f"0:127.0.0.1:{service_port(echo)}",
        )  # fmt: skip
        firehose_port = wait_exposed(agent)
        echo_port = wait_exposed(agent, count=2)
        echo_checked(echo_port, 8 * MiB)
        paced = echo_checked(echo_port, 8 * MiB)
        rss_before = rss_kib(gateway.pid), rss_kib(agent.popen.pid)

        with socket.create_connection(("127.0.0.1", firehose_port), DEADLINE) as sleeper:
            wait_for(lambda: firehose.active == 1, DEADLINE, "the service to start writing")
            samples: list[tuple[int, float]] = []

            def stalled() -> bool:
                cpu = cpu_seconds(gateway.pid) + cpu_seconds(agent.popen.pid)
                samples.append((firehose.written, cpu))
                window = int(1.0 / POLL_INTERVAL)
                return len(samples) > window and 0 < samples[-1][0] == samples[-1 - window][0]

            wait_for(stalled, 3 * DEADLINE, lambda: f"the writes to stall ({samples[-3:]})")
            written = firehose.written
            idle_cpu = samples[-1][1] - samples[-1 - int(1.0 / POLL_INTERVAL)][1]
            assert written < in_flight_bound(), f"{written} bytes written"
            during = echo_checked(echo_port, 8 * MiB)
            assert firehose.written == written, "the writes went on"
            growth = rss_kib(gateway.pid) - rss_before[0], rss_kib(agent.popen.pid) - rss_before[1]
            assert max(growth) < NEVER_READ_RSS_BOUND_KIB, f"RSS grew by {growth} KiB"
            assert idle_cpu < 0.3, f"{idle_cpu:.2f} s of CPU in a second of stall"
            set_linger_zero(sleeper)
        wait_for(lambda: firehose.active == 0, DEADLINE, "the service's connection to end")
        echo_checked(echo_port)
    print(
        f"never-read ({'tls' if tls else 'plain'}): {written / MiB:.1f} MiB written before the "
        f"stall (kernel bound {in_flight_bound() / MiB:.0f} MiB), "
        f"RSS growth gateway/agent {growth[0]}/{growth[1]} KiB, "
        f"idle CPU {idle_cpu:.3f} s/s, 8 MiB echo {paced:.2f} s alone, {during:.2f} s beside it"
    )
