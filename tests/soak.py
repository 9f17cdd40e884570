"""The soak run (``make soak``): the real gateway and agent under mixed traffic
while faults fire at random, for a bounded time; then one table, PASS or FAIL.

What runs:

* ``tunnelgate gateway`` and ``tunnelgate agent``, real processes started
  through the CLI, with TLS on (the agent pins the gateway's certificate) and
  heartbeats of 1 s / 3 s, so that a dead path is noticed in seconds. The
  agent dials a :class:`faultkit.FaultProxy` that forwards to the gateway's
  fixed control port: faults are injected on that path, and the gateway can
  be restarted on the same port. The service is exposed on a fixed public
  port. Every process logs to its own file in a temporary directory, kept and
  named when the run fails.
* One local service in this process. Each connection opens with a header
  (mode, seed, length). Mode ``E`` echoes ``length`` bytes and checks them
  against the pattern made from ``seed`` (so a cut upload is caught at the
  service too); mode ``S`` sends ``length`` pattern bytes and closes.
* Clients, all at once for the whole run: bulk transfers (megabytes up
  through the echo, megabytes down from the source), many short
  request/response connections, and long idle ones (open, idle for tens of
  seconds, then one exchange). Every byte is checked against the pattern and
  its sha256, and every connection half-closes its way out.
* Faults, one at a time with a pause between, drawn from
  ``random.Random(seed)``: the seed is printed, and ``--seed`` replays the
  same faults with the same parameters after the same pauses (the traffic
  around them is not replayed exactly). A fault's recovery time runs from its end to
  the first checked request through the tunnel that started after that end;
  each kind of fault has a bound (``RECOVERY_BOUNDS``). The kinds: the
  control channel reset or cut one way; the whole path black-holed; data
  channels reset, or closed (FIN or RST) after N bytes; latency or a
  bandwidth cap; the agent SIGKILLed (and started again) or SIGSTOPped for a
  while; the gateway stopped with SIGTERM or SIGKILL and started again on the
  same ports; and pooled data channels whose path goes silent during a lull.
  Not injected: a *busy* or freshly pooled data channel whose path alone goes
  silent while the control channel stays healthy, which tunnelgate does not
  claim to survive (docs/RELIABILITY.md, "What is not guaranteed").

Every connection ends as one of: ``ok`` (all bytes, checksum right),
``reset`` (a visible error: acceptable while a fault is in effect), ``corrupt``
(a wrong byte, or a clean end before all bytes arrived: a silent truncation)
or ``hung`` (no progress for ``HUNG_TIMEOUT`` while bytes were due).

The run fails on any corrupt or hung connection, a reset outside every
fault's window, a recovery slower than its bound, descriptors or memory of
the gateway or the agent that did not come back after the traffic stopped, a
process that did not stop cleanly on SIGTERM at the end, or a traceback in a
log. Exit code 0 for PASS, 1 for FAIL.

This is a standalone script, not a pytest module: ``python tests/soak.py
--seconds 60 --seed 1234``; ``SOAK_SECONDS`` sets the default duration,
``--faults`` limits the kinds of fault, ``--keep`` keeps the logs of a PASS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultkit import CloseHow, Direction, FaultProxy, Kind, ProxiedConnection

from tunnelgate import Address
from tunnelgate.credentials import generate_token

# --- settings of the processes ---------------------------------------------------

HEARTBEAT_INTERVAL: Final = 1.0
HEARTBEAT_TIMEOUT: Final = 3.0  # a silent control channel ends the session after this
RECONNECT_MAX: Final = 2.0  # the agent's largest backoff before it dials again
PENDING_TIMEOUT: Final = 5.0  # a client's wait for a data channel at the gateway
POOL_SIZE: Final = 4
DRAIN_TIMEOUT: Final = 10.0  # the default: SIGTERM lets connections finish this long
# Deadlines of the agent that no flag sets; their defaults (README, "Agent").
AGENT_HANDSHAKE_TIMEOUT: Final = 10.0
OPEN_RETRY_DELAY: Final = 1.0  # agent.py: pause after a data channel failed or ended unused
# gateway.py: a pooled data channel idle this long is pinged before use, and
# the pool is discarded if no Pong comes within the timeout.
POOL_CHECK_AGE: Final = 5.0
POOL_CHECK_TIMEOUT: Final = 1.0

# --- bounds ------------------------------------------------------------------------

# Scheduling on a 2-core machine shared with other test runs, one TLS handshake
# and one registration round trip: what any recovery may take on top of the
# deadlines that explain it.
MARGIN: Final = 3.0
# A fresh ``python -m tunnelgate`` importing its modules and loading its TLS
# identity before it listens or dials (about 1 s here; more under load).
PROCESS_START: Final = 4.0

# Recovery bound per fault kind, in seconds from the end of the fault.
RECOVERY_BOUNDS: Final[dict[str, float]] = {
    # Both ends see the reset at once; the agent dials again after one backoff.
    "control-reset": RECONNECT_MAX + MARGIN,
    # Pongs (or pings) stop: the agent notices within a heartbeat timeout,
    # dials again after a backoff, and the gateway takes the session over.
    "control-cut": HEARTBEAT_TIMEOUT + RECONNECT_MAX + MARGIN,
    # A reconnect begun inside the black hole waits out the agent's handshake
    # deadline, then a backoff, then dials through the restored path.
    "path-blackhole": AGENT_HANDSHAKE_TIMEOUT + RECONNECT_MAX + MARGIN,
    # The control channel is untouched: a client finds a fresh pooled
    # channel, or waits for one the agent opens (after its retry pause).
    "data-reset": OPEN_RETRY_DELAY + MARGIN,
    "data-close-after": OPEN_RETRY_DELAY + MARGIN,
    # The same, and the client that takes a dead channel waits for its Pong first.
    "data-blackhole": POOL_CHECK_TIMEOUT + OPEN_RETRY_DELAY + MARGIN,
    # A delay near the heartbeat deadline may end a session: detection, backoff.
    "slow-path": HEARTBEAT_TIMEOUT + RECONNECT_MAX + MARGIN,
    # The new agent dials at once and takes the old session over.
    "agent-kill": PROCESS_START + MARGIN,
    # Stopped longer than the heartbeat timeout, the session is gone when the
    # agent runs again: it notices (its deadline has passed), backs off, dials.
    "agent-stop": HEARTBEAT_TIMEOUT + RECONNECT_MAX + MARGIN,
    # The new gateway starts; the agent, refused meanwhile, is in a backoff.
    "gateway-term": PROCESS_START + RECONNECT_MAX + MARGIN,
    "gateway-kill": PROCESS_START + RECONNECT_MAX + MARGIN,
}
FAULT_KINDS: Final = list(RECOVERY_BOUNDS)
RECOVERY_GIVE_UP: Final = 60.0  # no checked request for this long: the tunnel is dead

# No byte moved for this long while one was due: the connection hung. A dead
# path ends its session within the heartbeat timeout, and the session's
# clients are reset then, so 5 s more is plenty.
HUNG_TIMEOUT: Final = HEARTBEAT_TIMEOUT + 5.0
# A fault's effects may reach a connection a little after the fault ended
# (an armed pooled channel taken by the next client): resets are accepted for
# this long after the recovery.
FAULT_GRACE: Final = 5.0
# Seconds between a recovery and the next fault: at least the hung timeout, so
# that a connection a fault left hanging is seen before the next fault resets it.
FAULT_PAUSE: Final = (HUNG_TIMEOUT, HUNG_TIMEOUT + 5.0)
EXIT_TIMEOUT: Final = 5.0  # to exit after SIGKILL, or after SIGTERM with nothing to drain

# Descriptors: after the traffic stops, each process must come back to its
# quiescent count within this many (pooled channels may still be changing hands).
FD_TOLERANCE: Final = POOL_SIZE
# Memory: the allocator keeps some of what bulk transfers used (under 2 MiB in
# trial runs); a leak of a kilobyte per connection over the tens of thousands
# of connections of a full run is more.
RSS_TOLERANCE: Final = 16 << 20
SETTLE_TIMEOUT: Final = 30.0  # for descriptors to come back at the end
WARMUP_SECONDS: Final = 6.0
RESTART_WARMUP: Final = 10.0  # a restarted process's baseline is taken this long after its start

# --- traffic ---------------------------------------------------------------------

BULK_SIZES: Final = (2 << 20, 8 << 20)  # bytes per bulk transfer, each way
BULK_PAUSE: Final = (0.2, 1.5)  # seconds between bulk transfers of one worker
BULK_WORKERS: Final = 1  # each way
SHORT_WORKERS: Final = 4
SHORT_SIZES: Final = (1, 4096)
SHORT_PAUSE: Final = (0.01, 0.1)
IDLE_CONNECTIONS: Final = 6
IDLE_SECONDS: Final = (10.0, 40.0)
IDLE_EXCHANGE: Final = 2048
RETRY_PAUSE: Final = 0.25  # a client whose connection failed waits this long, as real ones do
PROBE_SIZE: Final = 1024
PROBE_INTERVAL: Final = 0.2  # a new probe this often while a recovery is awaited
PROBES_IN_FLIGHT: Final = 4
READ_SIZE: Final = 256 * 1024


def now() -> float:
    return time.monotonic()


async def poll_until(predicate: Callable[[], object], timeout: float) -> bool:
    """Whether ``predicate`` came true within ``timeout`` (checked every 0.1 s)."""
    deadline = now() + timeout
    while True:
        if predicate():
            return True
        if now() >= deadline:
            return False
        await asyncio.sleep(0.1)


# --- the byte pattern --------------------------------------------------------------

HEADER: Final = struct.Struct("!cQQ")  # mode, seed, length
BLOCK_SIZE: Final = 64 * 1024
# Pattern blocks: random bytes made once (cheaper than fresh ones per stream;
# a prime number of them), each stamped with its stream's seed and its own
# index, so that a lost, repeated or reordered block shows too.
_BLOCKS: Final = [random.Random(block).randbytes(BLOCK_SIZE) for block in range(61)]
_STAMP: Final = struct.Struct("!QQ")


def pattern(seed: int, length: int) -> Iterator[bytes]:
    """The ``length`` bytes a stream with ``seed`` carries, in blocks."""
    for index, offset in enumerate(range(0, length, BLOCK_SIZE)):
        block = _STAMP.pack(seed, index) + _BLOCKS[(seed + index) % len(_BLOCKS)][_STAMP.size :]
        yield block[: length - offset]


class Checker:
    """Compares a received stream with its pattern as it arrives."""

    def __init__(self, seed: int, length: int) -> None:
        self.length = length
        self.received = 0
        self.first_wrong: int | None = None
        self._expected = pattern(seed, length)
        self._pending = memoryview(b"")
        self._got = hashlib.sha256()
        self._want = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self._got.update(data)
        view = memoryview(data)
        while view:
            if not self._pending:
                block = next(self._expected, b"")
                if not block:
                    break  # bytes beyond the length: verdict() reports them
                self._want.update(block)
                self._pending = memoryview(block)
            size = min(len(self._pending), len(view))
            if self.first_wrong is None and view[:size] != self._pending[:size]:
                at = next(i for i in range(size) if view[i] != self._pending[i])
                self.first_wrong = self.received + len(data) - len(view) + at
            self._pending = self._pending[size:]
            view = view[size:]
        self.received += len(data)

    def verdict(self) -> str | None:
        """None if exactly the pattern arrived; else what was wrong (at the end)."""
        if self.received < self.length:
            return f"clean end after {self.received} of {self.length} bytes"
        if self.received > self.length:
            return f"{self.received - self.length} bytes more than the {self.length} sent"
        if self._got.digest() != self._want.digest():
            return f"sha256 mismatch, first wrong byte at offset {self.first_wrong}"
        return None


class Corrupt(Exception):
    """Wrong bytes, or a clean end before all of them."""


# --- outcomes ------------------------------------------------------------------------


@dataclass
class Outcome:
    """How one client connection ended."""

    traffic: str  # bulk-up, bulk-down, short, idle, probe
    result: str  # ok, reset, corrupt or hung
    error: str  # the kind of error; "" when ok
    started: float
    ended: float
    sent: int = 0
    received: int = 0
    detail: str = ""


@dataclass
class Fault:
    """One injected fault and its recovery."""

    kind: str
    detail: str
    started: float
    ended: float = math.inf
    recovery: float | None = None  # seconds from ``ended`` to a checked request

    @property
    def window(self) -> tuple[float, float]:
        """When the fault may cause visible errors."""
        settled = self.ended + (self.recovery if self.recovery is not None else RECOVERY_GIVE_UP)
        return self.started, settled + FAULT_GRACE


class Ledger:
    """Every outcome and fault of the run; wakes whoever waits for a recovery."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.faults: list[Fault] = []
        self.service_errors: Counter[str] = Counter()
        self.service_corrupt: list[tuple[float, str]] = []
        self._waiters: list[tuple[float, asyncio.Future[float]]] = []
        self.up_since = math.inf  # when the tunnel first carried a request

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.result != "ok":
            return
        for since, waiter in list(self._waiters):
            if outcome.started >= since and not waiter.done():
                waiter.set_result(outcome.ended)

    async def wait_ok_since(self, since: float) -> float:
        """When the first connection started at or after ``since`` ended ok."""
        for outcome in self.outcomes:
            if outcome.result == "ok" and outcome.started >= since:
                return outcome.ended
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        entry = (since, waiter)
        self._waiters.append(entry)
        try:
            return await waiter
        finally:
            self._waiters.remove(entry)

    def in_fault(self, outcome: Outcome) -> bool:
        """Whether the connection overlapped any fault's window (or the start-up)."""
        return outcome.started < self.up_since or any(
            outcome.started <= end and outcome.ended >= start
            for start, end in (fault.window for fault in self.faults)
        )


