"""What the gateway and the agent show on the admin listener: JSON views of
their ``statistics()``, their metrics, readiness, and the actions they take.

JSON API (``/api/v1``), gateway::

    GET  /api/v1                     the gateway: version, address, TLS, uptime
    GET  /api/v1/agents              every agent known, online or not
    GET  /api/v1/agents/NAME         one agent, with its sessions
    GET  /api/v1/services            every service exposed now
    GET  /api/v1/connections         every open client connection
    GET  /api/v1/events?after=ID     the recent events (agent and service up and down,
                                     authentication failures, reloads), oldest first
    POST /api/v1/agents/NAME/disconnect
    POST /api/v1/connections/ID/close
    POST /api/v1/reload              re-read the configuration (as SIGHUP does)
    GET  /api/v1/services/NAME/traffic?range=1h|24h|30d[&agent=A]
                                     connections and bytes per minute (per day for 30d),
                                     kept across restarts in the state directory
    GET  /api/v1/history/events      the events kept across restarts (most recent 1000)

Agent::

    GET  /api/v1                     the agent: its gateways (up, sessions, reconnects,
                                     heartbeat round trip) and its traffic in total
    GET  /api/v1/sessions            its sessions: pool, connected since, heartbeat round trip
    GET  /api/v1/services            the services exposed now, with their traffic
    GET  /api/v1/connections         every open client connection
    POST /api/v1/connections/ID/close
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from tunnelgate import __version__
from tunnelgate.admin.alerts import Alerts
from tunnelgate.admin.history import RANGES, History, Recorder
from tunnelgate.admin.metrics import (
    agent_metrics,
    alert_metrics,
    fleet_metrics,
    gateway_metrics,
    group_members,
    group_metrics,
)
from tunnelgate.admin.server import BadRequest, NotFound
from tunnelgate.agent.agent import Agent, AgentStatistics
from tunnelgate.agent.session import ExposedService
from tunnelgate.errors import TransportError
from tunnelgate.gateway.gateway import GatewayStatistics, GatewayView
from tunnelgate.gateway.session import SessionStatistics
from tunnelgate.stats import (
    DIAL_ERROR_REASONS,
    AgentRecordStatistics,
    AgentServiceCounts,
    GatewayRecordStatistics,
)


def _counts(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    return dict(pairs)


DASHBOARD_CONNECTIONS = 500  # the longest-running; the API lists them all
DASHBOARD_EVENTS = 200


class GatewaySite:
    side = "gateway"

    def __init__(
        self,
        gateway: GatewayView,
        reload: Callable[[], Awaitable[str]] | None = None,
        history: Path | None = None,
        alerts: Alerts | None = None,
    ) -> None:
        """``history``: the database file for the traffic history; None: none kept.
        ``alerts``: the gateway's webhooks, counted in the metrics; None: none sent."""
        self.gateway = gateway
        self.alerts = alerts
        self._reload = reload
        self.recorder = (
            None
            if history is None
            else Recorder(History(history), self._traffic_totals, gateway.events.since)
        )
        self._recording: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.recorder is not None:
            self._recording = asyncio.create_task(self.recorder.run(), name="history")

    async def close(self) -> None:
        if self._recording is not None:
            self._recording.cancel()
            await asyncio.wait({self._recording})
        if self.recorder is not None:
            await self.recorder.close()

    async def _traffic_totals(self) -> dict[tuple[str, str], tuple[int, int, int]]:
        return {
            (agent.name, service): (counts.connections, counts.up, counts.down)
            for agent in (await self.gateway.snapshot()).agents
            for service, counts in agent.services
        }

    def degraded(self) -> str | None:
        fleet = self.gateway.fleet
        if fleet is None or fleet.up:
            return None
        return f"the fleet's registry cannot be reached ({fleet.error}): new ports wait"

    def ready(self) -> str | None:
        if self.gateway.address is None:
            return "the control port is not listening"
        return None

    async def collect(self) -> list[Metric]:
        stats = await self.gateway.snapshot()
        metrics = [*gateway_metrics(stats), *group_metrics(stats, self.gateway.config.groups)]
        if (fleet := self.gateway.fleet) is not None:
            forwarder = self.gateway.forwarder
            forwarded = forwarder.totals if forwarder is not None else None
            metrics.extend(fleet_metrics(fleet.up, len(fleet.held), forwarded))
        if self.alerts is not None:
            metrics.extend(alert_metrics(self.alerts.statistics()))
        return metrics

    async def view(self, path: Sequence[str], query: Mapping[str, str]) -> object:
        stats = await self.gateway.snapshot()
        match list(path):
            case ["dashboard"]:
                return self._dashboard(stats)
            case []:
                return self._info(stats)
            case ["agents"]:
                return self._agents(stats)
            case ["agents", name]:
                record = next((a for a in stats.agents if a.name == name), None)
                if record is None:
                    raise NotFound(f"no agent {name!r}")
                sessions = [s for s in stats.sessions if s.agent == name]
                return _agent(record, sessions, detail=True)
            case ["services"]:
                exposed: dict[tuple[str, str], dict[str, Any]] = {}  # once, on any worker
                for session in stats.sessions:
                    for service in session.services:
                        view = exposed.setdefault(
                            (session.agent, service.name),
                            {
                                "name": service.name,
                                "agent": session.agent,
                                "address": str(service.address),
                                "connections": 0,
                                "draining": True,
                                **({"group": service.group} if service.group else {}),
                            },
                        )
                        view["connections"] += service.clients
                        if service.group:  # unhealthy on any worker: out of the group there
                            view["healthy"] = view.get("healthy", True) and service.healthy
                        if not session.draining:  # the address of the session serving
                            view["address"], view["draining"] = str(service.address), False
                return list(exposed.values())
            case ["services", name, "traffic"]:
                return self._history_of(stats, name, query)
            case ["groups"]:
                return self._groups(stats)
            case ["fleet"]:
                return await self._fleet()
            case ["history", "events"]:
                if self.recorder is None:
                    raise NotFound("this gateway keeps no history")
                return self.recorder.history.events()
            case ["events"]:
                after = query.get("after", "0")
                if not after.isdigit():
                    raise BadRequest("after= takes an event id")
                return self.gateway.events.since(int(after))
            case ["connections"]:
                return [
                    _connection(c, "waiting", agent=session.agent)
                    for session in stats.sessions
                    for c in session.clients
                ]
        raise NotFound(f"no view /{'/'.join(path)}")

    def _info(self, stats: GatewayStatistics) -> dict[str, Any]:
        return {
            "side": "gateway",
            "version": __version__,
            "address": str(stats.address),
            "tls": stats.tls,
            "fingerprint": self.gateway.fingerprint,
            "started_at": stats.started_at,
            "uptime": time.time() - stats.started_at,
            "agents_connected": len({s.agent for s in stats.sessions}),
            "handshakes": stats.handshakes,
            "auth_failures": _counts(stats.auth_failures),
            "tls_failures": _counts(stats.tls_failures),
        }

    def _agents(self, stats: GatewayStatistics) -> list[dict[str, Any]]:
        by_agent: dict[str, list[SessionStatistics]] = {}
        for session in stats.sessions:
            by_agent.setdefault(session.agent, []).append(session)
        return [_agent(record, by_agent.get(record.name, [])) for record in stats.agents]

    async def _fleet(self) -> dict[str, Any]:
        """The fleet as its registry holds it now: its gateways and the ports leased."""
        if (fleet := self.gateway.fleet) is None:
            raise NotFound("this gateway is in no fleet (--fleet)")
        view = await fleet.view()
        return {
            "fleet": fleet.name,
            "node": fleet.node,
            "up": view.up,
            **({"error": view.error} if view.error else {}),
            "nodes": [
                {"node": n.node, "address": n.address, "version": n.version, "agents": n.agents}
                for n in view.nodes
            ],
            "leases": [
                {"port": lease.port, "owner": lease.owner, "nodes": list(lease.nodes)}
                for lease in view.leases
            ],
            **({"forwarding": self._forwarding()} if self.gateway.forwarder else {}),
        }

    def _forwarding(self) -> dict[str, Any]:
        """This gateway's side of forwarding: its counts, and the ports it forwards."""
        forwarder = self.gateway.forwarder
        assert forwarder is not None
        t = forwarder.totals
        return {
            "link": self.gateway.fleet.link if self.gateway.fleet else "",
            "ports": forwarder.forwarded_ports(),
            "out": t.out,
            "in": t.into,
            "failed": t.failed,
            "refused": t.refused,
        }

    def _groups(self, stats: GatewayStatistics) -> list[dict[str, Any]]:
        """Each agent group of the config: its port and its members (the services in it)."""
        configured = self.gateway.config.groups
        return [
            {
                "name": name,
                "balance": configured[name].balance,
                "address": next((m.address for m in members.values()), None),
                "members": [
                    {
                        "agent": agent,
                        "service": service,
                        "healthy": m.healthy,
                        "connections": m.connections,
                    }
                    for (agent, service), m in members.items()
                ],
            }
            for name, members in group_members(stats, configured).items()
            if name in configured
        ]

    def _dashboard(self, stats: GatewayStatistics) -> dict[str, Any]:
        """Everything the dashboard shows, in one view (it is streamed once a second)."""
        live = {  # the services exposed now, and whether their session drains
            (session.agent, service.name): (service, session.draining)
            for session in stats.sessions
            for service in session.services
        }
        services = []
        for agent in stats.agents:
            for name, counts in agent.services:
                service, draining = live.get((agent.name, name), (None, True))
                services.append(
                    {
                        "name": name,
                        "agent": agent.name,
                        "up": service is not None and not draining,
                        "address": str(service.address) if service is not None else "",
                        "connections": service.clients if service is not None else 0,
                        "connections_total": counts.connections,
                        "errors_total": sum(n for _, n in counts.errors),
                        "bytes_up": counts.up,
                        "bytes_down": counts.down,
                    }
                )
        clients = sorted(
            ((session.agent, c) for session in stats.sessions for c in session.clients),
            key=lambda pair: -pair[1].duration,
        )
        return {
            "time": time.time(),
            "info": self._info(stats),
            "agents": self._agents(stats),
            "services": services,
            "connections": [
                _connection(c, "waiting", agent=agent)
                for agent, c in clients[:DASHBOARD_CONNECTIONS]
            ],
            "connections_total": len(clients),
            "events": self.gateway.events.since()[-DASHBOARD_EVENTS:],
            "history": self.recorder is not None,
        }

    def _history_of(self, stats: GatewayStatistics, name: str, query: Mapping[str, str]) -> object:
        if self.recorder is None:
            raise NotFound("this gateway keeps no history")
        span = query.get("range", "1h")
        if span not in RANGES:
            raise BadRequest(f"range= takes one of {', '.join(RANGES)}")
        agents = {a.name for a in stats.agents if any(s == name for s, _ in a.services)}
        agent = query.get("agent") or (agents.pop() if len(agents) == 1 else "")
        if not agent:
            raise BadRequest(f"service {name!r} is known on several agents: add agent=")
        points = self.recorder.history.traffic(agent, name, span, time.time())
        return {"agent": agent, "service": name, "range": span, "points": points}

    async def act(self, path: Sequence[str], body: Mapping[str, Any]) -> object:
        match list(path):
            case ["agents", name, "disconnect"]:
                if not await self.gateway.disconnect(name, "disconnected from the admin API"):
                    raise NotFound(f"agent {name!r} is not connected")
                return {"disconnected": name}
            case ["connections", conn, "close"]:
                if not conn.isdigit() or not await self.gateway.close_connection(int(conn)):
                    raise NotFound(f"no open connection {conn}")
                return {"closed": int(conn)}
            case ["reload"]:
                if self._reload is None:
                    raise BadRequest("this gateway has no configuration to reload")
                return {"reloaded": await self._reload()}
            case ["fleet", "reload"]:
                if (fleet := self.gateway.fleet) is None:
                    raise NotFound("this gateway is in no fleet (--fleet)")
                if self._reload is None:
                    raise BadRequest("this gateway has no configuration to reload")
                said = await self._reload()
                try:
                    await fleet.reload("reload asked on the admin API")
                except TransportError as exc:
                    return {"reloaded": said, "fleet": f"not asked: {exc}"}
                return {"reloaded": said, "fleet": "every other gateway asked to reload"}
        raise NotFound(f"no action /{'/'.join(path)}")


