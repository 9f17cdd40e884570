"""Workers benchmark: ``.venv/bin/python bench/workers.py --help``.

The gateway with 1, 2, … worker processes (``tunnelgate gateway --workers N``), through the
real CLI on loopback, with the same load each time:

    connection rate   CLIENTS processes, each LOOPS loops of: connect, echo 16 bytes, close
                      (their public ports taken in turn over the agents)
    throughput        iperf3 with STREAMS streams through each agent at once, summed (Gbit/s)

Every process is pinned (``os.sched_setaffinity``): worker i to ``--worker-cpus[i % n]``;
the supervisor, the agents, the echo service, iperf3 and the clients to ``--load-cpus``.
Both default to every CPU of this machine: the load generators then share the workers'
cores, which on a machine of two cores is the only fair question ("are 2 workers slower than
1?"). On a larger machine, give the workers and the load cores of their own to see how the
rate grows per added worker (``--worker-cpus 0-7 --load-cpus 8-15 --agents 4 --workers
1,2,4,8``). Several agents (``--agents``) are several processes on the private side, as an
agent is one process whatever the gateway.

Rounds alternate the order of the worker counts (1 2, then 2 1, …), so that drift of the
machine falls on each alike. The report gives medians and min-max over the rounds, the ratio
to the first worker count, and what each added worker brought; the raw data goes to JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import measure
import system
from candidates import READY_TIMEOUT, TOKEN, TUNNELGATE, EchoService
from system import BenchError, Proc

RESULTS = Path(__file__).resolve().parent / "results"
WORKER_ENV = "TUNNELGATE_WORKER"  # how the supervisor tells a worker its index (JSON)


def cpu_list(text: str) -> list[int]:
    """``0-3,6`` → [0, 1, 2, 3, 6]."""
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        cpus += range(int(low), int(high or low) + 1)
    if not cpus:
        raise argparse.ArgumentTypeError("expected CPUs like 0-3,6")
    return cpus


def options(argv: list[str] | None = None) -> argparse.Namespace:
    every = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    parser = argparse.ArgumentParser(
        description="Connections/s and Gbit/s of a gateway of 1, 2, … workers (pinned).",
    )
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (1,2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measurement (5)")
    parser.add_argument("--agents", type=int, default=1, help="agent processes (1)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (2)")
    parser.add_argument("--loops", type=int, default=16, help="connection loops per client (16)")
    parser.add_argument("--streams", type=int, default=8, help="iperf3 streams per agent (8)")
    parser.add_argument("--tls", action="store_true", help="TLS between agent and gateway")
    parser.add_argument("--worker-cpus", type=cpu_list, default=every, metavar="CPUS",
                        help=f"CPUs of the workers, one each in turn ({every})")  # fmt: skip
    parser.add_argument("--load-cpus", type=cpu_list, default=every, metavar="CPUS",
                        help=f"CPUs of everything else ({every})")  # fmt: skip
    parser.add_argument("--float-workers", action="store_true",
                        help="each worker on any of --worker-cpus, not on one")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s: a smoke run")
    parser.add_argument("--json", type=Path, default=RESULTS / "workers-latest.json",
                        help="raw data of the run (the text goes next to it as .md)")  # fmt: skip
    args = parser.parse_args(argv)
    args.counts = [int(n) for n in args.workers.split(",")]
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
    if args.rounds < 1 or args.agents < 1 or args.clients < 1 or min(args.counts) < 1:
        parser.error("--rounds, --agents, --clients and the worker counts must be at least 1")
    return args


def listeners(port: int) -> int:
    """Sockets listening on TCP ``port`` (one per worker that holds it), from /proc."""
    suffix = f":{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(suffix) and line.split()[3] == "0A")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes ``pids`` used so far, from /proc."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def machine_cpu_seconds() -> float:
    """CPU time every CPU of the machine spent busy so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds the gateway, the agents and the whole machine use during a measurement."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.start = self._now()

    def _now(self) -> tuple[float, float, float]:
        setup = self.setup
        return (cpu_seconds(setup.gateway_pids()), cpu_seconds(setup.agent_pids()),
                machine_cpu_seconds())  # fmt: skip

    def used(self) -> dict[str, float]:
        end = self._now()
        gateway, agents, machine = (b - a for a, b in zip(self.start, end, strict=True))
        return {"gateway_cpu_s": gateway, "agent_cpu_s": agents, "machine_cpu_s": machine}


