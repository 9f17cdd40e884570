"""Counts that outlive a connection, without I/O: the totals and histograms
that the ``statistics()`` views add to the live state, for metrics.

A :class:`ServiceTotals` belongs to one (agent, service) for the life of the
process, across the agent's reconnects, so its counters only ever grow, as
Prometheus expects of a counter. The agent's counts (:class:`AgentTotals`: per
gateway and per local service) follow the gateway's, at the end. Must not
import asyncio, socket or time, nor any tunnelgate module.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

# Seconds. A new connection takes from well under a millisecond (a pooled
# channel on loopback) to seconds (a data channel opened on demand, far away).
# Few buckets: each costs a sample per service at every scrape (bench/scrape.py).
SETUP_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)
DURATION_BUCKETS: Final = (0.1, 1.0, 10.0, 60.0, 600.0, 3600.0)

# Why a client connection on a service port was not carried to the service.
ERROR_REASONS: Final = ("access_denied", "limit", "no_agent", "pool_timeout", "service_refused")


@dataclass(frozen=True)
class HistogramCounts:
    bounds: tuple[float, ...]  # upper bounds; the last bucket (+Inf) is implied
    counts: tuple[int, ...]  # per bucket, not cumulative; one more than bounds
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def counts(self) -> HistogramCounts:
        return HistogramCounts(self._bounds, tuple(self._counts), self._sum)


@dataclass(frozen=True)
class ServiceCounts:
    """A service's totals at one moment; bytes include those of open connections."""

    connections: int  # carried to the agent, ended or not
    errors: tuple[tuple[str, int], ...]  # (reason, count) for each reason in ERROR_REASONS
    up: int  # bytes from clients
    down: int  # bytes to clients
    setup: HistogramCounts  # seconds from accepting a client to relaying its bytes
    duration: HistogramCounts  # seconds each ended connection lasted


@dataclass(eq=False)
class ServiceTotals:
    connections: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    up: int = 0  # of ended connections; open ones are added by counts()
    down: int = 0
    setup: Histogram = field(default_factory=lambda: Histogram(SETUP_BUCKETS))
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))

    def started(self, setup: float) -> None:
        self.connections += 1
        self.setup.observe(setup)

    def ended(self, up: int, down: int, duration: float) -> None:
        self.up += up
        self.down += down
        self.duration.observe(duration)

    def failed(self, reason: str) -> None:
        self.errors[reason] += 1

    def counts(self, open_up: int = 0, open_down: int = 0) -> ServiceCounts:
        return ServiceCounts(
            self.connections,
            tuple((reason, self.errors[reason]) for reason in ERROR_REASONS),
            self.up + open_up,
            self.down + open_down,
            self.setup.counts(),
            self.duration.counts(),
        )


# Why a session ended, as the gateway counts it.
DISCONNECT_REASONS: Final = ("goodbye", "heartbeat", "error", "closed")
MAX_OFFLINE_AGENTS: Final = 10_000  # remembered after their last session; the oldest go first


@dataclass(frozen=True)
class AgentRecordStatistics:
    """What the gateway knows of one agent, online or not."""

    name: str
    up: bool
    address: str  # the last session's peer address
    connected_at: float  # wall-clock seconds of the last session's start; 0: never
    last_seen: float  # wall-clock seconds: now while up, else when its last session ended
    connects: int
    disconnects: tuple[tuple[str, int], ...]  # (reason, count) for each DISCONNECT_REASONS
    heartbeat_rtt: float | None  # seconds, the last Ping the gateway sent it; None: none yet
    software: str
    tls: str
    certificate: str
    services: tuple[tuple[str, ServiceCounts], ...]  # every service it ever exposed
    data_channels: int = 0  # opened by the agent and pooled
    channel_reuses: int = 0  # a data channel pooled again after a clean end