# --- the local service ---------------------------------------------------------------


class Service:
    """The service behind the tunnel, on 127.0.0.1; see the module docstring."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except Corrupt as exc:
            self.ledger.service_corrupt.append((now(), str(exc)))
            abort(writer)
        except OSError as exc:
            self.ledger.service_errors[f"service: {error_kind(exc)}"] += 1
            abort(writer)
        except asyncio.CancelledError:
            abort(writer)  # stopped at the end of the run; returning keeps 3.11 quiet
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await read_until(reader, HEADER.size)
        if len(header) < HEADER.size:
            raise Corrupt(f"service: clean end after {len(header)} bytes of the header")
        mode, seed, length = HEADER.unpack(header)
        if mode == b"E":
            checker = Checker(seed, length)
            while data := await reader.read(READ_SIZE):
                checker.feed(data)
                writer.write(data)
                await writer.drain()
            if verdict := checker.verdict():
                raise Corrupt(f"service, upload: {verdict}")
        else:
            for block in pattern(seed, length):
                writer.write(block)
                await writer.drain()
        writer.write_eof()
        await writer.drain()


async def read_until(reader: asyncio.StreamReader, size: int) -> bytes:
    """``size`` bytes, or fewer if the stream ended cleanly first."""
    data = b""
    while len(data) < size and (chunk := await reader.read(size - len(data))):
        data += chunk
    return data


def abort(writer: asyncio.StreamWriter) -> None:
    """End a connection with an RST, so the other side sees an error, never a clean end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return type(exc).__name__


