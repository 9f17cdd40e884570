"""The clients of the bench: iperf3 runs, round trips, connection rate, idle connections;
and the start-up of the ``tunnelgate`` command.

Each measurement is a plain function that takes the public address of a
candidate and returns a dict of figures (JSON-ready). The Python clients run
on uvloop with asyncio Protocols, the same code for every candidate, so their
overhead is the same in every row and the ratios stay fair. Every step has a
deadline; a failure raises ``BenchError`` (or is counted, for the connection
rate and the idle connections).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import uvloop
from system import BenchError, Proc, Settle, free_port, listening, wait_until

HOST = "127.0.0.1"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class EchoFailed(ConnectionError):
    """The echo did not come back: the connection ended (and how), or other bytes came."""


def describe(exc: BaseException) -> str:
    """A short text for an error: "timeout", the message of our own errors, or "Type: message"."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, BenchError | EchoFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- readiness -----------------------------------------------------------------------------


def echo_once(port: int, timeout: float = 2.0) -> None:
    """One full round trip through ``port`` (raises OSError if it fails)."""
    payload = b"ready?\n"
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(len(payload) - len(got))
            if not chunk:
                raise OSError("closed before the echo came back")
            got += chunk
    if got != payload:
        raise OSError(f"echo mismatch: {got!r}")


