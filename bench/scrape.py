"""How long one scrape of /metrics and one /api/v1/connections take for a large
gateway: 1,000 services and 10,000 open connections, by default.

The snapshot is made of the gateway's own statistics types, filled as a gateway
of that size would fill them (250 services per agent, the most an agent may
register), so what is timed is exactly what a scrape runs after the snapshot:
the collector, the text exposition, the JSON view. ``Gateway.statistics()``
itself is timed on a real gateway by the test suite's sizes, not here.

    .venv/bin/python bench/scrape.py [--services N] [--connections N] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import msgspec

from tunnelgate.address import Address
from tunnelgate.admin.metrics import exposition, gateway_metrics
from tunnelgate.gateway.gateway import GatewayStatistics
from tunnelgate.gateway.pool import PoolStatistics
from tunnelgate.gateway.session import ClientStatistics, ServiceStatistics, SessionStatistics
from tunnelgate.stats import AgentRecord, ServiceTotals

PER_AGENT = 250


def snapshot(services: int, connections: int) -> GatewayStatistics:
    agents = (services + PER_AGENT - 1) // PER_AGENT
    sessions, records = [], []
    conn = 0
    for a in range(agents):
        name = f"site-{a}"
        record = AgentRecord(name)
        record.connected(f"10.0.{a}.1:40000", time.time())
        names = [f"svc-{a}-{s}" for s in range(min(PER_AGENT, services - a * PER_AGENT))]
        clients = []
        for i in range(connections // agents):
            conn += 1
            service = names[i % len(names)]
            clients.append(ClientStatistics(conn, f"203.0.113.{i % 250}:{40000 + i % 20000}",
                                            service, 12.5, True, 1000 + i, 50000 + i))  # fmt: skip
        for n in names:
            totals: ServiceTotals = record.service(n)
            for i in range(100):
                totals.started(0.001 * (i % 7))
                totals.ended(1000, 50000, 0.5 * (i % 9))
        per_service = {n: sum(c.service == n for c in clients) for n in names}
        sessions.append(
            SessionStatistics(
                f"{a:08x}", name, f"10.0.{a}.1:40000", 60.0, False,
                tuple(ServiceStatistics(n, Address("0.0.0.0", 20000 + i), per_service[n])
                      for i, n in enumerate(names)),
                PoolStatistics(4, 0, 0, (1.0, 2.0, 3.0, 4.0)),
                tuple(clients),
            )
        )  # fmt: skip
        records.append(record)
    open_bytes: dict[tuple[str, str], tuple[int, int]] = {}
    for s in sessions:
        for c in s.clients:
            up, down = open_bytes.get((s.agent, c.service), (0, 0))
            open_bytes[(s.agent, c.service)] = (up + c.up, down + c.down)
    now = time.time()
    return GatewayStatistics(
        Address("0.0.0.0", 8080), True, 0, tuple(sessions),
        tuple(r.statistics(now, open_bytes) for r in records),
        (("token", 3),), (("closed", 1),), now - 3600,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    stats = snapshot(args.services, args.connections)
    scrapes, views = [], []
    size = 0
    for _ in range(args.rounds):
        started = time.perf_counter()
        size = len(exposition(gateway_metrics(stats)))
        scrapes.append(time.perf_counter() - started)
        started = time.perf_counter()
        msgspec.json.encode([c for s in stats.sessions for c in s.clients])
        views.append(time.perf_counter() - started)
    print(
        f"{args.services} services, {args.connections} open connections, "
        f"{args.rounds} rounds:\n"
        f"  /metrics exposition: median {statistics.median(scrapes) * 1000:.1f} ms, "
        f"max {max(scrapes) * 1000:.1f} ms, {size / 1024:.0f} KiB (target: under 100 ms)\n"
        f"  connections as JSON: median {statistics.median(views) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