# --- clients -------------------------------------------------------------------------


class Progress:
    """The hung-connection deadline: pushed back by every byte that moves,
    lifted while the connection is idle on purpose."""

    def __init__(self, deadline: asyncio.Timeout) -> None:
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()

    def moved(self) -> None:
        self._deadline.reschedule(self._loop.time() + HUNG_TIMEOUT)

    def idle(self) -> None:
        self._deadline.reschedule(None)


@dataclass
class Exchange:
    """What one client connection does: ``mode`` E or S, ``length`` bytes,
    after an idle time of ``idle`` seconds (cut short by ``wake``)."""

    traffic: str
    mode: bytes
    length: int
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    idle: float = 0.0


async def run_exchange(
    address: Address, exchange: Exchange, wake: asyncio.Event | None = None
) -> Outcome:
    """One client connection through the tunnel, classified."""
    outcome = Outcome(exchange.traffic, "ok", "", started=now(), ended=0.0)
    checker = Checker(exchange.seed, exchange.length)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(HUNG_TIMEOUT) as deadline:
            progress = Progress(deadline)
            reader, writer = await asyncio.open_connection(
                address.host, address.port, limit=READ_SIZE
            )
            writer.write(HEADER.pack(exchange.mode, exchange.seed, exchange.length))
            await writer.drain()
            if exchange.idle:
                progress.idle()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(exchange.idle):
                        await (wake or asyncio.Event()).wait()
                progress.moved()
            if exchange.mode == b"E":
                await echo(reader, writer, exchange, checker, progress, outcome)
            else:
                writer.write_eof()
                await receive_pattern(reader, checker, progress)
        if verdict := checker.verdict():
            raise Corrupt(verdict)
    except TimeoutError:
        outcome.result, outcome.error = "hung", f"no progress for {HUNG_TIMEOUT:g} s"
    except Corrupt as exc:
        outcome.result, outcome.error, outcome.detail = "corrupt", "corrupt", str(exc)
    except OSError as exc:
        outcome.result, outcome.error, outcome.detail = "reset", error_kind(exc), str(exc)
    finally:
        outcome.ended = now()
        outcome.received = checker.received
        if writer is not None:
            if outcome.result == "ok":
                writer.close()
            else:
                abort(writer)
    return outcome


async def echo(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    exchange: Exchange,
    checker: Checker,
    progress: Progress,
    outcome: Outcome,
) -> None:
    """Send the pattern and check its echo at once. An echo that ends before
    everything was sent is cut short (the checker says so); an error either
    way ends both."""
    sending = asyncio.ensure_future(send_pattern(writer, exchange, progress, outcome))
    receiving = asyncio.ensure_future(receive_pattern(reader, checker, progress))
    try:
        done, _ = await asyncio.wait({sending, receiving}, return_when=asyncio.FIRST_COMPLETED)
        if sending in done:
            sending.result()
            await receiving
        else:
            receiving.result()
    finally:
        for task in (sending, receiving):
            task.cancel()
        await asyncio.gather(sending, receiving, return_exceptions=True)