def wait_echo(port: int, timeout: float, alive: Callable[[], str | None]) -> None:
    """Wait until a round trip through ``port`` works; ``alive()`` returns why the
    candidate is gone (then stop waiting) or None."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        gone = alive()
        if gone:
            raise BenchError(gone)
        try:
            echo_once(port)
            return
        except OSError as exc:
            last = describe(exc)
        time.sleep(0.1)
    raise BenchError(f"no echo through port {port} within {timeout:g} s (last: {last})")


# -- bulk throughput: iperf3 -----------------------------------------------------------------


def iperf3(
    iperf: str,
    public_port: int,
    server_port: int,
    *,
    seconds: float,
    streams: int,
    reverse: bool,
    logdir: Path,
) -> dict[str, Any]:
    """One iperf3 test through ``public_port``; the server (``iperf3 -s -1``, one test,
    then it exits) is started fresh on ``server_port`` and must be listening first.

    Readiness is read from the socket table: a probe connection would count as
    the server's one test (or make it answer "busy").
    """
    name = f"iperf3-server-{server_port}"
    server = Proc(name, [iperf, "-s", "-1", "-B", HOST, "-p", str(server_port)], logdir)
    try:
        wait_until(f"iperf3 -s on port {server_port}", lambda: listening(server_port), 10)
        argv = [iperf, "-c", HOST, "-p", str(public_port), "-t", f"{seconds:g}", "-J"]
        argv += ["-P", str(streams), "--connect-timeout", "5000"]
        if reverse:
            argv.append("-R")
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=seconds + 30, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"iperf3 client did not finish within {seconds + 30:g} s") from exc
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise BenchError(
                f"iperf3 gave no JSON (exit {done.returncode}): {done.stderr.strip()[:300]}"
            ) from exc
        if "error" in report:
            raise BenchError(f"iperf3: {report['error']}")
        received = report["end"]["sum_received"]
        sent = report["end"].get("sum_sent", {})
        return {
            "gbit_s": received["bits_per_second"] / 1e9,
            "bytes": received["bytes"],
            "seconds": received["seconds"],
            "retransmits": sent.get("retransmits"),
        }
    finally:
        server.stop(timeout=2.0)


# -- the asyncio client ----------------------------------------------------------------------


class EchoClient(asyncio.Protocol):
    """A client connection that sends a payload and waits for it to come back."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.want = 0
        self.waiter: asyncio.Future[None] | None = None
        self.closed: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and len(self.buffer) >= self.want and not self.waiter.done():
            self.waiter.set_result(None)

    def eof_received(self) -> bool:
        self._lost("closed by peer (EOF)")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(describe(exc) if exc else "closed by peer")

    def _lost(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(EchoFailed(why))

    async def echo(self, payload: bytes) -> None:
        """Send ``payload`` and wait until the same bytes came back."""
        if self.closed is not None or self.transport is None:
            raise EchoFailed(self.closed or "not connected")
        self.buffer.clear()
        self.want = len(payload)
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        await self.waiter
        if self.buffer != payload:
            raise EchoFailed(f"echo mismatch ({len(self.buffer)} bytes)")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


IP_BIND_ADDRESS_NO_PORT = 24  # from <linux/in.h>; the socket module does not name it


async def _connect(port: int, source: str | None = None) -> EchoClient:
    """Connect to ``HOST:port``; from loopback address ``source`` if given.

    The connection-rate workers each use their own source address: one
    (source, destination) pair has only ~28k ephemeral ports, and once most of
    them sit in TIME_WAIT the kernel's port search stalls connect() for tens
    of milliseconds, which would show up as the tunnel's p99.
    """
    loop = asyncio.get_running_loop()
    if source is None:
        _, client = await loop.create_connection(EchoClient, HOST, port)
        return client
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # port chosen at connect
        sock.bind((source, 0))
        await loop.sock_connect(sock, (HOST, port))
        _, client = await loop.create_connection(EchoClient, sock=sock)
    except BaseException:
        sock.close()
        raise
    return client


def run(coro: Any) -> Any:
    """Run one client measurement on a fresh uvloop event loop."""
    return uvloop.run(coro)


# -- request/response latency ----------------------------------------------------------------


async def _round_trips(port: int, count: int, size: int, timeout: float) -> dict[str, Any]:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    async with asyncio.timeout(timeout):
        client = await _connect(port)
        try:
            for _ in range(min(100, count)):  # warm-up, not counted
                await client.echo(payload)
            samples: list[float] = []
            clock = time.perf_counter_ns
            for _ in range(count):
                start = clock()
                await client.echo(payload)
                samples.append((clock() - start) / 1000)
        finally:
            client.close()
    ordered = sorted(samples)
    return {
        "p50_us": percentile(ordered, 50),
        "p99_us": percentile(ordered, 99),
        "max_us": ordered[-1],
        "count": count,
        "samples_us": [round(s, 1) for s in samples],
    }


def round_trips(port: int, count: int, size: int = 64, timeout: float = 60.0) -> dict[str, Any]:
    """``count`` sequential round trips of ``size`` bytes on one connection."""
    result: dict[str, Any] = run(_round_trips(port, count, size, timeout))
    return result


# -- connection rate -------------------------------------------------------------------------


async def _connection_rate(port: int, workers: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    payload = b"0123456789abcdef"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop_at = loop.time() + seconds

    async def worker(source: str) -> None:
        while loop.time() < stop_at:
            start = time.perf_counter()
            client: EchoClient | None = None
            try:
                async with asyncio.timeout(10):
                    client = await _connect(port, source)
                    await client.echo(payload)
                latencies.append(time.perf_counter() - start)
            except (OSError, TimeoutError) as exc:
                errors[describe(exc)] += 1
                await asyncio.sleep(0.01)  # do not spin on a refusing port
            finally:
                if client is not None:
                    client.close()

    began = time.perf_counter()
    async with asyncio.timeout(seconds + 30):
        await asyncio.gather(*(worker(f"127.0.0.{10 + i}") for i in range(workers)))
    elapsed = time.perf_counter() - began
    await asyncio.sleep(0.1)  # let the last closes go out
    ordered = sorted(latencies)
    return {
        "per_s": len(latencies) / elapsed,
        "connections": len(latencies),
        "seconds": elapsed,
        "p50_ms": percentile(ordered, 50) * 1000 if ordered else None,
        "p99_ms": percentile(ordered, 99) * 1000 if ordered else None,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(10)),
    }


def connection_rate(port: int, workers: int = 32, seconds: float = 3.0) -> dict[str, Any]:
    """``workers`` loops of connect, send 16 bytes, read the echo, close; worker i
    connects from 127.0.0.(10+i)."""
    result: dict[str, Any] = run(_connection_rate(port, workers, seconds))
    return result


# -- many idle connections -------------------------------------------------------------------


async def _idle(
    port: int, count: int, rss: Callable[[], int], concurrency: int, timeout: float
) -> dict[str, Any]:
    payload = b"still there? ..."
    clients: list[EchoClient] = []
    open_errors: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)

    async def open_one() -> None:
        async with gate:
            client: EchoClient | None = None
            try:
                async with asyncio.timeout(15):
                    client = await _connect(port)
                    await client.echo(payload)  # established end to end before it counts
                clients.append(client)
            except (OSError, TimeoutError) as exc:
                open_errors[describe(exc)] += 1
                if client is not None:
                    client.close()

    async def echo_again(client: EchoClient) -> bool:
        async with gate:
            try:
                async with asyncio.timeout(15):
                    await client.echo(payload)
                return True
            except (OSError, TimeoutError) as exc:
                echo_errors[describe(exc)] += 1
                return False

    echo_errors: Counter[str] = Counter()
    try:
        began = time.perf_counter()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(open_one() for _ in range(count)))
        open_seconds = time.perf_counter() - began

        settle = Settle()  # let the tunnel's memory settle, then read it
        for _ in range(int(settle.timeout / settle.every)):
            if settle.add(rss()):
                break
            await asyncio.sleep(settle.every)
        rss_loaded = settle.samples[-1]

        async with asyncio.timeout(timeout):
            results = await asyncio.gather(*(echo_again(c) for c in clients))
        dropped = sum(1 for c in clients if c.closed is not None)
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.2)
    return {
        "wanted": count,
        "held": len(clients),
        "echoing": sum(results),
        "dropped_meanwhile": dropped,
        "open_seconds": open_seconds,
        "rss_loaded_kib": rss_loaded,
        "rss_samples_kib": settle.samples,
        "open_errors": dict(open_errors.most_common(10)),
        "echo_errors": dict(echo_errors.most_common(10)),
    }