def _agent(
    record: AgentRecordStatistics, sessions: list[SessionStatistics], detail: bool = False
) -> dict[str, Any]:
    """One agent the gateway knows, with its sessions running now."""
    view: dict[str, Any] = {
        "name": record.name,
        "online": record.up,
        "address": record.address,
        "connected_at": record.connected_at or None,
        "last_seen": record.last_seen or None,
        "connects": record.connects,
        "heartbeat_rtt": record.heartbeat_rtt,
        "version": record.software,
        "tls": record.tls,
        "certificate": record.certificate,
        "disconnects": _counts(record.disconnects),
        "data_channels": {"opened": record.data_channels, "reused": record.channel_reuses},
        "services": list(dict.fromkeys(s.name for ss in sessions for s in ss.services)),
        "connections": sum(len(session.clients) for session in sessions),
        "up": sum(counts.up for _, counts in record.services),
        "down": sum(counts.down for _, counts in record.services),
    }
    if detail:
        view["sessions"] = [
            {
                "id": s.id,
                "peer": s.peer,
                "age": s.duration,
                "draining": s.draining,
                "worker": s.worker,
            }
            for s in sessions
        ]
        view["traffic"] = {
            service: {
                "connections": counts.connections,
                "up": counts.up,
                "down": counts.down,
                "errors": _counts(counts.errors),
            }
            for service, counts in record.services
        }
    return view