async def send_pattern(
    writer: asyncio.StreamWriter, exchange: Exchange, progress: Progress, outcome: Outcome
) -> None:
    for block in pattern(exchange.seed, exchange.length):
        writer.write(block)
        await writer.drain()
        outcome.sent += len(block)
        progress.moved()
    writer.write_eof()


async def receive_pattern(
    reader: asyncio.StreamReader, checker: Checker, progress: Progress
) -> None:
    """Read to the end of the stream, checking it."""
    while data := await reader.read(READ_SIZE):
        checker.feed(data)
        progress.moved()


# --- processes -------------------------------------------------------------------------


class SoakError(Exception):
    """The run cannot go on (a process that does not start, no port): a FAIL."""


@dataclass
class Snapshot:
    """A process's open descriptors and resident memory."""

    fds: int
    rss: int  # bytes

    @classmethod
    def of(cls, pid: int) -> Snapshot:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        status = Path(f"/proc/{pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return cls(fds, int(match.group(1)) * 1024 if match else 0)


@dataclass
class Process:
    """One run of ``tunnelgate gateway`` or ``tunnelgate agent``."""

    role: str
    number: int  # 1 for the first of its role, 2 after a restart, ...
    popen: subprocess.Popen[bytes]
    log: Path  # its stderr
    out: Path  # its stdout
    started: float
    baseline: Snapshot | None = None  # quiescent (the first) or warmed up (a restarted one)
    ended: float | None = None

    @property
    def name(self) -> str:
        return f"{self.role} #{self.number}"

    @property
    def exit(self) -> str:
        code = self.popen.poll()
        if code is None:
            return "running"
        return signal.Signals(-code).name if code < 0 else str(code)

    def snapshot(self) -> Snapshot:
        try:
            return Snapshot.of(self.popen.pid)
        except OSError:
            raise SoakError(f"{self.name} is not running ({self.exit}); see {self.log}") from None

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if still running after ``timeout``."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.popen.wait, timeout)
            if self.ended is None:
                self.ended = now()
        return self.popen.returncode

    def tracebacks(self) -> int:
        return sum(
            path.read_text(errors="replace").count("Traceback")
            for path in (self.log, self.out)
            if path.exists()
        )


class Processes:
    """The gateway and the agent: started, and started again, on the same ports."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        control, public = fixed_ports(2)
        self.control = Address("127.0.0.1", control)
        self.public = Address("127.0.0.1", public)
        self.state_dir = workdir / "state"
        self.token_file = workdir / "token"
        self.token_file.write_text(generate_token() + "\n")
        self.token_file.chmod(0o600)
        self.fingerprint = ""
        self.all: list[Process] = []
        self._env = {k: v for k, v in os.environ.items() if k != "TUNNELGATE_TOKEN"}
        self._env |= {"PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(workdir / "xdg")}

    def current(self, role: str) -> Process:
        return [p for p in self.all if p.role == role][-1]

    def _spawn(self, role: str, args: list[str]) -> Process:
        number = sum(p.role == role for p in self.all) + 1
        log = self.workdir / f"{role}-{number}.log"
        out = self.workdir / f"{role}-{number}.out"
        with log.open("wb") as err_file, out.open("wb") as out_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tunnelgate", role, *args],
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
                env=self._env,
            )
        process = Process(role, number, popen, log, out, now())
        self.all.append(process)
        return process

    async def start_gateway(self) -> Process:
        """A gateway that listens (its banner is out); its fingerprint read from the banner."""
        gateway = self._spawn(
            "gateway",
            [
                "--listen", str(self.control), "--state-dir", str(self.state_dir),
                "--token-file", str(self.token_file),
                "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
                "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT),
                "--pending-timeout", str(PENDING_TIMEOUT),
                "--drain-timeout", str(DRAIN_TIMEOUT),
            ],
        )  # fmt: skip
        banner = re.compile(r"^certificate fingerprint: (SHA256:[0-9A-F]{64})$", re.MULTILINE)
        found = await poll_until(
            lambda: banner.search(gateway.out.read_text()) or gateway.popen.poll() is not None,
            PROCESS_START + MARGIN,
        )
        match = banner.search(gateway.out.read_text())
        if not found or match is None:
            raise SoakError(f"{gateway.name} printed no banner ({gateway.exit}); see {gateway.log}")
        if self.fingerprint and match.group(1) != self.fingerprint:
            raise SoakError(f"{gateway.name} has another certificate: {match.group(1)}")
        self.fingerprint = match.group(1)
        return gateway

    def start_agent(self, gateway: str, service: Address) -> Process:
        return self._spawn(
            "agent",
            [
                "--gateway", gateway, "--name", "soak",
                "--token-file", str(self.token_file), "--fingerprint", self.fingerprint,
                "--expose", f"{self.public.port}:{service}",
                "--pool-size", str(POOL_SIZE), "--reconnect-max", str(RECONNECT_MAX),
                "--drain-timeout", str(DRAIN_TIMEOUT),
            ],
        )  # fmt: skip

    def kill_all(self) -> None:
        """Whatever still runs: killed and reaped (also after Ctrl-C)."""
        for process in self.all:
            with contextlib.suppress(OSError):
                process.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(EXIT_TIMEOUT)


def fixed_ports(count: int) -> list[int]:
    """Free ports below the kernel's ephemeral range, so that no client
    connection of another program takes one while a gateway restarts."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[int] = []
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise SoakError("no free port below the ephemeral range")


# --- the run ---------------------------------------------------------------------------

ROLES: Final = ("gateway", "agent")


class Soak:
    """One soak run: processes, proxy, service, traffic and faults."""

    def __init__(self, seconds: float, seed: int, kinds: list[str], workdir: Path) -> None:
        self.seconds = seconds
        self.seed = seed
        self.kinds = kinds
        self.workdir = workdir
        self.rng = random.Random(seed)  # faults only, so that --seed replays them
        self.traffic_rng = random.Random(seed + 1)
        self.ledger = Ledger()
        self.service = Service(self.ledger)
        self.processes = Processes(workdir)
        self._proxy: FaultProxy | None = None
        self.pooled_sizes: set[tuple[int, int]] = set()  # (up, down) bytes of a pooled channel
        self.flowing = asyncio.Event()  # cleared: clients open no new connection for a while
        self.flowing.set()
        self.failures: list[str] = []
        self.began = now()
        self.baselines: dict[str, Snapshot] = {}  # per role: its first process, quiescent
        self.finals: dict[str, Snapshot] = {}  # per role: its last process, at the end

    @property
    def proxy(self) -> FaultProxy:
        assert self._proxy is not None
        return self._proxy

    def say(self, text: str) -> None:
        print(f"[{now() - self.began:7.1f} s] {text}", flush=True)

    # --- phases

    async def run(self) -> bool:
        """The whole run; prints the table; True for PASS."""
        self.say(
            f"seed {self.seed}; {self.seconds:g} s of traffic and faults; logs in {self.workdir}"
        )
        try:
            await self.start()
            await self.warm_up()
            await self.main_phase()
            await self.settle()
            await self.stop_processes()
        except* SoakError as caught:
            self.failures += [f"the run could not go on: {exc}" for exc in caught.exceptions]
        finally:
            await self.aclose()
        self.failures += judge(self)
        print(report(self), flush=True)
        return not self.failures

    async def start(self) -> None:
        await self.service.start()
        await self.processes.start_gateway()
        self._proxy = FaultProxy(self.processes.control)
        await self.proxy.start()
        began = now()
        self.processes.start_agent(self.proxy.address, Address("127.0.0.1", self.service.port))
        await self.learn_pooled_sizes()
        done = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.probe_until(done))
            try:
                async with asyncio.timeout(PROCESS_START + MARGIN):
                    self.ledger.up_since = await self.ledger.wait_ok_since(began)
            except TimeoutError:
                raise SoakError("no request got through the new tunnel") from None
            finally:
                done.set()
        self.say(
            f"tunnel up in {self.ledger.up_since - began:.2f} s: gateway {self.processes.control} "
            f"({self.processes.fingerprint[:15]}...), proxy {self.proxy.address}, "
            f"service 127.0.0.1:{self.service.port} exposed at {self.processes.public}"
        )

    async def learn_pooled_sizes(self) -> None:
        """What a pooled data channel carries (its handshake), learnt from the
        first pool, before any client connects."""
        await poll_until(lambda: len(self.proxy.live("data")) >= POOL_SIZE, PROCESS_START + MARGIN)
        seen: set[tuple[int, int]] | None = None

        def handshakes_over() -> bool:  # no pooled channel's byte counts moved since last time
            nonlocal seen
            now_seen = {self.sizes(c) for c in self.proxy.live("data")}
            settled, seen = now_seen == seen, now_seen
            return settled

        await poll_until(handshakes_over, MARGIN)
        self.pooled_sizes = seen or set()

    async def warm_up(self) -> None:
        """Every kind of traffic for a while (pools, buffers and caches grow to
        their working size), then each process's quiescent baseline."""
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.traffic(stop, idle=(0.5, 2.0)))
            await asyncio.sleep(WARMUP_SECONDS)
            stop.set()
        steady = 0
        previous: dict[str, Snapshot] = {}
        deadline = now() + SETTLE_TIMEOUT
        while steady < 4 and now() < deadline:  # the same descriptors for 2 s
            await asyncio.sleep(0.5)
            snapshots = {role: self.processes.current(role).snapshot() for role in ROLES}
            same = previous and all(previous[r].fds == snapshots[r].fds for r in ROLES)
            steady = steady + 1 if same else 0
            previous = snapshots
        for role, snapshot in previous.items():
            self.baselines[role] = self.processes.current(role).baseline = snapshot
        self.say(
            "baseline after warm-up: "
            + ", ".join(f"{role} {s.fds} fds, {mib(s.rss)}" for role, s in previous.items())
        )

    async def main_phase(self) -> None:
        stop = asyncio.Event()
        until = now() + self.seconds
        async with asyncio.TaskGroup() as group:
            group.create_task(self.traffic(stop, IDLE_SECONDS))
            group.create_task(self.take_restart_baselines(stop))
            if await self.faults(until):  # else the tunnel is down for good: stop now
                await asyncio.sleep(max(0.0, until - now()))
            stop.set()
            self.say("traffic stopping: the last connections finish")

    async def take_restart_baselines(self, stop: asyncio.Event) -> None:
        """A restarted process's own baseline, once it has carried traffic for a while."""
        while not stop.is_set():
            for role in ROLES:
                process = self.processes.current(role)
                if process.baseline is None and now() - process.started >= RESTART_WARMUP:
                    with contextlib.suppress(SoakError):  # it died meanwhile
                        process.baseline = process.snapshot()
            await pause(stop, 1.0)

    async def settle(self) -> None:
        """The end state: each process's descriptors back near its baseline,
        or what they are after ``SETTLE_TIMEOUT``."""

        def settled() -> bool:
            self.finals = {role: self.processes.current(role).snapshot() for role in ROLES}
            return all(self.finals[r].fds <= self.baselines[r].fds + FD_TOLERANCE for r in ROLES)

        began = now()
        await poll_until(settled, SETTLE_TIMEOUT)
        self.say(f"traffic stopped; processes settled for {now() - began:.1f} s")

    async def stop_processes(self) -> None:
        """SIGTERM to the agent, then to the gateway: each must drain and exit 0."""
        for role in ("agent", "gateway"):
            process = self.processes.current(role)
            process.signal(signal.SIGTERM)
            code = await process.wait_exit(DRAIN_TIMEOUT + EXIT_TIMEOUT)
            if code != 0:
                self.failures.append(f"{process.name} did not stop cleanly on SIGTERM ({code})")

    async def aclose(self) -> None:
        """Everything stopped, whatever state the run is in."""
        self.processes.kill_all()
        if self._proxy is not None:
            await self._proxy.aclose()
        await self.service.aclose()

    # --- traffic

    async def traffic(self, stop: asyncio.Event, idle: tuple[float, float]) -> None:
        """All kinds of client connections at once, until ``stop``."""
        async with asyncio.TaskGroup() as group:
            for traffic, mode in (("bulk-up", b"E"), ("bulk-down", b"S")):
                for _ in range(BULK_WORKERS):
                    group.create_task(self.bulk_worker(traffic, mode, stop))
            for _ in range(SHORT_WORKERS):
                group.create_task(self.short_worker(stop))
            for _ in range(IDLE_CONNECTIONS):
                group.create_task(self.idle_worker(stop, idle))

    async def bulk_worker(self, traffic: str, mode: bytes, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.connect(Exchange(traffic, mode, self.traffic_rng.randint(*BULK_SIZES)))
            await pause(stop, self.traffic_rng.uniform(*BULK_PAUSE))

    async def short_worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.connect(Exchange("short", b"E", self.traffic_rng.randint(*SHORT_SIZES)))
            await pause(stop, self.traffic_rng.uniform(*SHORT_PAUSE))

    async def idle_worker(self, stop: asyncio.Event, idle: tuple[float, float]) -> None:
        while not stop.is_set():
            seconds = self.traffic_rng.uniform(*idle)
            await self.connect(Exchange("idle", b"E", IDLE_EXCHANGE, idle=seconds), stop)

    async def probe_until(self, done: asyncio.Event) -> None:
        """Small checked requests, several in flight, until ``done``."""
        in_flight: set[asyncio.Task[None]] = set()
        async with asyncio.TaskGroup() as group:
            while not done.is_set():
                if len(in_flight) < PROBES_IN_FLIGHT:
                    task = group.create_task(self.connect(Exchange("probe", b"E", PROBE_SIZE)))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                await pause(done, PROBE_INTERVAL)

    async def connect(self, exchange: Exchange, wake: asyncio.Event | None = None) -> None:
        """One client connection, recorded; after a failure, a pause before the next."""
        await self.flowing.wait()
        outcome = await run_exchange(self.processes.public, exchange, wake)
        self.ledger.record(outcome)
        if outcome.result != "ok":
            await asyncio.sleep(RETRY_PAUSE)

    # --- faults

    async def faults(self, until: float) -> bool:
        """One fault at a time, each followed by its recovery, until ``until``;
        False if the tunnel did not recover from one."""
        while True:
            await asyncio.sleep(self.rng.uniform(*FAULT_PAUSE))
            kind = self.rng.choice(self.kinds)
            # Each fault draws from its own generator, so the sequence of
            # faults replays the same whatever a fault does with its draws.
            params = random.Random(self.rng.getrandbits(64))
            if now() >= until:
                return True
            fault = Fault(kind, "", now())
            self.ledger.faults.append(fault)
            try:
                fault.detail = await FAULTS[kind](self, params)
            finally:
                # A fault that starts a process again ends when the new one is
                # spawned: its start-up counts toward the recovery.
                spawned = [p.started for p in self.processes.all if p.started >= fault.started]
                fault.ended = max(spawned, default=now())
            await self.recover(fault)
            self.proxy.forget_closed()
            bound = RECOVERY_BOUNDS[kind]
            if fault.recovery is None:
                self.failures.append(
                    f"{kind} at {fault.started - self.began:.1f} s ({fault.detail}): no checked "
                    f"request got through within {RECOVERY_GIVE_UP:g} s; the tunnel stayed down"
                )
                return False
            slow = fault.recovery > bound
            if slow:
                self.failures.append(
                    f"{kind} at {fault.started - self.began:.1f} s ({fault.detail}): "
                    f"recovery took {fault.recovery:.2f} s, bound {bound:g} s"
                )
            self.say(
                f"{kind:<16} at {fault.started - self.began:.1f} s: {fault.detail}; "
                f"recovered in {fault.recovery:.2f} s (bound {bound:g} s)"
                + ("  TOO SLOW" if slow else "")
            )

    async def recover(self, fault: Fault) -> None:
        """Probe until a checked request that started after the fault's end gets through."""
        done = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(self.probe_until(done))
            try:
                async with asyncio.timeout(RECOVERY_GIVE_UP):
                    fault.recovery = await self.ledger.wait_ok_since(fault.ended) - fault.ended
            except TimeoutError:
                fault.recovery = None
            finally:
                done.set()

    async def fault_control_reset(self, params: random.Random) -> str:
        count = await self.proxy.reset("control")
        return f"{count} control channel(s) reset"

    async def fault_control_cut(self, params: random.Random) -> str:
        direction: Direction = "up" if params.random() < 0.5 else "down"
        seconds = HEARTBEAT_TIMEOUT + params.uniform(0.5, 2.0)
        self.proxy.cut(direction, "control", existing=True, new=False)
        await asyncio.sleep(seconds)
        self.proxy.heal()
        return f"control channel cut {direction} for {seconds:.1f} s"

    async def fault_path_blackhole(self, params: random.Random) -> str:
        seconds = HEARTBEAT_TIMEOUT + params.uniform(0.5, 3.0)
        self.proxy.blackhole()
        await asyncio.sleep(seconds)
        self.proxy.restore()
        return f"whole path black-holed for {seconds:.1f} s"

    async def fault_data_reset(self, params: random.Random) -> str:
        live = self.proxy.live("data")
        share = params.choice([0.25, 0.5, 1.0])
        chosen = params.sample(live, max(1, round(len(live) * share))) if live else []
        count = await self.proxy.reset(connections=chosen)
        return f"{count} of {len(live)} data channel(s) reset"

    async def fault_data_blackhole(self, params: random.Random) -> str:
        """A lull in new connections, during which the paths of the pooled
        channels die silently (NAT mappings dropped); then the clients come back."""
        self.flowing.clear()
        try:
            quiet = await self.quiet_pooled_channels(POOL_CHECK_AGE + 1.0)
            # Only these: black-holing every data channel would hit busy ones too.
            self.proxy.blackhole(connections=quiet)
        finally:
            self.flowing.set()
        return f"{len(quiet)} pooled data channel(s) idle > {POOL_CHECK_AGE:g} s black-holed"

    async def quiet_pooled_channels(self, seconds: float) -> list[ProxiedConnection]:
        """The pooled data channels on which nothing moved for ``seconds``: the
        gateway pings these before use. (A younger one whose path alone goes
        silent may hang its client: docs/RELIABILITY.md does not guarantee
        that case, so the soak does not inject it.)"""
        before = {c.id: self.sizes(c) for c in self.proxy.live("data") if self.is_pooled(c)}
        await asyncio.sleep(seconds)
        return [c for c in self.proxy.live("data") if before.get(c.id) == self.sizes(c)]

    def is_pooled(self, conn: ProxiedConnection) -> bool:
        """Whether a data channel still waits in the pool: it carried its
        handshake and nothing else (a Start or a Ping would add to ``down_bytes``)."""
        return self.sizes(conn) in self.pooled_sizes

    @staticmethod
    def sizes(conn: ProxiedConnection) -> tuple[int, int]:
        return conn.up_bytes, conn.down_bytes

    async def fault_slow_path(self, params: random.Random) -> str:
        seconds = params.uniform(3.0, 8.0)
        kind: Kind | None = params.choice([None, "data", "control"])
        where = kind or "whole path"
        if params.random() < 0.5:
            delay = params.uniform(0.05, 0.8)
            self.proxy.delay(delay, kind)
            what = f"{where} delayed {delay * 1000:.0f} ms"
        else:
            rate = params.choice([16 << 10, 64 << 10, 256 << 10, 1 << 20])
            self.proxy.throttle(rate, kind)
            what = f"{where} throttled to {rate >> 10} KiB/s"
        await asyncio.sleep(seconds)
        self.proxy.heal()
        return f"{what} for {seconds:.1f} s"

    async def fault_data_close_after(self, params: random.Random) -> str:
        nbytes = params.choice([1 << 10, 8 << 10, 64 << 10, 512 << 10, 3 << 20])
        how: CloseHow = "fin" if params.random() < 0.5 else "rst"
        seconds = params.uniform(2.0, 6.0)
        self.proxy.close_after(nbytes, "data", how=how)
        await asyncio.sleep(seconds)
        self.proxy.heal()
        return f"data channels closed ({how}) after {nbytes} more bytes, for {seconds:.1f} s"

    async def fault_agent_kill(self, params: random.Random) -> str:
        agent = self.processes.current("agent")
        agent.signal(signal.SIGKILL)
        await agent.wait_exit(EXIT_TIMEOUT)
        self.processes.start_agent(self.proxy.address, Address("127.0.0.1", self.service.port))
        return f"{agent.name} SIGKILLed, started again"

    async def fault_agent_stop(self, params: random.Random) -> str:
        seconds = params.uniform(1.0, 6.0)
        agent = self.processes.current("agent")
        agent.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            agent.signal(signal.SIGCONT)
        return f"{agent.name} stopped (SIGSTOP) for {seconds:.1f} s"

    async def fault_gateway_term(self, params: random.Random) -> str:
        return await self.restart_gateway(signal.SIGTERM, DRAIN_TIMEOUT + EXIT_TIMEOUT)

    async def fault_gateway_kill(self, params: random.Random) -> str:
        return await self.restart_gateway(signal.SIGKILL, EXIT_TIMEOUT)

    async def restart_gateway(self, signum: signal.Signals, timeout: float) -> str:
        gateway = self.processes.current("gateway")
        gateway.signal(signum)
        code = await gateway.wait_exit(timeout)
        if signum == signal.SIGTERM and code != 0:
            self.failures.append(
                f"{gateway.name} did not exit 0 within {timeout:g} s of SIGTERM ({gateway.exit})"
            )
        if code is None:
            gateway.signal(signal.SIGKILL)
            await gateway.wait_exit(EXIT_TIMEOUT)
        await self.processes.start_gateway()
        return f"{gateway.name} {signum.name} ({gateway.exit}), started again"


FAULTS: Final[dict[str, Callable[[Soak, random.Random], Awaitable[str]]]] = {
    "control-reset": Soak.fault_control_reset,
    "control-cut": Soak.fault_control_cut,
    "path-blackhole": Soak.fault_path_blackhole,
    "data-reset": Soak.fault_data_reset,
    "data-close-after": Soak.fault_data_close_after,
    "data-blackhole": Soak.fault_data_blackhole,
    "slow-path": Soak.fault_slow_path,
    "agent-kill": Soak.fault_agent_kill,
    "agent-stop": Soak.fault_agent_stop,
    "gateway-term": Soak.fault_gateway_term,
    "gateway-kill": Soak.fault_gateway_kill,
}
assert list(FAULTS) == FAULT_KINDS


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


# --- the verdict -------------------------------------------------------------------------


def judge(soak: Soak) -> list[str]:
    """Why the run failed, beyond what it found while it ran (slow recoveries)."""
    failures = []
    ledger = soak.ledger
    for result in ("corrupt", "hung"):
        if bad := [o for o in ledger.outcomes if o.result == result]:
            failures.append(f"{len(bad)} {result} connection(s); first: {describe(bad[0], soak)}")
    if stray := [o for o in ledger.outcomes if o.result == "reset" and not ledger.in_fault(o)]:
        failures.append(
            f"{len(stray)} connection(s) reset outside every fault's window; "
            f"first: {describe(stray[0], soak)}"
        )
    if ledger.service_corrupt:
        at, what = ledger.service_corrupt[0]
        failures.append(
            f"{len(ledger.service_corrupt)} silent truncation(s) seen by the service; "
            f"first at {at - soak.began:.1f} s: {what}"
        )
    for role in ROLES:
        if role in soak.finals:
            failures += judge_resources(soak, soak.processes.current(role))
    for process in soak.processes.all:
        if count := process.tracebacks():
            failures.append(f"{process.name} logged {count} traceback(s): {process.log}")
    return failures


def judge_resources(soak: Soak, process: Process) -> list[str]:
    """Descriptors and memory of a process at the end, against its baselines.

    Descriptors follow from the configuration (listeners, control channel,
    pool), the same for every process of a role, so a restarted process is
    held to its role's quiescent count; memory depends on what the process
    carried, so it is held to its own baseline once it had warmed up.
    """
    final = soak.finals[process.role]
    base = soak.baselines[process.role]
    failures = []
    if final.fds > base.fds + FD_TOLERANCE:
        failures.append(
            f"{process.name}: {final.fds} descriptors after the traffic stopped and "
            f"{SETTLE_TIMEOUT:g} s to settle; quiescent baseline {base.fds} "
            f"(tolerance {FD_TOLERANCE})"
        )
    rss_base = process.baseline or base
    if final.rss > rss_base.rss + RSS_TOLERANCE:
        failures.append(
            f"{process.name}: RSS {mib(final.rss)} at the end, baseline {mib(rss_base.rss)} "
            f"(tolerance {mib(RSS_TOLERANCE)})"
        )
    return failures


def report(soak: Soak) -> str:
    outcomes = soak.ledger.outcomes
    sent = sum(o.sent for o in outcomes)
    received = sum(o.received for o in outcomes)
    lines = [
        "",
        f"=== tunnelgate soak: {'FAIL' if soak.failures else 'PASS'} ===",
        f"duration  {now() - soak.began:.1f} s ({soak.seconds:g} s of traffic and faults), "
        f"seed {soak.seed}",
        f"bytes     {mib(sent + received)} checked ({mib(sent)} up, {mib(received)} down)",
        "",
        connection_table(soak.ledger),
        "",
        fault_table(soak.ledger),
        "",
        error_table(soak.ledger),
        "",
        process_table(soak),
        "",
    ]
    if soak.failures:
        lines.append("FAIL:")
        lines += [f"  - {failure}" for failure in soak.failures]
        lines.append(f"seed {soak.seed}; logs kept in {soak.workdir}")
    else:
        lines.append("PASS")
    return "\n".join(lines)


def connection_table(ledger: Ledger) -> str:
    rows: list[tuple[str, ...]] = [
        ("connections", "total", "ok", "reset", "reset!", "corrupt", "hung", "bytes")
    ]
    for traffic in ("bulk-up", "bulk-down", "short", "idle", "probe", "all"):
        mine = [o for o in ledger.outcomes if traffic in ("all", o.traffic)]
        by = Counter(o.result for o in mine)
        stray = sum(o.result == "reset" and not ledger.in_fault(o) for o in mine)
        counts = [len(mine), by["ok"], by["reset"] - stray, stray, by["corrupt"], by["hung"]]
        rows.append((traffic, *map(str, counts), mib(sum(o.sent + o.received for o in mine))))
    return table(rows) + "\n(reset: in a fault's window; reset!: outside every window)"


def fault_table(ledger: Ledger) -> str:
    rows = [("faults", "count", "recovered", "max s", "p99 s", "bound s")]
    for kind in [*FAULT_KINDS, "all"]:
        mine = [f for f in ledger.faults if kind in ("all", f.kind)]
        if not mine and kind != "all":
            continue
        times = [f.recovery for f in mine if f.recovery is not None]
        rows.append(
            (
                kind, str(len(mine)), str(len(times)),
                f"{max(times):.2f}" if times else "-", f"{p99(times):.2f}" if times else "-",
                f"{RECOVERY_BOUNDS[kind]:g}" if kind in RECOVERY_BOUNDS else "",
            )
        )  # fmt: skip
    return table(rows)


def error_table(ledger: Ledger) -> str:
    errors = Counter(o.error for o in ledger.outcomes if o.result != "ok")
    errors.update(ledger.service_errors)
    errors["service: silent truncation"] += len(ledger.service_corrupt)
    rows: list[tuple[str, ...]] = [("errors by kind", "count")]
    rows += [(kind, str(count)) for kind, count in errors.most_common() if count]
    return table(rows if len(rows) > 1 else [*rows, ("(none)", "0")])


def process_table(soak: Soak) -> str:
    rows = [("process", "ran s", "exit", "fds start", "end", "RSS start", "end")]
    for process in soak.processes.all:
        last = process is soak.processes.current(process.role)
        final = soak.finals.get(process.role) if last else None
        base = process.baseline
        rows.append(
            (
                process.name,
                f"{(process.ended or now()) - process.started:.0f}",
                process.exit,
                str(base.fds) if base else "-",
                str(final.fds) if final else "-",
                mib(base.rss) if base else "-",
                mib(final.rss) if final else "-",
            )
        )
    return table(rows) + (
        f"\n(fds start: the quiescent baseline after warm-up, or {RESTART_WARMUP:g} s after a "
        f"restart; tolerance {FD_TOLERANCE} fds, {mib(RSS_TOLERANCE)})"
    )


def p99(values: list[float]) -> float:
    """The nearest-rank 99th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def describe(outcome: Outcome, soak: Soak) -> str:
    return (
        f"{outcome.traffic} connection from {outcome.started - soak.began:.1f} s to "
        f"{outcome.ended - soak.began:.1f} s: {outcome.error}"
        + (f" ({outcome.detail})" if outcome.detail else "")
        + f", {outcome.sent} bytes sent, {outcome.received} received"
    )


# --- the command -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "300")),
        help="how long traffic and faults run (default: $SOAK_SECONDS, else 300)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help="replay the faults of an earlier run")
    parser.add_argument(
        "--faults", type=fault_kinds, default=FAULT_KINDS, metavar="KIND,...",
        help="only these kinds of fault (default: all): " + ", ".join(FAULT_KINDS),
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the logs after a PASS too")
    return parser.parse_args(argv)


def fault_kinds(text: str) -> list[str]:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not kinds or set(kinds) - set(FAULT_KINDS):
        raise argparse.ArgumentTypeError(f"not fault kinds: {text!r}")
    return kinds


async def soak_until_stopped(soak: Soak) -> bool:
    """The run; SIGTERM stops it as Ctrl-C does (asyncio.run handles SIGINT)."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await soak.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    workdir = Path(tempfile.mkdtemp(prefix="tunnelgate-soak-"))
    soak = Soak(args.seconds, seed, args.faults, workdir)
    try:
        passed = asyncio.run(soak_until_stopped(soak))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"\ninterrupted; seed {seed}; logs kept in {workdir}", file=sys.stderr)
        return 130
    except BaseException:
        print(f"\nthe soak run broke; seed {seed}; logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        soak.processes.kill_all()  # even if the loop died before its own cleanup
    if passed and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