def idle_connections(
    port: int,
    count: int,
    rss: Callable[[], int],
    concurrency: int = 64,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Open ``count`` connections (``concurrency`` at a time), one echo each; read the
    RSS once settled (``rss()``); then every connection must echo again.

    ``concurrency`` stays below the smallest listen backlog among the candidates
    (sshd listens with 128 for forwarded ports): a full accept queue drops SYNs,
    and the retransmits (1 s, 3 s, 7 s, …) would be counted against the tunnel.
    """
    result: dict[str, Any] = run(_idle(port, count, rss, concurrency, timeout))
    return result


# -- start-up --------------------------------------------------------------------------------


def startup(
    version: list[str],
    gateway: Callable[[int], list[str]],
    env: dict[str, str],
    runs: int,
    logdir: Path,
) -> dict[str, Any]:
    """Wall times in ms: ``version`` (a command that prints and exits) ``runs`` times,
    then a gateway (``gateway(port)``, its argv) from spawn until its control port
    accepts a connection: a first start, which makes its token and certificate in a
    fresh state directory, then ``runs`` starts that find them there. Each gateway
    is stopped as soon as it accepted."""
    version_ms = []
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run(version, capture_output=True, env=env, timeout=30, check=False)
        version_ms.append((time.perf_counter() - began) * 1000)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(version)} exited with {done.returncode}")
    gateway_ms = [_until_accepting(gateway, env, logdir) for _ in range(runs + 1)]
    return {
        "version_ms": version_ms,
        "version_p50_ms": statistics.median(version_ms),
        "gateway_first_ms": gateway_ms[0],
        "gateway_ms": gateway_ms[1:],
        "gateway_p50_ms": statistics.median(gateway_ms[1:]),
    }


def _until_accepting(
    gateway: Callable[[int], list[str]], env: dict[str, str], logdir: Path
) -> float:
    port = free_port()
    began = time.perf_counter()
    proc = Proc(f"startup-gateway-{port}", gateway(port), logdir, env)
    try:
        deadline = began + 30
        while True:
            try:
                socket.create_connection((HOST, port), timeout=5).close()
                return (time.perf_counter() - began) * 1000
            except ConnectionRefusedError:
                if not proc.alive():
                    raise BenchError(proc.died()) from None
                if time.perf_counter() > deadline:
                    raise BenchError(f"the gateway did not listen on port {port} in 30 s") from None
                time.sleep(0.001)
    finally:
        proc.stop()
