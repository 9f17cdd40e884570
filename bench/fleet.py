"""Fleet benchmark: ``.venv/bin/python bench/fleet.py --help``.

A fleet of gateways on one Redis that forward clients to each other (``fleet_listen``), through
the real CLI on loopback, with a throwaway ``redis-server`` and the fleet's own CA made here
(trustme). Two questions:

1. What one forwarding hop costs. Gateway one (127.0.0.1) holds an agent that exposes the echo
   service and an iperf3 server; gateway two (127.0.0.2) listens on the same port numbers and
   carries each client to gateway one over a link of its own (TCP, mutual TLS 1.3 with
   certificates of the fleet's CA). The same clients measure three paths, in turn:

       service      the echo service and iperf3 themselves, no tunnel (the limit)
       direct       127.0.0.1:PORT: gateway one, the agent's tunnel
       forwarded    127.0.0.2:PORT: gateway two, the link to gateway one, the same tunnel

       throughput        iperf3 -c, 1 stream, client to service, SECONDS
       round trip        ROUND_TRIPS sequential 64-byte echoes on one connection: p50, p99
       connection rate   CLIENTS processes of LOOPS loops: connect, echo 16 bytes, close

   once with TLS between agent and gateway (the default) and once with ``--no-tls``; the link
   between the gateways is mutual TLS in both. Rounds alternate the order of the paths. The
   CPU time of gateway one, gateway two and the agent (from /proc) gives what a connection and
   a GB cost each of them on each path. Each gateway's ``/metrics`` (admin listener) counts
   the clients it forwarded and took: the report shows that every client of gateway two went
   over the link and none failed. The tunnel's processes log at warning, as in bench.py (no
   line per client), so the public ports are chosen here. An iperf3 client that has not
   finished 10 s after its test counts as stalled: the report says how many, and its medians
   leave them out.

2. What the fleet costs in Redis. GATEWAYS gateways (127.0.0.1, .2, .3, …) in one fleet, then
   AGENTS agents spread over them, each exposing the echo service on a port its gateway picks,
   which every other gateway then forwards. Two counts, the bench's own INFO left out:
   requests, the commands the gateways send (``redis-cli MONITOR``, which tells them from the
   commands a script runs: a script is one request), and commands, all that Redis runs
   (``INFO commandstats``, a script's own commands too):

       background   per second, of the gateways alone, over BASE seconds
       per agent    from just before an agent starts until its port answers on every gateway
                    (the agents start one after another): the median over the agents leaves
                    out the windows a renewal fell in
       at rest      per second over REST seconds, every agent connected: per gateway (the
                    background) and, beyond it, per agent
       per client   while CONNECTIONS clients connect through forwarded ports, started evenly
                    over CLIENT_PERIODS renewal periods, less what the at-rest rate predicts
                    for that time: Redis is on no client's path

   The lease stays at tunnelgate's default (``fleet_lease = 15``, ``--lease``), so that the
   at-rest figure is the real one: each gateway renews every third of it (5 s). A gateway also
   reads every lease again now and then (``RESYNC_INTERVAL`` of tunnelgate.gateway.fleet, which
   the report names): a window shorter than that may or may not hold one.

Tracebacks, errors and warnings in the tunnelgate logs are reported (but those of ``--no-tls``
and of iperf3's data streams, which its server resets), and those logs are copied to
``bench/results/fleet-logs/``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import measure
import system
from candidates import READY_TIMEOUT, REPO, TUNNELGATE, EchoService, tunnelgate_env
from system import BenchError, Proc
from workers import cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results"
HOSTS = tuple(f"127.0.0.{i}" for i in range(1, 9))  # gateway i listens on HOSTS[i]
CLIENT_SOURCES = 10  # connection-rate clients connect from 127.0.0.10 and up
MODES = ("tls", "notls")
PATHS = ("service", "direct", "forwarded")
EXPOSED = re.compile(r"^(\S+) .*exposed at gateway port (\d+) \(\S+\) -> \S+:(\d+)$", re.M)
FORWARDED = re.compile(r'^tunnelgate_fleet_forwarded_clients_total\{way="(\w+)"\} (\S+)$', re.M)
PROBLEM = re.compile(r"^\S+ (ERROR|WARNING|CRITICAL) |Traceback")  # a text log's line
# Warnings every run gives: --no-tls, and iperf3's server, which resets its data stream at the
# end of every test (a client's end, as the gateway and the agent log it).
EXPECTED = re.compile(r"TLS is OFF|closed client=.* end=(aborted by peer: )?service connection "
                      r"reset by peer$")  # fmt: skip
OWN_COMMANDS = {"info"}  # what the bench itself sends Redis
QUICK = {
    "rounds": 1, "seconds": 1.5, "round_trips": 1000, "gateways": 2, "agents": 6, "base": 5.0,
    "rest": 10.0, "connections": 200, "client_periods": 1,
}  # fmt: skip


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="What a forwarding hop between a fleet's gateways costs, and what the "
        "fleet costs in Redis.",
    )
    parser.add_argument("--skip", default="", help="parts to leave out: hop, redis (none)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="agent-gateway link of the hop part: tls, notls (both)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2, help="hop rounds per mode (2)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="seconds of iperf3 and of connections, per path (4)")  # fmt: skip
    parser.add_argument("--round-trips", type=int, default=5000,
                        help="64-byte round trips per path (5000)")  # fmt: skip
    parser.add_argument("--clients", type=int, default=2, help="connection-rate processes (2)")
    parser.add_argument("--loops", type=int, default=16, help="connection loops per client (16)")
    parser.add_argument("--gateways", type=int, default=3, help="gateways of the fleet (3)")
    parser.add_argument("--agents", type=int, default=30, help="agents of the fleet (30)")
    parser.add_argument("--base", type=float, default=15.0,
                        help="seconds of the gateways alone, for the background (15)")  # fmt: skip
    parser.add_argument("--rest", type=float, default=60.0,
                        help="seconds at rest with every agent connected (60)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=1000,
                        help="clients through forwarded ports, at the end (1000)")  # fmt: skip
    parser.add_argument("--client-periods", type=int, default=2,
                        help="renewal periods (lease / 3) to spread them over (2)")  # fmt: skip
    parser.add_argument("--lease", type=float, default=15.0,
                        help="fleet_lease of every gateway (15, tunnelgate's default)")  # fmt: skip
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning"),
                        help="the gateways' (warning: no line per client)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round of 1.5 s; 2 gateways, 6 agents")  # fmt: skip
    parser.add_argument("--json", type=Path, default=RESULTS / "fleet-latest.json",
                        help="raw data of the run (the text goes next to it as .md)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.skip = {part for part in args.skip.split(",") if part}
    args.modes = [mode for mode in args.modes.split(",") if mode]
    if not args.skip <= {"hop", "redis"} or not set(args.modes) <= set(MODES):
        parser.error("--skip takes hop, redis; --modes takes tls, notls")
    if min(args.rounds, args.clients, args.loops, args.agents, args.round_trips,
           args.connections, args.client_periods) < 1:  # fmt: skip
        parser.error("--rounds, --clients, --loops, --agents, --round-trips, --connections and "
                     "--client-periods must be at least 1")  # fmt: skip
    if not 2 <= args.gateways <= len(HOSTS):
        parser.error(f"--gateways must be 2 to {len(HOSTS)}")
    return args


# -- Redis ----------------------------------------------------------------------------------


def below_ephemeral() -> range:
    """Ports the kernel never hands out by itself (for port 0 or a connect)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return range(max(1024, low - 12000), low)


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, without persistence. It cannot listen on port
    0: it is offered ports below the ephemeral range until it takes one."""

    def __init__(self, workdir: Path) -> None:
        server, self.cli = system.which("redis-server"), system.which("redis-cli")
        if server is None or self.cli is None:
            raise BenchError("redis-server or redis-cli not found: apt-get install redis-server")
        for port in random.sample(below_ephemeral(), 8):
            proc = Proc(
                f"redis-{port}",
                [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(workdir)],
                workdir,
            )  # fmt: skip
            system.wait_until(
                f"redis-server on port {port}",
                lambda proc=proc: not proc.alive() or "Ready to accept" in proc.stdout(),  # type: ignore[misc]
                10,
            )
            if proc.alive():
                self.proc, self.port, self.asked = proc, port, 0
                self.monitor: Monitor | None = None
                return
            if "already in use" not in proc.stdout():
                raise BenchError(proc.died() + "\n" + proc.stdout()[-500:])
            proc.stop()
        raise BenchError("redis-server found no free port among 8 tried")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def info(self) -> Snapshot:
        """Its counters now: commands run by name (``commandstats``, a script's own commands
        too; the bench's INFO left out), connections, keys, memory."""
        done = subprocess.run(
            [str(self.cli), "-p", str(self.port), "INFO", "commandstats", "clients", "keyspace",
             "memory"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"redis-cli INFO: {done.stderr.strip() or done.stdout.strip()}")
        snapshot = Snapshot(self, time.monotonic(), self.asked)
        self.asked += 1
        for line in done.stdout.splitlines():
            name, _, value = line.strip().partition(":")
            if name.startswith("cmdstat_") and (command := name[8:]) not in OWN_COMMANDS:
                snapshot.commands[command] = int(value.split("calls=")[1].split(",")[0])
            elif name == "connected_clients":
                snapshot.clients = int(value)
            elif name == "used_memory":
                snapshot.memory = int(value)
            elif name == "db0":
                snapshot.keys = int(value.split("keys=")[1].split(",")[0])
        return snapshot

    def watch(self, workdir: Path) -> None:
        """Start ``redis-cli MONITOR`` (before the first INFO): which commands came from a
        client and which from inside a script, in order, between the bench's INFOs."""
        assert self.asked == 0, "watch() before the first info()"
        self.monitor = Monitor([str(self.cli), "-p", str(self.port), "MONITOR"], workdir)

    def cpu_s(self) -> float:
        return cpu_seconds([self.proc.pid])


MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ (\S+)\] "([^"]*)"')