@dataclass(eq=False)
class AgentRecord:
    name: str
    sessions: int = 0  # running now (a reconnect briefly overlaps the old one)
    address: str = ""
    connected_at: float = 0.0
    last_seen: float = 0.0
    connects: int = 0
    disconnects: Counter[str] = field(default_factory=Counter)
    services: dict[str, ServiceTotals] = field(default_factory=dict)
    heartbeat_rtt: float | None = None
    software: str = ""  # what its last session said it runs
    tls: str = ""  # its last control channel's TLS version
    certificate: str = ""  # the fingerprint of the certificate it presented (mutual TLS)
    data_channels: int = 0
    channel_reuses: int = 0

    def connected(
        self, address: str, now: float, software: str = "", tls: str = "", certificate: str = ""
    ) -> None:
        self.sessions += 1
        self.connects += 1
        self.address, self.connected_at, self.last_seen = address, now, now
        self.software, self.tls, self.certificate = software, tls, certificate

    def disconnected(self, reason: str, now: float) -> None:
        self.sessions -= 1
        self.disconnects[reason] += 1
        self.last_seen = now

    def service(self, name: str) -> ServiceTotals:
        totals = self.services.get(name)
        if totals is None:
            totals = self.services[name] = ServiceTotals()
        return totals

    def statistics(
        self, now: float, open_bytes: dict[tuple[str, str], tuple[int, int]]
    ) -> AgentRecordStatistics:
        up = self.sessions > 0
        return AgentRecordStatistics(
            self.name,
            up,
            self.address,
            self.connected_at,
            now if up else self.last_seen,
            self.connects,
            tuple((reason, self.disconnects[reason]) for reason in DISCONNECT_REASONS),
            self.heartbeat_rtt,
            self.software,
            self.tls,
            self.certificate,
            tuple(
                (name, totals.counts(*open_bytes.get((self.name, name), (0, 0))))
                for name, totals in self.services.items()
            ),
            self.data_channels,
            self.channel_reuses,
        )


# What the event log records; "service_down" for each service when its session ends.
EVENT_KINDS: Final = (
    "agent_up",
    "agent_down",
    "service_up",
    "service_down",
    "auth_failure",
    "reload",
    "fleet_down",  # the fleet's registry (Redis) cannot be reached
    "fleet_up",  # it answers again
    "fleet_lost",  # a port this gateway served went to another owner (its hold had lapsed)
)
MAX_EVENTS: Final = 1000  # the most recent are kept


@dataclass(frozen=True)
class Event:
    id: int  # increasing from 1: a reader asks for those after the last it saw
    time: float  # wall-clock seconds
    kind: str  # one of EVENT_KINDS
    agent: str = ""
    service: str = ""
    detail: str = ""


class EventLog:
    """The most recent events, in order; a bounded ring. ``follow``: called with each event
    as it is added (a worker of a gateway sends them on to its supervisor)."""

    def __init__(
        self, size: int = MAX_EVENTS, follow: Callable[[Event], None] | None = None
    ) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._next = 1
        self.follow = follow

    def add(
        self, now: float, kind: str, agent: str = "", service: str = "", detail: str = ""
    ) -> None:
        event = Event(self._next, now, kind, agent, service, detail)
        self._events.append(event)
        self._next += 1
        if self.follow is not None:
            self.follow(event)

    def since(self, after: int = 0) -> tuple[Event, ...]:
        """The events kept whose id is above ``after``, oldest first."""
        return tuple(e for e in self._events if e.id > after)


@dataclass(eq=False)
class GatewayTotals:
    """Everything a gateway counts beyond its live state, for the life of the process."""

    agents: dict[str, AgentRecord] = field(default_factory=dict)
    auth_failures: Counter[str] = field(default_factory=Counter)  # by AUTH_FAILURE_REASONS
    tls_failures: Counter[str] = field(default_factory=Counter)  # by TLS_FAILURE_REASONS
    events: EventLog = field(default_factory=EventLog)

    def agent(self, name: str) -> AgentRecord:
        record = self.agents.get(name)
        if record is None:
            if len(self.agents) >= MAX_OFFLINE_AGENTS:
                offline = [r for r in self.agents.values() if not r.sessions]
                if offline:
                    del self.agents[min(offline, key=lambda r: r.last_seen).name]
            record = self.agents[name] = AgentRecord(name)
        return record


AUTH_FAILURE_REASONS: Final = ("token", "certificate", "version", "protocol", "timeout")
TLS_FAILURE_REASONS: Final = ("certificate", "protocol", "closed", "timeout")


def tls_failure_reason(message: str) -> str:
    """The reason label of a failed TLS handshake, from its error's text."""
    text = message.lower()
    if "certificate" in text or "unknown ca" in text:
        return "certificate"
    if "reset" in text or "eof" in text or "closed" in text:
        return "closed"
    return "protocol"


# --- the agent ------------------------------------------------------------------
#
# What an agent counts beyond its live state, for the life of the process: per
# gateway (its sessions, why they ended, the heartbeat's round trip) and per
# service (the connections carried to it). Nothing above is shared with it.

# Why the agent dials its gateway again, from how the last attempt ended: the
# gateway said goodbye; the control channel ended without one (EOF, reset); no
# reply within the heartbeat deadline; the gateway refused the connection or the
# session (not an authentication failure: that one ends the agent); it could not
# be reached (no route, no address, connect timed out); anything else before or
# during the session (TLS, handshake, protocol).
RECONNECT_REASONS: Final = ("goodbye", "closed", "heartbeat", "refused", "unreachable", "error")
# Why the agent could not reach a local service for a client.
DIAL_ERROR_REASONS: Final = ("refused", "timeout", "unreachable", "other")

