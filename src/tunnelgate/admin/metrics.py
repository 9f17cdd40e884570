"""Prometheus metrics, made at scrape time from a side's ``statistics()``.

Names follow Prometheus conventions: the prefix ``tunnelgate_``, base units
(seconds, bytes), ``_total`` on counters, ``_info`` for metadata. Labels come
only from configured names (agent, service, gateway) and small fixed sets
(reason, direction): never a client address, connection id or port. Byte
counters include the bytes of open connections, so a long download shows its
rate while it runs.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from tunnelgate import __version__
from tunnelgate.admin.alerts import AlertStatistics
from tunnelgate.agent.agent import AgentStatistics
from tunnelgate.gateway.forwarding import ForwardingTotals
from tunnelgate.gateway.gateway import GatewayStatistics
from tunnelgate.stats import HistogramCounts

P = "tunnelgate_"


_TYPES: Final = {"counter": "counter", "gauge": "gauge", "histogram": "histogram", "info": "gauge"}
_SUFFIXES: Final = {"counter": "_total", "info": "_info"}


def exposition(families: Iterable[Metric]) -> bytes:
    """The text format (0.0.4) of ``families``, as prometheus-client's ``generate_latest``
    writes it, but several times faster: that one checks and escapes every label name
    of every sample, and a gateway of 1,000 services has some 36,000 samples
    (bench/scrape.py). Label names here are fixed identifiers; values are escaped."""
    lines: list[str] = []
    add = lines.append
    for family in families:
        name = family.name + _SUFFIXES.get(family.type, "")
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        add(f"# HELP {name} {doc}\n# TYPE {name} {_TYPES.get(family.type, 'untyped')}\n")
        for sample in family.samples:
            if not (pairs := sample.labels):
                add(f"{sample.name} {_number(sample.value)}\n")
                continue
            labels = ",".join([f'{k}="{v}"' for k, v in pairs.items()])
            if labels.count('"') != 2 * len(pairs) or "\\" in labels or "\n" in labels:
                labels = ",".join([f'{k}="{_escape(v)}"' for k, v in pairs.items()])
            add(f"{sample.name}{{{labels}}} {_number(sample.value)}\n")
    return "".join(lines).encode()


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


def _number(value: float) -> str:
    if type(value) is int:
        return f"{value}.0"
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value)}.0"
    return repr(float(value))


def _observe(
    family: HistogramMetricFamily, labels: dict[str, str], counts: HistogramCounts
) -> None:
    """Add one histogram's samples: cumulative buckets (+Inf last), count and sum. What
    ``add_metric`` does, without rebuilding the label dict twice per bucket."""
    name, add, total = family.name, family.samples.append, 0
    for bound, count in zip(_bounds(counts.bounds), counts.counts, strict=True):
        total += count
        add(Sample(name + "_bucket", {**labels, "le": bound}, total))
    add(Sample(name + "_count", labels, total))
    add(Sample(name + "_sum", labels, counts.sum))


@functools.cache
def _bounds(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*map(str, bounds), "+Inf")


def _info(side: str) -> Metric:
    info = InfoMetricFamily(P + "build", "tunnelgate's version and side", labels=["side"])
    info.add_metric([side], {"version": __version__})
    return info


def gateway_metrics(stats: GatewayStatistics) -> Iterator[Metric]:
    yield _info("gateway")
    yield GaugeMetricFamily(
        P + "start_time_seconds", "When the gateway started (Unix time)", stats.started_at
    )
    yield GaugeMetricFamily(
        P + "handshakes_in_progress",
        "Connections on the control port still in their handshake",
        stats.handshakes,
    )
    auth = CounterMetricFamily(
        P + "auth_failures", "Agent authentications refused, by reason", labels=["reason"]
    )
    for reason, count in stats.auth_failures:
        auth.add_metric([reason], count)
    tls = CounterMetricFamily(
        P + "tls_handshake_failures", "TLS handshakes failed on the control port", labels=["reason"]
    )
    for reason, count in stats.tls_failures:
        tls.add_metric([reason], count)
    yield auth
    yield tls

    online = {s.agent for s in stats.sessions}
    yield GaugeMetricFamily(P + "agents_connected", "Agents with a session up", len(online))
    a = ["agent"]
    up = GaugeMetricFamily(P + "agent_up", "1 while the agent has a session up", labels=a)
    connects = CounterMetricFamily(P + "agent_connects", "Sessions the agent opened", labels=a)
    disconnects = CounterMetricFamily(
        P + "agent_disconnects", "Sessions that ended, by reason", labels=[*a, "reason"]
    )
    rtt = GaugeMetricFamily(
        P + "agent_heartbeat_rtt_seconds", "Round trip of the last Ping to the agent", labels=a
    )
    last_seen = GaugeMetricFamily(
        P + "agent_last_seen_timestamp_seconds", "When the agent was last connected", labels=a
    )
    channels = CounterMetricFamily(
        P + "agent_data_channels", "Data channels the agent opened to the gateway", labels=a
    )
    reuses = CounterMetricFamily(
        P + "agent_data_channel_reuses",
        "Data channels pooled again after carrying a client to a clean end",
        labels=a,
    )
    s = ["agent", "service"]
    connections_total = CounterMetricFamily(
        P + "service_connections", "Client connections carried to the service", labels=s
    )
    errors = CounterMetricFamily(
        P + "service_connection_errors",
        "Client connections not carried, by reason",
        labels=[*s, "reason"],
    )
    transferred = CounterMetricFamily(
        P + "service_transmit_bytes",
        "Bytes relayed: up from clients, down to clients",
        labels=[*s, "direction"],
    )
    setup = HistogramMetricFamily(
        P + "service_connection_setup_seconds",
        "From accepting a client to relaying its bytes",
        labels=s,
    )
    duration = HistogramMetricFamily(
        P + "service_connection_duration_seconds", "How long ended connections lasted", labels=s
    )
    for agent in stats.agents:
        up.add_metric([agent.name], 1 if agent.up else 0)
        connects.add_metric([agent.name], agent.connects)
        channels.add_metric([agent.name], agent.data_channels)
        reuses.add_metric([agent.name], agent.channel_reuses)
        for reason, count in agent.disconnects:
            disconnects.add_metric([agent.name, reason], count)
        if agent.last_seen:
            last_seen.add_metric([agent.name], agent.last_seen)
        if agent.up and agent.heartbeat_rtt is not None:
            rtt.add_metric([agent.name], agent.heartbeat_rtt)
        for service, counts in agent.services:
            labels = [agent.name, service]
            connections_total.add_metric(labels, counts.connections)
            for reason, count in counts.errors:
                errors.add_metric([*labels, reason], count)
            transferred.add_metric([*labels, "up"], counts.up)
            transferred.add_metric([*labels, "down"], counts.down)
            pairs = {"agent": agent.name, "service": service}
            _observe(setup, pairs, counts.setup)
            _observe(duration, pairs, counts.duration)
    yield from (up, connects, disconnects, last_seen, rtt, channels, reuses)

    service_up = GaugeMetricFamily(
        P + "service_up", "1 while the service is exposed on the gateway", labels=s
    )
    active = GaugeMetricFamily(
        P + "service_active_connections", "Client connections open now", labels=s
    )
    idle = GaugeMetricFamily(
        P + "pool_idle_channels", "Data channels waiting for a client", labels=a
    )
    pooled: Counter[str] = Counter()  # summed over an agent's sessions (one per worker)
    clients: Counter[tuple[str, str]] = Counter()
    for session in stats.sessions:
        if session.draining:
            continue
        pooled[session.agent] += session.pool.idle
        for exposed in session.services:
            clients[(session.agent, exposed.name)] += exposed.clients
    for name, count in pooled.items():
        idle.add_metric([name], count)
    for (name, service), count in clients.items():
        service_up.add_metric([name, service], 1)
        active.add_metric([name, service], count)
    yield from (service_up, active, connections_total, errors, transferred, setup, duration, idle)


@dataclass
class GroupMember:
    """A service in an agent group, summed over its sessions (one per worker)."""

    address: str
    healthy: bool = True  # on every worker: an unhealthy one gets no client there
    connections: int = 0


def group_members(
    stats: GatewayStatistics, groups: Iterable[str]
) -> dict[str, dict[tuple[str, str], GroupMember]]:
    """Each agent group of the config (``groups``) and any other seen, with its members by
    (agent, service); draining sessions left out."""
    found: dict[str, dict[tuple[str, str], GroupMember]] = {name: {} for name in groups}
    for session in stats.sessions:
        for exposed in session.services:
            if exposed.group and not session.draining:
                members = found.setdefault(exposed.group, {})
                key = (session.agent, exposed.name)
                member = members.setdefault(key, GroupMember(str(exposed.address)))
                member.healthy = member.healthy and exposed.healthy
                member.connections += exposed.clients
    return found


def group_metrics(stats: GatewayStatistics, groups: Iterable[str]) -> Iterator[Metric]:
    """Each agent group of the config (``groups``): its members, and those healthy; 0 for a
    group with none, so that an alert on it fires."""
    g = ["group"]
    members = GaugeMetricFamily(P + "group_members", "Services in the agent group", labels=g)
    healthy = GaugeMetricFamily(
        P + "group_healthy_members", "Members of the agent group taking new clients", labels=g
    )
    for name, group in group_members(stats, groups).items():
        members.add_metric([name], len(group))
        healthy.add_metric([name], sum(member.healthy for member in group.values()))
    yield from (members, healthy)


def fleet_metrics(
    up: bool, leases: int, forwarded: ForwardingTotals | None = None
) -> Iterator[Metric]:
    """A gateway in a fleet: whether its registry answers, the ports it leases there, and the
    clients it forwarded to or took from the others (with fleet_listen)."""
    yield GaugeMetricFamily(
        P + "fleet_up", "1 while the fleet's registry (Redis) answers", value=1 if up else 0
    )
    yield GaugeMetricFamily(
        P + "fleet_leases", "Public ports this gateway leases in the fleet", value=leases
    )
    if forwarded is None:
        return
    clients = CounterMetricFamily(
        P + "fleet_forwarded_clients",
        "Clients carried between the fleet's gateways: out (to another), in (from another), "
        "failed (no gateway took it), refused (a link refused here)",
        labels=["way"],
    )
    for way, count in (
        ("out", forwarded.out), ("in", forwarded.into),
        ("failed", forwarded.failed), ("refused", forwarded.refused),
    ):  # fmt: skip
        clients.add_metric([way], count)
    yield clients


def alert_metrics(stats: AlertStatistics) -> Iterator[Metric]:
    """The gateway's ``[[alerts]]``: how each alert ended."""
    sent = CounterMetricFamily(
        P + "alerts_sent",
        "Alerts to webhooks, by result (ok; failed after every retry; dropped, queue full)",
        labels=["result"],
    )
    for result, count in (("ok", stats.ok), ("failed", stats.failed), ("dropped", stats.dropped)):
        sent.add_metric([result], count)
    yield sent