class Monitor:
    """The lines of ``redis-cli MONITOR``: ``TIME [DB SOURCE] "COMMAND" ...``, where SOURCE is
    ``lua`` for a command a script ran."""

    def __init__(self, argv: list[str], workdir: Path) -> None:
        self.proc = Proc("redis-monitor", argv, workdir)
        system.wait_until("redis-cli MONITOR", lambda: "OK" in self.proc.stdout(), 10)
        self.entries: list[tuple[bool, str]] = []  # (run by a script, command), in order
        self.infos: list[int] = []  # where each of the bench's INFO came, in entries
        self._offset = 0

    def _read(self) -> None:
        with self.proc.stdout_path.open("rb") as file:
            file.seek(self._offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if (found := MONITOR_LINE.match(line)) is None:
                continue
            source, command = found.group(1), found.group(2).lower()
            if command in OWN_COMMANDS:
                self.infos.append(len(self.entries))
            else:
                self.entries.append((source == "lua", command))

    def between(self, first: int, second: int) -> tuple[Counter[str], Counter[str]]:
        """The commands between the bench's INFO number ``first`` and ``second``: those sent by
        clients, those scripts ran."""

        def seen() -> bool:
            self._read()
            return len(self.infos) > second

        system.wait_until("MONITOR to show the bench's INFO", seen, 10, every=0.01)
        window = self.entries[self.infos[first] : self.infos[second]]
        sent = Counter(command for lua, command in window if not lua)
        return sent, Counter(command for lua, command in window if lua)


@dataclass
class Snapshot:
    """Redis' counters at one moment."""

    server: RedisServer
    at: float
    index: int  # of its INFO among the bench's
    commands: Counter[str] = field(default_factory=Counter)
    clients: int = 0
    keys: int = 0
    memory: int = 0

    def since(self, before: Snapshot) -> Delta:
        assert self.server.monitor is not None, "watch() first"
        sent, scripted = self.server.monitor.between(before.index, self.index)
        return Delta(self.at - before.at, sent, scripted, self.commands - before.commands)


@dataclass
class Delta:
    """What Redis did between two snapshots (the bench's INFO left out)."""

    seconds: float
    sent: Counter[str]  # requests: the commands the gateways sent (a script is one), by name
    scripted: Counter[str]  # the commands their scripts ran
    commands: Counter[str]  # commandstats: every command run, by name (the sum of both)

    @property
    def requests(self) -> int:
        return sum(self.sent.values())

    @property
    def total(self) -> int:
        """Commands run, a script's own commands too."""
        return sum(self.commands.values())

    def plain(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "requests": self.requests, "total": self.total,
                "sent": dict(self.sent), "scripted": dict(self.scripted),
                "commands": dict(self.commands)}  # fmt: skip


# -- the fleet ------------------------------------------------------------------------------


def fleet_certificates(workdir: Path, nodes: list[str]) -> dict[str, str]:
    """The fleet's own CA and a certificate for each node; the TOML lines of each."""
    try:
        import trustme
    except ImportError as exc:
        raise BenchError("trustme not installed: run `make` (it is in the dev extra)") from exc
    certs = workdir / "certs"
    certs.mkdir(exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(certs / "ca.crt"))
    lines = {}
    for node in nodes:
        issued = ca.issue_cert(f"{node}.fleet.bench")
        issued.cert_chain_pems[0].write_to_path(str(certs / f"{node}.crt"))
        issued.private_key_pem.write_to_path(str(certs / f"{node}.key"))
        lines[node] = (
            f'fleet_ca = "{certs / "ca.crt"}"\nfleet_cert = "{certs / node}.crt"\n'
            f'fleet_key = "{certs / node}.key"\n'
        )
    return lines


class Gateway:
    """One gateway of the fleet, through the CLI: control port and services on ``host``, its
    gateway-to-gateway port on ``host`` too, an admin listener (for /metrics) on 127.0.0.1."""

    def __init__(self, workdir: Path, node: str, host: str, redis: RedisServer, fleet: str,
                 certificates: str, tls: bool, lease: float, log_level: str) -> None:  # fmt: skip
        self.node, self.host, self.tls = node, host, tls
        config = workdir / f"{node}.toml"
        config.write_text(
            f'fleet = "{redis.url}"\nfleet_name = "{fleet}"\nfleet_node = "{node}"\n'
            f'fleet_lease = {lease:g}\nfleet_listen = "{host}:0"\n' + certificates
        )
        plain = [] if tls else ["--no-tls"]
        self.proc = Proc(
            f"gateway-{node}",
            [str(TUNNELGATE), "gateway", "--listen", f"{host}:0", "--config", str(config),
             "--state-dir", str(workdir / f"state-{node}"), "--admin", "127.0.0.1:0",
             "--log-level", log_level, *plain],
            workdir, tunnelgate_env(),
        )  # fmt: skip

    def ready(self) -> None:
        """Wait for the banner (printed once the gateway is in the fleet and forwards)."""

        def banner() -> bool:
            if not self.proc.alive():
                raise BenchError(self.proc.died())
            return "run an agent with:" in self.proc.stdout()

        system.wait_until(f"gateway {self.node}'s banner", banner, READY_TIMEOUT)
        text = self.proc.stdout()
        port = re.search(r"listening on \S*:(\d+)", text)
        admin = re.search(r"admin: (http://\S+)", text)
        if port is None or admin is None:
            raise BenchError(f"no control port or admin address in the banner:\n{text}")
        self.port, self.admin = int(port.group(1)), admin.group(1)
        self.trust = ["--no-tls"]
        if self.tls:
            fingerprint = re.search(r"certificate fingerprint: (SHA256:[0-9A-F]+)", text)
            if fingerprint is None:
                raise BenchError(f"no fingerprint in the gateway's banner:\n{text}")
            self.trust = ["--fingerprint", fingerprint.group(1)]

    def forwarded(self) -> Counter[str]:
        """Its clients carried between gateways so far (out, in, failed, refused): /metrics,
        which reads no Redis."""
        with urllib.request.urlopen(self.admin + "metrics", timeout=10) as answer:
            text = answer.read().decode()
        return Counter({way: int(float(n)) for way, n in FORWARDED.findall(text)})


def start_fleet(workdir: Path, redis: RedisServer, fleet: str, count: int, tls: bool,
                args: argparse.Namespace, procs: list[Proc]) -> list[Gateway]:  # fmt: skip
    """``count`` gateways gw1, gw2, … on 127.0.0.1, .2, …; each process goes to ``procs`` as
    soon as it started."""
    nodes = [f"gw{i + 1}" for i in range(count)]
    certificates = fleet_certificates(workdir, nodes)
    gateways: list[Gateway] = []
    for i, node in enumerate(nodes):
        gateways.append(Gateway(workdir, node, HOSTS[i], redis, fleet, certificates[node], tls,
                                args.lease, args.log_level))  # fmt: skip
        procs.append(gateways[-1].proc)
    for gateway in gateways:
        gateway.ready()
    return gateways


def start_agent(workdir: Path, name: str, gateway: Gateway, services: list[tuple[int, int]],
                log_level: str = "info") -> Proc:  # fmt: skip
    """An agent on ``gateway`` exposing each (public, local) port of ``services``."""
    exposes = [a for public, local in services for a in ("--expose", f"{public}:127.0.0.1:{local}")]
    return Proc(
        f"agent-{name}",
        [str(TUNNELGATE), "agent", "--gateway", f"{gateway.host}:{gateway.port}", *gateway.trust,
         "--name", name, "--log-level", log_level, *exposes],
        workdir, tunnelgate_env(),
    )  # fmt: skip


def exposed(agent: Proc, gone: Callable[[], str | None]) -> tuple[int, float]:
    """Wait until the agent (of one service, at log level info) says it is exposed: the
    gateway's port, and when the agent logged it (s since the epoch)."""
    found: list[tuple[str, str, str]] = []

    def there() -> bool:
        if why := gone():
            raise BenchError(why)
        found[:] = EXPOSED.findall(agent_log(agent))
        return bool(found)

    system.wait_until(f"{agent.name}'s service", there, READY_TIMEOUT, every=0.002)
    stamp, public, _ = found[0]
    return int(public), datetime.datetime.fromisoformat(stamp).timestamp()


def agent_log(proc: Proc) -> str:
    return proc.stderr_path.read_text(errors="replace")


def listening_on(host: str, port: int) -> bool:
    """Whether a socket listens on ``host:port`` (IPv4, from /proc: no connection made)."""
    local = socket.inet_aton(host)[::-1].hex().upper() + f":{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(line.split()[1] == local and line.split()[3] == "0A" for line in lines)


def problems(procs: list[Proc]) -> dict[str, list[str]]:
    """Tracebacks, errors and warnings (the expected one of --no-tls aside) by process."""
    found = {}
    for proc in procs:
        with contextlib.suppress(OSError):
            text = proc.stderr_path.read_text(errors="replace") + proc.stdout()
            lines = [
                line.strip()[:300]
                for line in text.splitlines()
                if PROBLEM.search(line) and not EXPECTED.search(line)
            ]
            if lines:
                found[proc.name] = lines
    return found


def keep_logs(procs: list[Proc], prefix: str) -> None:
    logdir = RESULTS / "fleet-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    for proc in procs:
        if proc.stderr_path.exists() and proc.stderr_path.stat().st_size:
            shutil.copy(proc.stderr_path, logdir / f"{prefix}-{proc.stderr_path.name}")


# -- clients that reach any loopback host -------------------------------------------------


async def _connect(host: str, port: int, source: str | None = None) -> measure.EchoClient:
    """Connect to ``host:port``; from loopback address ``source`` if given (see
    ``measure._connect``: one source per worker keeps clear of TIME_WAIT stalls)."""
    loop = asyncio.get_running_loop()
    if source is None:
        _, client = await loop.create_connection(measure.EchoClient, host, port)
        return client
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, measure.IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
        _, client = await loop.create_connection(measure.EchoClient, sock=sock)
    except BaseException:
        sock.close()
        raise
    return client


async def _round_trips(host: str, port: int, count: int) -> dict[str, Any]:
    payload = bytes(range(64))
    async with asyncio.timeout(60 + count / 100):
        client = await _connect(host, port)
        try:
            for _ in range(min(200, count)):  # warm-up, not counted
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
    return {"p50_us": measure.percentile(ordered, 50), "p99_us": measure.percentile(ordered, 99),
            "max_us": ordered[-1], "count": count}  # fmt: skip


def round_trips(host: str, port: int, count: int) -> dict[str, Any]:
    """``count`` sequential 64-byte round trips on one connection."""
    result: dict[str, Any] = measure.run(_round_trips(host, port, count))
    return result


async def _connection_rate(
    host: str, port: int, loops: int, seconds: float, first: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    payload = b"0123456789abcdef"
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop_at = loop.time() + seconds

    async def worker(source: str) -> None:
        while loop.time() < stop_at:
            start = time.perf_counter()
            client: measure.EchoClient | None = None
            try:
                async with asyncio.timeout(10):
                    client = await _connect(host, port, source)
                    await client.echo(payload)
                latencies.append(time.perf_counter() - start)
            except (OSError, TimeoutError) as exc:
                errors[measure.describe(exc)] += 1
                await asyncio.sleep(0.01)  # do not spin on a refusing port
            finally:
                if client is not None:
                    client.close()

    began = time.perf_counter()
    async with asyncio.timeout(seconds + 30):
        await asyncio.gather(*(worker(f"127.0.0.{first + i}") for i in range(loops)))
    elapsed = time.perf_counter() - began
    await asyncio.sleep(0.1)  # let the last closes go out
    ordered = sorted(latencies)
    return {
        "per_s": len(latencies) / elapsed,
        "connections": len(latencies),
        "p99_ms": measure.percentile(ordered, 99) * 1000 if ordered else None,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(10)),
    }


def _client(host: str, port: int, loops: int, seconds: float, first: int) -> dict[str, Any]:
    result: dict[str, Any] = measure.run(_connection_rate(host, port, loops, seconds, first))
    return result


def connection_rate(host: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """CLIENTS processes at once, each LOOPS loops (client i's from 127.0.0.(10 + i·LOOPS + j)):
    connections/s summed."""
    firsts = [CLIENT_SOURCES + i * args.loops for i in range(args.clients)]
    if firsts[-1] + args.loops > 255:
        raise BenchError("--clients x --loops goes past 127.0.0.255")
    n = args.clients
    with concurrent.futures.ProcessPoolExecutor(n) as pool:
        runs = list(pool.map(_client, [host] * n, [port] * n, [args.loops] * n,
                             [args.seconds] * n, firsts))  # fmt: skip
    return {
        "per_s": sum(r["per_s"] for r in runs),
        "connections": sum(r["connections"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "p99_ms": max((r["p99_ms"] or 0.0) for r in runs),
        "clients": runs,
    }


class IperfStalled(BenchError):
    """An iperf3 client that did not finish: the run counts as stalled, the bench goes on."""


IPERF_GRACE = 10.0  # seconds an iperf3 client may take beyond its test


def iperf3(
    host: str, public: int, server_port: int, seconds: float, logdir: Path
) -> dict[str, Any]:
    """iperf3 -c ``host:public``, 1 stream, client to service; a fresh ``iperf3 -s -1`` on
    127.0.0.1:``server_port`` (readiness from the socket table: a probe would be its test).
    Raises IperfStalled if the client has not finished IPERF_GRACE seconds after its test."""
    iperf = system.which("iperf3")
    if iperf is None:
        raise BenchError("iperf3 not found: apt-get install iperf3")
    argv = [iperf, "-s", "-1", "-B", "127.0.0.1", "-p", str(server_port)]
    server = Proc(f"iperf3-server-{server_port}", argv, logdir)
    try:
        system.wait_until(f"iperf3 -s on port {server_port}",
                          lambda: listening_on("127.0.0.1", server_port), 10)  # fmt: skip
        argv = [iperf, "-c", host, "-p", str(public), "-t", f"{seconds:g}", "-J", "-P", "1",
                "--connect-timeout", "5000"]  # fmt: skip
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=seconds + IPERF_GRACE, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise IperfStalled(f"iperf3 -c {host}:{public} ({seconds:g} s) had not finished "
                               f"after {seconds + IPERF_GRACE:g} s") from exc  # fmt: skip
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise BenchError(f"iperf3 gave no JSON (exit {done.returncode}): "
                             f"{done.stderr.strip()[:300]}") from exc  # fmt: skip
        if "error" in report:
            raise BenchError(f"iperf3 -c {host}:{public}: {report['error']}")
        received = report["end"]["sum_received"]
        return {"gbit_s": received["bits_per_second"] / 1e9, "bytes": received["bytes"]}
    finally:
        server.stop(timeout=2.0)


def echo_from(host: str, port: int, timeout: float = 5.0) -> None:
    """One round trip through ``host:port`` (raises OSError if it fails)."""
    payload = b"ready?\n"
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            if not (chunk := sock.recv(len(payload) - len(got))):
                raise OSError("closed before the echo came back")
            got += chunk
    if got != payload:
        raise OSError(f"echo mismatch: {got!r}")


# -- part 1: the cost of one forwarding hop -------------------------------------------------


class HopSetup:
    """Redis, gateway one and two, and one agent on gateway one (echo service and iperf3)."""

    def __init__(self, args: argparse.Namespace, mode: str, workdir: Path) -> None:
        self.args, self.mode, self.workdir = args, mode, workdir
        self.procs: list[Proc] = []  # the tunnel's, in the order they started
        self.redis: RedisServer | None = None

    def start(self, echo: int) -> None:
        args, mode, workdir = self.args, self.mode, self.workdir
        self.redis = RedisServer(workdir)
        self.iperf_server = system.free_port()
        self.gateways = start_fleet(workdir, self.redis, f"hop-{mode}", 2, mode == "tls", args,
                                    self.procs)  # fmt: skip
        # Ports chosen here, as the agent logs at warning like the gateways (info would add a
        # line per client to the agent's work).
        self.echo, self.iperf = system.free_port(), system.free_port()
        services = [(self.echo, echo), (self.iperf, self.iperf_server)]
        self.agent = start_agent(workdir, "site", self.gateways[0], services, "warning")
        self.procs.append(self.agent)
        for gateway in self.gateways:  # gateway two forwards both, once it learned them
            for port in (self.echo, self.iperf):
                system.wait_until(
                    f"{gateway.node} to listen on port {port}",
                    lambda g=gateway, p=port: listening_on(g.host, p),  # type: ignore[misc]
                    READY_TIMEOUT,
                )
            wait_echo_at(gateway.host, self.echo, self.gone)

    def gone(self) -> str | None:
        return system.first_death(self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the agent first, then the gateways
            proc.stop()
        if self.redis is not None:
            self.redis.proc.stop()


def wait_echo_at(host: str, port: int, gone: Callable[[], str | None]) -> None:
    """Wait until a round trip through ``host:port`` works."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no attempt"
    while time.monotonic() < deadline:
        if why := gone():
            raise BenchError(why)
        try:
            echo_from(host, port)
            return
        except OSError as exc:
            last = measure.describe(exc)
        time.sleep(0.05)
    raise BenchError(f"no echo through {host}:{port} within {READY_TIMEOUT:g} s (last: {last})")


def cpu_now(sides: dict[str, list[int]]) -> dict[str, float]:
    return {side: cpu_seconds(pids) for side, pids in sides.items()}


def cpu_since(before: dict[str, float], sides: dict[str, list[int]]) -> dict[str, float]:
    return {side: cpu - before[side] for side, cpu in cpu_now(sides).items()}


def measure_path(args: argparse.Namespace, host: str, echo: int, iperf: int, iperf_server: int,
                 logdir: Path, sides: dict[str, list[int]]) -> dict[str, Any]:  # fmt: skip
    """Throughput, round trips and connection rate through ``host``; the CPU time each of
    ``sides`` (tunnel processes) used per GB relayed and per connection."""
    start = cpu_now(sides)
    try:
        bulk: dict[str, Any] | None = iperf3(host, iperf, iperf_server, args.seconds, logdir)
    except IperfStalled as exc:  # counted and reported; the other figures go on
        print(f"{exc}: counted as stalled", flush=True)
        bulk = None
    bulk_cpu = cpu_since(start, sides)
    rtt = round_trips(host, echo, args.round_trips)
    start = cpu_now(sides)
    conn = connection_rate(host, echo, args)
    conn_cpu = cpu_since(start, sides)
    result = {"gbit_s": bulk and bulk["gbit_s"], "rtt_p50_us": rtt["p50_us"],
              "rtt_p99_us": rtt["p99_us"], "iperf3_stalled": bulk is None,
              "conn_s": conn["per_s"], "conn_p99_ms": conn["p99_ms"], "conn_errors": conn["errors"],
              "raw": {"iperf3": bulk, "rtt": rtt, "conn": conn}}  # fmt: skip
    for side in sides:
        gigabytes = bulk["bytes"] / 1e9 if bulk else 0.0
        result[f"{side}_s_per_gb"] = bulk_cpu[side] / gigabytes if gigabytes else None
        result[f"{side}_us_per_conn"] = conn_cpu[side] / (conn["connections"] or 1) * 1e6
    return result


def hop(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every mode: its own fleet of two; rounds of the paths in alternating order."""
    echo = EchoService(tmp)
    results: dict[str, Any] = {"service": [], "modes": {}}
    try:
        for mode in args.modes:
            workdir = tmp / f"hop-{mode}"
            workdir.mkdir()
            setup = HopSetup(args, mode, workdir)
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "forwarded": []}
            try:
                setup.start(echo.port)
                one, two = setup.gateways
                sides = {"one": [one.proc.pid], "two": [two.proc.pid],
                         "agent": [setup.agent.pid]}  # fmt: skip
                before = (one.forwarded(), two.forwarded())
                for round_ in range(args.rounds):
                    # The service itself once per round, in the first mode's setup.
                    order = [p for p in PATHS if p != "service" or mode == args.modes[0]]
                    if round_ % 2:
                        order.reverse()
                    for path in order:
                        if path == "service":
                            server = system.free_port()
                            result = measure_path(args, "127.0.0.1", echo.port, server, server,
                                                  workdir, {})  # fmt: skip
                            results["service"].append(result)
                        else:
                            host = one.host if path == "direct" else two.host
                            result = measure_path(args, host, setup.echo, setup.iperf,
                                                  setup.iperf_server, workdir, sides)  # fmt: skip
                            runs[path].append(result)
                        if why := setup.gone():
                            raise BenchError(why)
                        gbit = "stalled" if result["gbit_s"] is None else f"{result['gbit_s']:.2f}"
                        print(f"{mode} round {round_ + 1}, {path}: {gbit} Gbit/s, "
                              f"{result['rtt_p50_us']:.0f}/{result['rtt_p99_us']:.0f} µs, "
                              f"{result['conn_s']:,.0f} connections/s, "
                              f"{result['conn_errors']} errors", flush=True)  # fmt: skip
                after = (one.forwarded(), two.forwarded())
            finally:
                setup.stop()
                keep_logs(setup.procs, f"hop-{mode}")
            results["modes"][mode] = {
                "runs": runs,
                # Forwarded clients: out of gateway two, into gateway one; the same count.
                "two_out": after[1]["out"] - before[1]["out"],
                "one_in": after[0]["in"] - before[0]["in"],
                "failed": after[1]["failed"] - before[1]["failed"],
                "refused": after[0]["refused"] - before[0]["refused"],
                "problems": problems(setup.procs),
            }
    finally:
        echo.stop()
    return results


# -- part 2: a fleet and its Redis cost -----------------------------------------------------


def redis_cost(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    workdir = tmp / "fleet"
    workdir.mkdir()
    echo = EchoService(workdir)
    redis = RedisServer(workdir)
    redis.watch(workdir)
    assert redis.monitor is not None
    helpers = [echo.proc, redis.proc, redis.monitor.proc]
    procs: list[Proc] = []  # the tunnel's
    result: dict[str, Any] = {}

    def gone() -> str | None:
        return system.first_death(helpers + procs)

    try:
        gateways = start_fleet(workdir, redis, "bench", args.gateways, True, args, procs)

        time.sleep(1.0)  # past the fleet's start: its first announcements
        start = redis.info()
        time.sleep(args.base)
        base = redis.info().since(start)
        result["background"] = base.plain()
        print(f"background: {base.requests / base.seconds:.2f} requests/s from "
              f"{len(gateways)} gateways", flush=True)  # fmt: skip

        windows: list[dict[str, Any]] = []
        ports: dict[int, Gateway] = {}  # public port → the gateway that holds its agent
        start = redis.info()
        for i in range(args.agents):
            gateway = gateways[i % len(gateways)]
            before = redis.info()
            agent = start_agent(workdir, f"site-{i:03d}", gateway, [(0, echo.port)])
            procs.append(agent)
            port, logged = exposed(agent, gone)
            for other in gateways:
                if other is not gateway:
                    system.wait_until(
                        f"{other.node} to forward port {port}",
                        lambda o=other, p=port: listening_on(o.host, p),  # type: ignore[misc]
                        READY_TIMEOUT,
                        every=0.002,
                    )
            everywhere = time.time()
            for other in gateways:
                echo_from(other.host, port)
            windows.append({**redis.info().since(before).plain(),
                            "spread_ms": (everywhere - logged) * 1000})  # fmt: skip
            ports[port] = gateway
        registration = redis.info().since(start)
        result["per_agent"] = windows
        result["registration"] = registration.plain()
        print(f"per new agent: {median([w['requests'] for w in windows]):g} requests (median)",
              flush=True)  # fmt: skip

        time.sleep(1.0)
        pids = [g.proc.pid for g in gateways]
        cpu = (redis.cpu_s(), cpu_seconds(pids))
        start = redis.info()
        time.sleep(args.rest)
        end = redis.info()
        rest = end.since(start)
        result["rest"] = {**rest.plain(), "redis_clients": end.clients, "keys": end.keys,
                          "used_memory": end.memory, "redis_cpu_s": redis.cpu_s() - cpu[0],
                          "gateways_cpu_s": cpu_seconds(pids) - cpu[1]}  # fmt: skip
        rest_rate = rest.requests / rest.seconds
        print(f"at rest: {rest_rate:.2f} requests/s", flush=True)

        # Clients paced over whole renewal periods, so that the window holds as many
        # renewals as the same time at rest.
        seconds = args.client_periods * args.lease / 3
        counts = [g.forwarded() for g in gateways]
        targets = [(g.host, port) for port, holder in ports.items() for g in gateways
                   if g is not holder]  # fmt: skip
        start = redis.info()
        clients = many_clients(targets, args.connections, seconds)
        during = redis.info().since(start)
        forwarded = [g.forwarded() - before for g, before in zip(gateways, counts, strict=True)]
        result["clients"] = {
            **clients, **during.plain(),
            "expected": rest_rate * during.seconds,  # what the at-rest rate predicts
            "expected_total": rest.total / rest.seconds * during.seconds,
            "forwarded_out": sum(c["out"] for c in forwarded),
            "failed": sum(c["failed"] for c in forwarded),
        }  # fmt: skip
        print(f"{clients['ok']} forwarded clients: {during.requests} requests meanwhile",
              flush=True)  # fmt: skip
        if why := gone():
            raise BenchError(why)
    finally:
        for proc in reversed(helpers + procs):
            proc.stop()
        keep_logs(procs, "fleet")
    result["problems"] = problems(procs)
    return result


def many_clients(targets: list[tuple[str, int]], count: int, seconds: float) -> dict[str, Any]:
    """``count`` clients started evenly over ``seconds``, over ``targets`` in turn: connect,
    echo 16 bytes, close."""

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        errors: Counter[str] = Counter()

        async def one(delay: float, host: str, port: int) -> None:
            await asyncio.sleep(delay)
            client = None
            try:
                async with asyncio.timeout(10):
                    client = await _connect(host, port)
                    await client.echo(b"0123456789abcdef")
            except (OSError, TimeoutError) as exc:
                errors[measure.describe(exc)] += 1
            finally:
                if client is not None:
                    client.close()

        began = loop.time()
        await asyncio.gather(
            *(one(i * seconds / count, *targets[i % len(targets)]) for i in range(count))
        )
        took = loop.time() - began
        await asyncio.sleep(0.1)
        failed = sum(errors.values())
        return {"ok": count - failed, "errors": failed, "error_kinds": dict(errors),
                "clients_seconds": took}  # fmt: skip

    result: dict[str, Any] = measure.run(run())
    return result


# -- the report -----------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    text = f"{median(values):,.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


HOP_FIGURES = (  # key, label, digits
    ("gbit_s", "iperf3 1 stream, Gbit/s", 2),
    ("rtt_p50_us", "64 B round trip p50, µs", 0),
    ("rtt_p99_us", "64 B round trip p99, µs", 0),
    ("conn_s", "connections/s", 0),
    ("conn_p99_ms", "connection p99, ms", 1),
)
CPU_FIGURES = (  # key, label, digits
    ("one_us_per_conn", "gateway one, CPU µs per connection", 0),
    ("two_us_per_conn", "gateway two, CPU µs per connection", 0),
    ("agent_us_per_conn", "agent, CPU µs per connection", 0),
    ("one_s_per_gb", "gateway one, CPU s per GB", 2),
    ("two_s_per_gb", "gateway two, CPU s per GB", 2),
    ("agent_s_per_gb", "agent, CPU s per GB", 2),
)


def hop_report(hop_results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    service = hop_results["service"]
    lines = [
        "## One forwarding hop",
        "",
        f"Medians (min-max) over {args.rounds} round(s). service: no tunnel. direct: "
        "127.0.0.1:PORT, the gateway that holds the agent (gateway one). forwarded: "
        "127.0.0.2:PORT, gateway two, which carries each client over a link of its own "
        "(TCP + mutual TLS 1.3) to gateway one. "
        f"iperf3 {args.seconds:g} s, {args.round_trips:,} round trips on one connection, "
        f"connections from {args.clients} processes x {args.loops} loops for "
        f"{args.seconds:g} s. Everything shares the machine's {os.cpu_count()} CPUs.",
        "",
    ]
    for mode, data in hop_results["modes"].items():
        runs = data["runs"]
        link = "TLS (the default)" if mode == "tls" else "--no-tls"
        lines += [
            f"### Agent-gateway link {link}; gateway-to-gateway link mutual TLS",
            "",
            "| figure | service | direct | forwarded | forwarded / direct | forwarded - direct |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for key, label, digits in HOP_FIGURES + CPU_FIGURES:
            base = [r[key] for r in service if r.get(key) is not None]
            direct = [r[key] for r in runs["direct"] if r[key] is not None]
            forwarded = [r[key] for r in runs["forwarded"] if r[key] is not None]
            both = bool(direct and forwarded)
            diff = f"{median(forwarded) - median(direct):+,.{digits}f}" if both else ""
            # No ratio to a side that does nothing on the direct path (gateway two).
            ratio = ""
            if both and median(direct) > 0.05 * median(forwarded):
                ratio = f"{median(forwarded) / median(direct):.2f}"
            lines.append(
                f"| {label} | {spread(base, digits) if base else ''} | {spread(direct, digits)} "
                f"| {spread(forwarded, digits)} | {ratio} | {diff} |"
            )
        errors = {path: sum(r["conn_errors"] for r in runs[path]) for path in runs}
        stalled = {path: sum(r["iperf3_stalled"] for r in runs[path]) for path in runs}
        lines += [
            "",
            f"Forwarded clients (the gateways' /metrics): {data['two_out']:,} out of gateway "
            f"two, {data['one_in']:,} into gateway one, {data['failed']} failed, "
            f"{data['refused']} refused. Connection errors: direct {errors['direct']}, "
            f"forwarded {errors['forwarded']}. iperf3 runs that did not finish within "
            f"{IPERF_GRACE:g} s of their end (left out of the medians): direct "
            f"{stalled['direct']} of {len(runs['direct'])}, forwarded {stalled['forwarded']} of "
            f"{len(runs['forwarded'])}.",
            "",
        ]
    return lines


def redis_report(data: dict[str, Any], args: argparse.Namespace) -> list[str]:
    gateways, agents, lease = args.gateways, args.agents, args.lease
    base, rest, clients = data["background"], data["rest"], data["clients"]
    windows = data["per_agent"]

    def rate(window: dict[str, Any], key: str) -> float:
        return float(window[key]) / window["seconds"]

    def per_client(key: str) -> float:
        expected = clients["expected"] if key == "requests" else clients["expected_total"]
        return (clients[key] - expected) / max(1, clients["ok"])

    requests = [w["requests"] for w in windows]
    totals = [w["total"] for w in windows]
    spread_ms = [w["spread_ms"] for w in windows]
    lines = [
        "## The fleet's Redis cost",
        "",
        f"{gateways} gateways (127.0.0.1-{gateways}) in one fleet on one redis-server; "
        f"{agents} agents spread over them (TLS), one service each, which every other gateway "
        f"forwards. fleet_lease = {lease:g} s (tunnelgate's default: 15): each gateway renews "
        f"every {lease / 3:g} s{resync_text()}. Requests: the commands the gateways send "
        "(redis-cli MONITOR; a script is one); commands: what Redis runs (INFO commandstats: "
        "a script's own commands too). The bench's INFO is left out.",
        "",
        "| figure | requests | commands | requests by name; what their scripts ran |",
        "| --- | --- | --- | --- |",
        f"| background: {gateways} gateways alone, {base['seconds']:.0f} s | "
        f"{rate(base, 'requests'):.2f}/s | {rate(base, 'total'):.2f}/s | "
        f"{which(base, base['seconds'], '/s')} |",
        f"| … per gateway | {rate(base, 'requests') / gateways:.2f}/s | "
        f"{rate(base, 'total') / gateways:.2f}/s | |",
        f"| per new agent (one service): median of {agents} (requests {min(requests)} to "
        f"{max(requests)}) "
        f"| {median(requests):g} | {median(totals):g} | "
        f"{which(median_window(windows), 1, '')} |",
        f"| at rest: {agents} agents, {rest['seconds']:.0f} s | {rate(rest, 'requests'):.2f}/s "
        f"| {rate(rest, 'total'):.2f}/s | "
        f"{which(rest, rest['seconds'], '/s')} |",
        f"| … per agent, beyond the background | "
        f"{(rate(rest, 'requests') - rate(base, 'requests')) / agents:.3f}/s | "
        f"{(rate(rest, 'total') - rate(base, 'total')) / agents:.3f}/s | |",
        f"| per client: {clients['ok']:,} through forwarded ports over "
        f"{clients['seconds']:.1f} s, less the at-rest rate | {per_client('requests'):+.4f} | "
        f"{per_client('total'):+.4f} | |",
        "",
        f"The clients' window: {clients['requests']} requests, {clients['total']} commands; "
        f"the at-rest rate predicts {clients['expected']:.0f} and "
        f"{clients['expected_total']:.0f} for that time (one request per client would have "
        f"added {clients['ok']:,}). Forwarded by the gateways: {clients['forwarded_out']:,}, "
        f"{clients['failed']} failed; {clients['errors']} client errors.",
        "",
        f"At rest: Redis holds {rest['redis_clients'] - 2} connections of the gateways "
        f"({(rest['redis_clients'] - 2) / gateways:.1f} each), {rest['keys']} keys, "
        f"{rest['used_memory'] / 2**20:.1f} MiB; it used "
        f"{rest['redis_cpu_s'] / rest['seconds'] * 1000:.1f} ms of CPU per second, the "
        f"gateways {rest['gateways_cpu_s'] / rest['seconds'] * 1000:.1f} ms/s together "
        "(MONITOR on). Every other gateway listens on a new port "
        f"{median(spread_ms):.0f} ms after its agent logged it exposed (median; max "
        f"{max(spread_ms):.0f} ms): the lease's pub/sub message, not a renewal.",
        "",
    ]
    return lines


def resync_text() -> str:
    """When each gateway reads every lease again, as the installed tunnelgate says."""
    try:
        from tunnelgate.gateway import fleet as tunnelgate_fleet
    except ImportError:
        return ""
    interval = getattr(tunnelgate_fleet, "RESYNC_INTERVAL", None)
    if not isinstance(interval, int | float):
        return ""
    return f" and reads every lease again every {interval:g} s"


def median_window(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median window (by commands run)."""
    ordered = sorted(windows, key=lambda w: w["total"])
    return ordered[(len(ordered) - 1) // 2]


def which(window: dict[str, Any], seconds: float, unit: str) -> str:
    """``eval 1.2/s, set 1.6/s; scripts: hset 1.2/s, …``: the requests by name, then what
    their scripts ran."""

    def text(commands: dict[str, int]) -> str:
        parts = sorted(commands.items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{name} {count / seconds:.2g}{unit}" for name, count in parts if count)

    scripted = text(window["scripted"])
    return text(window["sent"]) + (f"; scripts: {scripted}" if scripted else "")


def problems_report(results: dict[str, Any]) -> list[str]:
    found: dict[str, list[str]] = {}
    for mode, data in results.get("hop", {}).get("modes", {}).items():
        for name, lines in data["problems"].items():
            found[f"hop {mode}: {name}"] = lines
    for name, lines in results.get("redis", {}).get("problems", {}).items():
        found[f"fleet: {name}"] = lines
    if not found:
        return [
            "Logs: no traceback, error or warning (but those of --no-tls and of iperf3's resets)."
        ]
    lines = ["Logs (bench/results/fleet-logs/): tracebacks, errors and warnings:", ""]
    for name, problem_lines in found.items():
        lines.append(f"- {name}: {len(problem_lines)} line(s)")
        lines += [f"    {line}" for line in list(dict.fromkeys(problem_lines))[:5]]
    return lines


def redis_version() -> str:
    text = system.tool_version(["redis-server", "--version"])
    found = re.search(r"v=(\S+)", text)
    return found.group(1) if found else text


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    system.raise_nofile()
    if not TUNNELGATE.exists():
        print(f"{TUNNELGATE} not found: run `make` first", file=sys.stderr)
        return 2
    shutil.rmtree(RESULTS / "fleet-logs", ignore_errors=True)
    began = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tunnelgate-fleet-") as tmp:
        try:
            if "hop" not in args.skip:
                results["hop"] = hop(args, Path(tmp))
            if "redis" not in args.skip:
                results["redis"] = redis_cost(args, Path(tmp))
        except BenchError as exc:
            print(f"\nfleet bench failed: {exc}\n(logs in {RESULTS / 'fleet-logs'})",
                  file=sys.stderr)  # fmt: skip
            return 1
        finally:
            system.stop_all()
    head = [
        f"# tunnelgate fleet: {began:%Y-%m-%d %H:%M} UTC, {system.machine()['cpu_model']}, "
        f"{os.cpu_count()} CPUs, redis-server {redis_version()}",
        "",
        f"`{' '.join(['bench/fleet.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
    ]
    body: list[str] = []
    if "hop" in results:
        body += hop_report(results["hop"], args)
    if "redis" in results:
        body += redis_report(results["redis"], args)
    text = "\n".join(head + body + problems_report(results))
    print("\n" + text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in vars(args).items() if k != "json"}
    args.json.write_text(json.dumps({"options": plain, "machine": system.machine(),
                                     "git": system.git_state(REPO), "results": results},
                                    indent=1, default=str))  # fmt: skip
    args.json.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