def _connection(c: Any, waiting: str, **where: str) -> dict[str, Any]:
    """One open connection (gateway or agent side); ``waiting``: its state before relaying."""
    return {
        "id": c.conn,
        **where,
        "service": c.service,
        "client": c.client,
        "age": c.duration,
        "up": c.up,
        "down": c.down,
        "state": "relaying" if c.relaying else waiting,
    }


class AgentSite:
    side = "agent"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def degraded(self) -> str | None:
        return None

    def ready(self) -> str | None:
        """Ready while a gateway has the services (every gateway, if the config says so)."""
        ready = self.agent.gateways_ready()
        if not self.agent.statistics().sessions:
            return "no session with " + ("any gateway" if len(ready) > 1 else "the gateway")
        if not any(ready.values()):
            return "no service registered yet"
        if self.agent.config.require_all_gateways and not all(ready.values()):
            missing = ", ".join(gateway for gateway, up in ready.items() if not up)
            return f"not serving through {missing} (require_all_gateways)"
        return None

    async def collect(self) -> list[Metric]:
        return list(agent_metrics(self.agent.statistics()))

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def view(self, path: Sequence[str], query: Mapping[str, str]) -> object:
        stats = self.agent.statistics()
        traffic = dict(stats.services)
        match list(path):
            case []:
                counts = traffic.values()
                return {
                    "side": "agent",
                    "version": __version__,
                    "name": stats.name,
                    "gateway": str(self.agent.config.gateway),
                    "sessions": len(stats.sessions),
                    "gateways": self._gateways(stats),
                    "connections": sum(c.active for c in counts),
                    "connections_total": sum(c.connections for c in counts),
                    "up": sum(c.up for c in counts),
                    "down": sum(c.down for c in counts),
                    "dial_errors": {
                        reason: sum(dict(c.dial_errors)[reason] for c in counts)
                        for reason in DIAL_ERROR_REASONS
                    },
                }
            case ["gateways"]:
                return self._gateways(stats)
            case ["sessions"]:
                return [
                    {
                        "id": s.id,
                        "gateway": str(s.gateway),
                        **({"worker": s.worker} if s.worker is not None else {}),
                        "age": s.duration,
                        "connected_at": s.connected_at or None,
                        "rtt": s.rtt,
                        "services": [service.name for service in s.services],
                        "connections": len(s.connections),
                        "pool": s.pool,
                    }
                    for s in stats.sessions
                ]
            case ["services"]:
                exposed: dict[str, ExposedService] = {}  # once, though each worker's has it
                for session in stats.sessions:
                    for service in session.services:
                        exposed.setdefault(service.name, service)
                return [
                    {
                        "name": s.name,
                        "public": str(s.address),
                        "local": str(s.local),
                        **_service_traffic(traffic[s.name]),
                    }
                    for s in exposed.values()
                ]
            case ["connections"]:
                return [
                    _connection(c, "dialing", gateway=str(session.gateway))
                    for session in stats.sessions
                    for c in session.connections
                ]
        raise NotFound(f"no view /{'/'.join(path)}")

    def _gateways(self, stats: AgentStatistics) -> list[dict[str, Any]]:
        """Each gateway the agent dials: its state and counts."""
        ready = self.agent.gateways_ready()
        return [
            {
                "gateway": g.gateway,
                "up": g.up,
                "state": _gateway_state(g, ready.get(g.gateway, False)),
                **({"refused": g.refused} if g.refused else {}),
                "sessions": g.sessions,
                "reconnects": _counts(g.reconnects),
                "rtt": g.rtt,
                "connected_at": g.connected_at or None,
                "last_seen": g.last_seen or None,
            }
            for g in stats.gateways
        ]

    async def act(self, path: Sequence[str], body: Mapping[str, Any]) -> object:
        match list(path):
            case ["connections", conn, "close"]:
                if not conn.isdigit() or not self.agent.close_connection(int(conn)):
                    raise NotFound(f"no open connection {conn}")
                return {"closed": int(conn)}
        raise NotFound(f"no action /{'/'.join(path)}")


def _gateway_state(record: GatewayRecordStatistics, serving: bool) -> str:
    """ "serving" (its session has the services), "up" (welcomed, registering), "down"
    (reconnecting), or "refused" (it refused this agent, which no longer dials it)."""
    if record.refused:
        return "refused"
    return "serving" if serving else "up" if record.up else "down"


def _service_traffic(counts: AgentServiceCounts) -> dict[str, Any]:
    return {
        "connections": counts.active,
        "connections_total": counts.connections,
        "up": counts.up,
        "down": counts.down,
        "dial_errors": _counts(counts.dial_errors),
    }