def agent_metrics(stats: AgentStatistics) -> Iterable[Metric]:
    yield _info("agent")
    g = ["gateway"]
    control = GaugeMetricFamily(
        P + "agent_control_up", "1 while the control channel to the gateway is up", labels=g
    )
    sessions = CounterMetricFamily(P + "agent_sessions", "Sessions the gateway welcomed", labels=g)
    reconnects = CounterMetricFamily(
        P + "agent_reconnects",
        "Times the agent dialed the gateway again, by how the last attempt ended",
        labels=[*g, "reason"],
    )
    connected = GaugeMetricFamily(
        P + "agent_gateway_connected_timestamp_seconds",
        "When the last session with the gateway started",
        labels=g,
    )
    last_seen = GaugeMetricFamily(
        P + "agent_gateway_last_seen_timestamp_seconds",
        "When the gateway was last connected",
        labels=g,
    )
    rtt = GaugeMetricFamily(
        P + "agent_heartbeat_rtt_seconds", "The last heartbeat's round trip", labels=g
    )
    rtts = HistogramMetricFamily(
        P + "agent_heartbeat_round_trip_seconds", "Every heartbeat's round trip", labels=g
    )
    for record in stats.gateways:
        labels = [record.gateway]
        control.add_metric(labels, 1 if record.up else 0)
        sessions.add_metric(labels, record.sessions)
        for reason, count in record.reconnects:
            reconnects.add_metric([*labels, reason], count)
        if record.connected_at:
            connected.add_metric(labels, record.connected_at)
            last_seen.add_metric(labels, record.last_seen)
        if record.rtt is not None:
            rtt.add_metric(labels, record.rtt)
        _observe(rtts, {"gateway": record.gateway}, record.heartbeat)
    yield from (control, sessions, reconnects, connected, last_seen, rtt, rtts)

    services = GaugeMetricFamily(
        P + "agent_services_exposed", "Services the gateway exposes for this agent", labels=g
    )
    serving = GaugeMetricFamily(
        P + "agent_active_connections", "Client connections carried now", labels=g
    )
    exposed = {record.gateway: 0 for record in stats.gateways}
    carried = dict(exposed)
    for session in stats.sessions:
        gateway = str(session.gateway)
        exposed[gateway] = exposed.get(gateway, 0) + len(session.services)
        carried[gateway] = carried.get(gateway, 0) + len(session.connections)
    for gateway, count in exposed.items():
        services.add_metric([gateway], count)
        serving.add_metric([gateway], carried[gateway])
    yield from (services, serving)

    s = ["service"]
    connections = CounterMetricFamily(
        P + "agent_service_connections", "Client connections carried to the service", labels=s
    )
    active = GaugeMetricFamily(
        P + "agent_service_active_connections",
        "Client connections to the service open now (dialing or relaying)",
        labels=s,
    )
    dial = HistogramMetricFamily(
        P + "agent_service_dial_seconds",
        "Time to connect to the service, PROXY protocol header included",
        labels=s,
    )
    dial_errors = CounterMetricFamily(
        P + "agent_service_dial_errors",
        "Client connections the service could not be reached for, by reason",
        labels=[*s, "reason"],
    )
    transferred = CounterMetricFamily(
        P + "agent_service_transmit_bytes",
        "Bytes relayed: up from clients to the service, down to clients",
        labels=[*s, "direction"],
    )
    for name, counts in stats.services:
        connections.add_metric([name], counts.connections)
        active.add_metric([name], counts.active)
        _observe(dial, {"service": name}, counts.dial)
        for reason, count in counts.dial_errors:
            dial_errors.add_metric([name, reason], count)
        transferred.add_metric([name, "up"], counts.up)
        transferred.add_metric([name, "down"], counts.down)
    yield from (connections, active, dial, dial_errors, transferred)
