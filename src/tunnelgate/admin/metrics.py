"""Prometheus metrics, made at scrape time from a side's ``statistics()``.

Names follow Prometheus conventions: the prefix ``tunnelgate_``, base units
(seconds, bytes), ``_total`` on counters, ``_info`` for metadata. Labels come
only from configured names (agent, service, gateway) and small fixed sets
(reason, direction): never a client address, connection id or port. Byte
counters include the bytes of open connections, so a long download shows its
rate while it runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.metrics_core import Metric

from tunnelgate import __version__
from tunnelgate.agent.agent import AgentStatistics
from tunnelgate.gateway.gateway import GatewayStatistics
from tunnelgate.stats import HistogramCounts

P = "tunnelgate_"


def _buckets(counts: HistogramCounts) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, +Inf last, as the exposition wants them."""
    total = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip([*map(str, counts.bounds), "+Inf"], counts.counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


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
    last_seen = GaugeMetricFamily(
        P + "agent_last_seen_timestamp_seconds", "When the agent was last connected", labels=a
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
        for reason, count in agent.disconnects:
            disconnects.add_metric([agent.name, reason], count)
        if agent.last_seen:
            last_seen.add_metric([agent.name], agent.last_seen)
        for service, counts in agent.services:
            labels = [agent.name, service]
            connections_total.add_metric(labels, counts.connections)
            for reason, count in counts.errors:
                errors.add_metric([*labels, reason], count)
            transferred.add_metric([*labels, "up"], counts.up)
            transferred.add_metric([*labels, "down"], counts.down)
            setup.add_metric(labels, _buckets(counts.setup), counts.setup.sum)
            duration.add_metric(labels, _buckets(counts.duration), counts.duration.sum)
    yield from (up, connects, disconnects, last_seen)

    service_up = GaugeMetricFamily(
        P + "service_up", "1 while the service is exposed on the gateway", labels=s
    )
    active = GaugeMetricFamily(
        P + "service_active_connections", "Client connections open now", labels=s
    )
    idle = GaugeMetricFamily(
        P + "pool_idle_channels", "Data channels waiting for a client", labels=a
    )
    for session in stats.sessions:
        if session.draining:
            continue
        idle.add_metric([session.agent], session.pool.idle)
        for exposed in session.services:
            service_up.add_metric([session.agent, exposed.name], 1)
            active.add_metric([session.agent, exposed.name], exposed.clients)
    yield from (service_up, active, connections_total, errors, transferred, setup, duration, idle)


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
        rtts.add_metric(labels, _buckets(record.heartbeat), record.heartbeat.sum)
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
        dial.add_metric([name], _buckets(counts.dial), counts.dial.sum)
        for reason, count in counts.dial_errors:
            dial_errors.add_metric([name, reason], count)
        transferred.add_metric([name, "up"], counts.up)
        transferred.add_metric([name, "down"], counts.down)
    yield from (connections, active, dial, dial_errors, transferred)