def worker_index(pid: int) -> int | None:
    """A gateway worker's index, from the environment its supervisor gave it."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(WORKER_ENV.encode() + b"="):
            return int(json.loads(entry.split(b"=", 1)[1])["index"])
    return None


class Setup:
    """A gateway of ``count`` workers, ``agents`` agents and the services behind them."""

    def __init__(self, args: argparse.Namespace, count: int, workdir: Path) -> None:
        self.args, self.count, self.workdir = args, count, workdir
        self.procs: list[Proc] = []
        self.gateway: Proc | None = None
        self.agents: list[Proc] = []
        self.echo_ports: list[int] = []  # public, one per agent
        self.iperf: list[tuple[int, int]] = []  # (public, server) per agent

    def start(self) -> None:
        args, workdir = self.args, self.workdir
        env = {**os.environ, "TUNNELGATE_TOKEN": TOKEN}
        echo = EchoService(workdir)
        self.procs.append(echo.proc)
        plain = [] if args.tls else ["--no-tls"]
        gateway = Proc(
            f"gateway-{self.count}",
            [str(TUNNELGATE), "gateway", "--listen", "127.0.0.1:0", "--workers", str(self.count),
             *plain, "--state-dir", str(workdir / "state"), "--log-level", "warning"],
            workdir, env,
        )  # fmt: skip
        self.procs.append(gateway)
        self.gateway = gateway
        system.wait_until("the gateway's banner", lambda: self._banner(gateway), READY_TIMEOUT)
        banner = gateway.stdout()
        port = re.search(r"listening on \S*:(\d+)", banner)
        assert port is not None, banner
        trust = ["--no-tls"]
        if args.tls:
            fingerprint = re.search(r"certificate fingerprint: (SHA256:[0-9A-F]+)", banner)
            assert fingerprint is not None, banner
            trust = ["--fingerprint", fingerprint.group(1)]
        for index in range(args.agents):
            public, iperf_public, iperf_server = (system.free_port() for _ in range(3))
            agent = Proc(
                f"agent-{self.count}-{index}",
                [str(TUNNELGATE), "agent", "--gateway", f"127.0.0.1:{port.group(1)}", *trust,
                 "--name", f"bench-{index}", "--log-level", "warning",
                 "--expose", f"{public}:127.0.0.1:{echo.port}",
                 "--expose", f"{iperf_public}:127.0.0.1:{iperf_server}"],
                workdir, env,
            )  # fmt: skip
            self.procs.append(agent)
            self.agents.append(agent)
            self.echo_ports.append(public)
            self.iperf.append((iperf_public, iperf_server))
        for public in self.echo_ports:  # every worker listens: every agent holds its sessions
            measure.wait_echo(public, READY_TIMEOUT, self.gone)
            system.wait_until(
                f"{self.count} workers on port {public}",
                lambda public=public: listeners(public) >= self.count,  # type: ignore[misc]
                READY_TIMEOUT,
            )
        self._pin(gateway.pid)

    def _banner(self, gateway: Proc) -> bool:
        if not gateway.alive():
            raise BenchError(gateway.died())
        return "run an agent with:" in gateway.stdout()

    def _pin(self, supervisor: int) -> None:
        """Each worker on its CPU; everything else stays on the load CPUs (inherited)."""
        cpus = self.args.worker_cpus
        found = {pid: worker_index(pid) for pid in system.descendants(supervisor)}
        workers = {pid: index for pid, index in found.items() if index is not None}
        if self.count == 1:  # no supervisor: the gateway is its one worker
            workers = {supervisor: 0}
        if len(workers) != self.count:
            raise BenchError(f"found {len(workers)} workers of {self.count}")
        for pid, index in workers.items():
            mine = set(cpus) if self.args.float_workers else {cpus[index % len(cpus)]}
            system.set_affinity([pid], mine)

    def gateway_pids(self) -> list[int]:
        """The gateway's processes: the supervisor and its workers, or the one process."""
        if self.gateway is None:
            return []
        return [self.gateway.pid, *system.descendants(self.gateway.pid)]

    def agent_pids(self) -> list[int]:
        return [agent.pid for agent in self.agents]

    def gone(self) -> str | None:
        return system.first_death(self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # the agents first: they say goodbye
            proc.stop()


def pin_self(cpus: list[int]) -> None:
    os.sched_setaffinity(0, set(cpus))


def _client(port: int, loops: int, seconds: float, cpus: list[int]) -> dict[str, Any]:
    pin_self(cpus)
    return measure.connection_rate(port, loops, seconds)


def connection_rate(setup: Setup) -> dict[str, Any]:
    """Every client process at once, over the agents' ports in turn: connections/s summed."""
    args = setup.args
    ports = [setup.echo_ports[i % len(setup.echo_ports)] for i in range(args.clients)]
    with concurrent.futures.ProcessPoolExecutor(args.clients) as pool:
        runs = list(
            pool.map(_client, ports, [args.loops] * len(ports), [args.seconds] * len(ports),
                     [args.load_cpus] * len(ports))
        )  # fmt: skip
    return {
        "per_s": sum(r["per_s"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "p99_ms": max((r["p99_ms"] or 0.0) for r in runs),
        "clients": runs,
    }


def throughput(setup: Setup) -> dict[str, Any]:
    """iperf3 through every agent at once (client to service), Gbit/s summed."""
    iperf = system.which("iperf3")
    if iperf is None:
        raise BenchError("iperf3 not found: apt-get install iperf3")
    results: list[dict[str, Any]] = [{} for _ in setup.iperf]

    def run(index: int, public: int, server: int) -> None:
        results[index] = measure.iperf3(
            iperf, public, server, seconds=setup.args.seconds, streams=setup.args.streams,
            reverse=False, logdir=setup.workdir,
        )  # fmt: skip

    threads = [
        threading.Thread(target=run, args=(i, public, server))
        for i, (public, server) in enumerate(setup.iperf)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not all(results):
        raise BenchError("an iperf3 run failed (see its log)")
    return {"gbit_s": sum(r["gbit_s"] for r in results), "runs": results}


def one(args: argparse.Namespace, count: int, workdir: Path) -> dict[str, Any]:
    setup = Setup(args, count, workdir)
    try:
        setup.start()
        meter = CpuMeter(setup)
        conn = connection_rate(setup)
        conn["cpu"] = meter.used()
        if gone := setup.gone():
            raise BenchError(gone)
        meter = CpuMeter(setup)
        bulk = throughput(setup)
        bulk["cpu"] = meter.used()
        if gone := setup.gone():
            raise BenchError(gone)
    finally:
        setup.stop()
    connections = sum(r["connections"] for r in conn["clients"]) or 1
    gigabytes = sum(r["bytes"] for r in bulk["runs"]) / 1e9 or 1.0
    result = {"conn_s": conn["per_s"], "conn_errors": conn["errors"], "conn_p99_ms": conn["p99_ms"],
              "gbit_s": bulk["gbit_s"], "raw": {"conn": conn, "throughput": bulk}}  # fmt: skip
    for side in ("gateway", "agent", "machine"):  # CPU per connection (µs) and per GB (s)
        result[f"{side}_us_per_conn"] = conn["cpu"][f"{side}_cpu_s"] / connections * 1e6
        result[f"{side}_s_per_gb"] = bulk["cpu"][f"{side}_cpu_s"] / gigabytes
    return result


def summary(runs: dict[int, list[dict[str, Any]]]) -> list[str]:
    counts = sorted(runs)
    base: dict[str, float] = {}
    lines = [
        "| workers | connections/s (min-max) | vs first | Gbit/s (min-max) | vs first | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for count in counts:
        cells = [str(count)]
        for key in ("conn_s", "gbit_s"):
            values = [r[key] for r in runs[count]]
            median = statistics.median(values)
            base.setdefault(key, median)
            digits = 0 if key == "conn_s" else 2
            cells.append(
                f"{median:,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
            )
            cells.append(f"{median / base[key]:.2f}")
        cells.append(str(sum(r["conn_errors"] for r in runs[count])))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "CPU time per connection (µs) and per GB relayed (s), medians: what one core buys",
        "",
        "| workers | gateway µs/conn | agent µs/conn | machine µs/conn | gateway s/GB "
        "| agent s/GB | machine s/GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for count in counts:
        cells = [str(count)]
        for unit in ("us_per_conn", "s_per_gb"):
            for side in ("gateway", "agent", "machine"):
                value = statistics.median(r[f"{side}_{unit}"] for r in runs[count])
                cells.append(f"{value:,.0f}" if unit == "us_per_conn" else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    if len(counts) > 1:
        first, last = counts[0], counts[-1]
        gains = []
        for key, unit in (("conn_s", "connections/s"), ("gbit_s", "Gbit/s")):
            gain = statistics.median(r[key] for r in runs[last]) - base[key]
            gains.append(f"{gain / (last - first):+,.2f} {unit}")
        lines += ["", f"Per added worker ({first} → {last}): {', '.join(gains)}."]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    system.raise_nofile()
    pin_self(args.load_cpus)  # inherited by everything started from here; workers move after
    if not TUNNELGATE.exists():
        print(f"{TUNNELGATE} not found: run `make` first", file=sys.stderr)
        return 2
    runs: dict[int, list[dict[str, Any]]] = {count: [] for count in args.counts}
    began = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="tunnelgate-workers-") as tmp:
        try:
            for round_ in range(args.rounds):
                order = args.counts if round_ % 2 == 0 else list(reversed(args.counts))
                for count in order:
                    workdir = Path(tmp) / f"r{round_}-w{count}"
                    workdir.mkdir()
                    result = one(args, count, workdir)
                    runs[count].append(result)
                    print(f"round {round_ + 1}, {count} worker(s): {result['conn_s']:,.0f} "
                          f"connections/s, {result['gbit_s']:.2f} Gbit/s, "
                          f"{result['conn_errors']} errors", flush=True)  # fmt: skip
        finally:
            system.stop_all()
    each = "any of" if args.float_workers else "one each of"
    layout = f"workers on {each} CPUs {args.worker_cpus}, load on CPUs {args.load_cpus}"
    head = [
        f"# tunnelgate workers: {began:%Y-%m-%d %H:%M} UTC, {system.machine()['cpu_model']}, "
        f"{os.cpu_count()} CPUs",
        "",
        f"{layout}; {args.agents} agent(s), {args.clients} client process(es) x {args.loops} "
        f"loops, iperf3 {args.streams} streams per agent, {args.seconds:g} s each, "
        f"{args.rounds} round(s), {'TLS' if args.tls else 'no TLS'}",
        "",
    ]
    text = "\n".join(head + summary(runs))
    print("\n" + text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in vars(args).items() if k != "json"}
    args.json.write_text(json.dumps({"options": plain, "machine": system.machine(),
                                     "git": system.git_state(system_repo()), "runs": runs},
                                    indent=1, default=str))  # fmt: skip
    args.json.with_suffix(".md").write_text(text + "\n")
    return 0


def system_repo() -> Path:
    return Path(__file__).resolve().parent.parent


if __name__ == "__main__":
    sys.exit(main())