# Seconds. A heartbeat's round trip: under a millisecond on loopback, seconds
# over a congested or distant path.
HEARTBEAT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Seconds to connect to a local service (its PROXY header sent): tens of
# microseconds on the same host, more across a network.
DIAL_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0)


@dataclass(frozen=True)
class GatewayRecordStatistics:
    """What the agent knows of one gateway it dials."""

    gateway: str  # the configured address
    up: bool  # a session is up on the control channel
    sessions: int  # sessions started (welcomed by the gateway)
    reconnects: tuple[tuple[str, int], ...]  # (reason, count) for each RECONNECT_REASONS
    rtt: float | None  # seconds, the last heartbeat's round trip in this session; None: none yet
    heartbeat: HistogramCounts  # every heartbeat's round trip
    connected_at: float  # wall-clock seconds of the last session's start; 0: never
    last_seen: float  # wall-clock seconds: now while up, else when its last session ended
    refused: str = ""  # why it refused this agent, which no longer dials it; "": dialed


@dataclass(eq=False)
class GatewayRecord:
    gateway: str
    sessions_up: int = 0  # one per worker of a gateway that has several
    sessions: int = 0
    rtt: float | None = None
    connected_at: float = 0.0
    last_seen: float = 0.0
    reconnects: Counter[str] = field(default_factory=Counter)
    heartbeat: Histogram = field(default_factory=lambda: Histogram(HEARTBEAT_BUCKETS))
    refused: str = ""  # set when this gateway refused the agent while others may serve

    @property
    def up(self) -> bool:
        return self.sessions_up > 0

    def connected(self, now: float) -> None:
        self.sessions_up += 1
        self.sessions += 1
        self.connected_at = self.last_seen = now

    def disconnected(self, now: float) -> None:
        self.sessions_up = max(0, self.sessions_up - 1)
        if not self.sessions_up:
            self.rtt = None
        self.last_seen = now

    def reconnecting(self, reason: str) -> None:
        self.reconnects[reason] += 1

    def answered(self, rtt: float) -> None:
        """A heartbeat came back after ``rtt`` seconds."""
        self.rtt = rtt
        self.heartbeat.observe(rtt)

    def statistics(self, now: float) -> GatewayRecordStatistics:
        return GatewayRecordStatistics(
            self.gateway,
            self.up,
            self.sessions,
            tuple((reason, self.reconnects[reason]) for reason in RECONNECT_REASONS),
            self.rtt,
            self.heartbeat.counts(),
            self.connected_at,
            now if self.up else self.last_seen,
            self.refused,
        )


@dataclass(frozen=True)
class AgentServiceCounts:
    """A local service's totals at one moment; bytes include those of open connections."""

    connections: int  # carried to the service, ended or not
    active: int  # open now, dialing or relaying
    dial_errors: tuple[tuple[str, int], ...]  # (reason, count) for each DIAL_ERROR_REASONS
    up: int  # bytes from clients, toward the service
    down: int  # bytes to clients
    dial: HistogramCounts  # seconds to connect to the service, its PROXY header sent


@dataclass(eq=False)
class AgentServiceTotals:
    connections: int = 0
    dial_errors: Counter[str] = field(default_factory=Counter)
    up: int = 0  # of ended connections; open ones are added by counts()
    down: int = 0
    dial: Histogram = field(default_factory=lambda: Histogram(DIAL_BUCKETS))

    def started(self, dial: float) -> None:
        self.connections += 1
        self.dial.observe(dial)

    def failed(self, reason: str) -> None:
        self.dial_errors[reason] += 1

    def ended(self, up: int, down: int) -> None:
        self.up += up
        self.down += down

    def counts(self, active: int = 0, open_up: int = 0, open_down: int = 0) -> AgentServiceCounts:
        return AgentServiceCounts(
            self.connections,
            active,
            tuple((reason, self.dial_errors[reason]) for reason in DIAL_ERROR_REASONS),
            self.up + open_up,
            self.down + open_down,
            self.dial.counts(),
        )


@dataclass(eq=False)
class AgentTotals:
    """Everything an agent counts beyond its live state, for the life of the process; its
    gateways and services are configured, so neither table grows past the configuration."""

    gateways: dict[str, GatewayRecord] = field(default_factory=dict)
    services: dict[str, AgentServiceTotals] = field(default_factory=dict)

    def gateway(self, address: str) -> GatewayRecord:
        record = self.gateways.get(address)
        if record is None:
            record = self.gateways[address] = GatewayRecord(address)
        return record

    def service(self, name: str) -> AgentServiceTotals:
        totals = self.services.get(name)
        if totals is None:
            totals = self.services[name] = AgentServiceTotals()
        return totals
