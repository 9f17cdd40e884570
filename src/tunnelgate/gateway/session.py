"""One authenticated agent on the gateway, a :class:`GatewaySession`: its control loop,
services, pool, clients and drain; when it ends, all of it ends. It knows nothing of
other sessions. Must not import agent."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from tunnelgate import tls
from tunnelgate.access import Gate, Refusal, admit, client_ip
from tunnelgate.address import Address
from tunnelgate.backoff import backoff
from tunnelgate.channel import Channel
from tunnelgate.config import AgentPolicy, GatewayConfig
from tunnelgate.control import end_when_drained, receive_control
from tunnelgate.errors import ConnectionClosed, ProtocolError, SessionOver, TransportError
from tunnelgate.gateway.admission import WARNING_INTERVAL, ClientGates, allowed_binds, host_of
from tunnelgate.gateway.groups import Group, Groups, proved_key, stored_keys
from tunnelgate.gateway.leases import LocalLeases, PortLeases
from tunnelgate.gateway.pool import ChannelPool, PoolStatistics
from tunnelgate.gateway.ports import Ports
from tunnelgate.logs import ContextLogger, Throttle, log_closed
from tunnelgate.protocol import wire
from tunnelgate.protocol.session import Admitted
from tunnelgate.relay import RelayResult, relay
from tunnelgate.stats import GatewayTotals
from tunnelgate.transport import Listener, SocketStream, Stream, TLSStream, WouldBlock

logger = logging.getLogger(__package__)

# A client's connection: its own, or a link from another gateway of the fleet that carries it.
ClientStream: TypeAlias = SocketStream | TLSStream
KILL_TIMEOUT: Final = 2.0  # for a replaced session's own cleanup (no network waits in it)
# For the agent's Finished after a clean end: it comes once the agent's service has taken
# the last bytes, so it may take a while; the channel waits outside the pool meanwhile, and
# is closed (gently) after this, so that an agent that never finishes holds none for long.
FINISH_TIMEOUT: Final = 30.0
FIRST_READ: Final = 16 * 1024  # a client's first bytes, sent with its Start when already there
AGENT_GOODBYE: Final = "agent said goodbye: "
FREE_PORT_CLAIMS: Final = 8  # free ports tried for a service asking for any, if leased elsewhere
# A service refused because its lease could not be asked for (the fleet's registry out of reach)
# is asked for again after a wait: full jitter, doubling from the first to the last (seconds).
RETRY_FIRST: Final = 1.0
RETRY_LAST: Final = 15.0


class _LeaseUnavailable(Exception):
    """Whoever grants leases (the fleet's Redis, the workers' supervisor) cannot be asked now:
    the service may be registered later."""


@dataclass
class _Service:
    name: str
    address: Address
    listener: Listener  # its own, or its group's
    bind: str  # as the agent asked for it (its policy's allow_bind lists names like this)
    gates: list[Gate]  # access rules a client must pass
    accepting: asyncio.Task[None] | None = None  # its own listener's loop (not a group's)
    group: Group | None = None  # the agent group it is a member of
    member: _Member | None = None  # how the group sees it
    healthy: bool = True  # as the agent's health check last said (grouped services)
    group_key: bytes = b""  # the stored key of the group's secret its proof matched
    active: int = 0  # its clients open now

    @functools.cached_property
    def public(self) -> str:  # the address clients reach, unless the listener's is a wildcard
        return "" if ipaddress.ip_address(self.address.host).is_unspecified else str(self.address)


@dataclass(eq=False)
class _Member:
    """A session's service in a group: what the group asks of it (see ``groups.Member``)."""

    session: GatewaySession
    service: _Service

    @property
    def agent(self) -> str:
        return self.session.agent

    @property
    def serving(self) -> bool:
        return self.service.healthy and self.session.goodbye is None and self.session.running

    @property
    def active(self) -> int:
        return self.service.active

    def admit(self, stream: ClientStream, client: str, server: str) -> bool:
        return self.session.take_client(self.service, stream, client, server)


@dataclass(frozen=True)
class ClientStatistics:
    conn: int
    client: str
    service: str
    duration: float
    relaying: bool
    up: int  # bytes from the client so far
    down: int  # bytes to the client so far


@dataclass
class _Client:
    conn: int
    client: str
    service: str
    gates: list[Gate]  # the ones it was admitted through, released when it ends
    ip: Any
    server: str = ""  # the address it reached, if not this gateway's listener (forwarded)
    started: float = field(default_factory=time.monotonic)
    result: RelayResult | None = None  # once relaying: its counts move while it runs

    def statistics(self, now: float) -> ClientStatistics:
        r, duration = self.result, now - self.started
        up, down, relaying = (r.sent, r.received, True) if r is not None else (0, 0, False)
        return ClientStatistics(self.conn, self.client, self.service, duration, relaying, up, down)

    def release(self) -> None:
        for gate in self.gates:
            gate.release(self.ip)


@dataclass(frozen=True)
class ServiceStatistics:
    name: str
    address: Address
    clients: int
    group: str = ""  # the agent group it is a member of
    healthy: bool = True  # its health check's last word (grouped services)


@dataclass(frozen=True)
class SessionStatistics:
    id: str
    agent: str
    peer: str
    duration: float
    draining: bool
    services: tuple[ServiceStatistics, ...]
    pool: PoolStatistics
    clients: tuple[ClientStatistics, ...]
    worker: int = 0  # the worker process it runs in, with --workers


@dataclass(frozen=True)
class Shared:
    """What the sessions of one gateway share."""

    config: Callable[[], GatewayConfig]  # the gateway's, as reloaded
    forget_name: Callable[[GatewaySession], None]  # the session drains or ends
    ports: Ports = field(default_factory=Ports)
    leases: PortLeases = field(default_factory=LocalLeases)  # which agent holds a port
    workers: tuple[str, ...] = ()  # every worker's own control address; (): one process
    worker: int = 0  # this process's index among them
    gates: ClientGates = field(default_factory=ClientGates)
    conn_ids: Iterator[int] = field(default_factory=functools.partial(itertools.count, 1))
    totals: GatewayTotals = field(default_factory=GatewayTotals)
    groups: Groups = field(default_factory=Groups)

    def free_ports(self, holder: object, owner: str) -> None:
        """Free every port ``holder`` (a session, or a group) holds, and its leases."""
        for bind, port in self.ports.release(holder):
            self.leases.release(bind, port, owner)


class GatewaySession:
    """One agent's session: its control loop, services, clients, pool and drain."""

    def __init__(
        self,
        agent: str,
        peer: str,
        auth: Admitted[AgentPolicy],
        channel: Channel,
        shared: Shared,
        software: str = "",  # as its Hello says
        reuse: bool = False,  # its Hello says it takes data channels back after a clean end
    ) -> None:
        self.id = secrets.token_hex(4)
        self.software = software
        self.reuse = reuse and shared.config().reuse_data_channels
        self.agent = agent
        self.peer = peer
        self.policy = auth.policy
        self.key = auth.key  # the stored key its proof matched (b"": its certificate alone)
        self.nonce = auth.nonce  # the control channel's Challenge: group proofs are bound to it
        self.channel = channel
        self.log = ContextLogger(logger, session=self.id, agent=agent)
        self.services: dict[str, _Service] = {}
        self.pool = ChannelPool(channel, self.log)
        self.clients: set[asyncio.Task[None]] = set()  # being served (wait_relays waits on it)
        self.goodbye: str | None = None  # why it is draining: no new clients, open ones finish
        self.told_bye = False  # the gateway said Bye to the agent
        self.started = time.monotonic()
        self._shared = shared
        self._config = shared.config
        self.record = shared.totals.agent(agent)  # its counts, across its sessions
        self._events = shared.totals.events
        self._ping: tuple[int, float] | None = None  # the last Ping sent: seq, when
        self._by_task: dict[asyncio.Task[None], _Client] = {}
        self._refusals = Throttle(WARNING_INTERVAL)
        self._task: asyncio.Task[Any] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._later: dict[str, wire.ServiceRequest] = {}  # refused for want of a lease: retried
        self._exposing: set[str] = set()  # names being exposed now

    @property
    def running(self) -> bool:  # once its task group runs: it takes data channels
        return self._group is not None

    def statistics(self) -> SessionStatistics:
        now, records = time.monotonic(), self._by_task.values()
        services = tuple(
            ServiceStatistics(
                s.name, s.address, s.active, s.group.name if s.group else "", s.healthy
            )
            for s in self.services.values()
        )
        clients = tuple(record.statistics(now) for record in records)
        draining, pool = self.goodbye is not None, self.pool.statistics()
        duration = now - self.started
        return SessionStatistics(
            self.id,
            self.agent,
            self.peer,
            duration,
            draining,
            services,
            pool,
            clients,
            self._shared.worker,
        )

    async def run(self) -> None:
        """Serve the agent until the session ends, then free everything and log why."""
        self._task = asyncio.current_task()
        reason, level, label, counted = "ended", logging.INFO, "closed", False
        try:
            c, shared = self._config(), self._shared
            await self.channel.send_message(
                wire.Welcome(
                    self.id,
                    c.heartbeat_interval,
                    c.heartbeat_timeout,
                    c.max_pool_size,
                    self.reuse,
                    list(shared.workers),
                    shared.worker,
                )
            )
            self.log.info("session started from %s", self.peer)
            stream = self.channel.stream
            der = stream.peer_certificate() if self._config().client_ca else None
            certificate = tls.fingerprint_of(der) if der else ""
            self.record.connected(
                self.peer, time.time(), self.software, stream.tls_version(), certificate
            )
            self._events.add(time.time(), "agent_up", self.agent, detail=f"from {self.peer}")
            counted = True
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._ping_agent())
                try:
                    raise SessionOver(await self._control_loop())
                finally:  # out of its groups before its clients unwind: none is sent here
                    self._leave_groups()
        except* SessionOver as caught:
            reason = str(caught.exceptions[0])
            label = "goodbye" if reason.startswith(AGENT_GOODBYE) else "closed"
        except* (ProtocolError, TransportError, ConnectionClosed) as caught:
            reason, level, label = str(caught.exceptions[0]), logging.WARNING, "error"
        except* TimeoutError:
            reason, level, label = "no heartbeat within the deadline", logging.WARNING, "heartbeat"
        finally:
            self._group = None
            if counted:
                now = time.time()
                self.record.disconnected(label, now)
                for name in self.services:
                    self._events.add(now, "service_down", self.agent, name, reason)
                self._events.add(now, "agent_down", self.agent, detail=reason)
            self._shared.forget_name(self)
            self.release()
            self.channel.abort()
            duration, names = time.monotonic() - self.started, ", ".join(self.services) or "none"
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                self.log.log(
                    level, "session ended after %.1f s: %s (services: %s)", duration, reason, names
                )
            else:
                self.log.info("session closed after %.1f s (services: %s)", duration, names)

    async def kill(self) -> None:
        """End the session now: only this process's own cleanup is awaited (sockets are
        aborted, not drained), so a half-dead peer cannot delay a takeover."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=KILL_TIMEOUT)

    async def drain(self, reason: str) -> None:
        """Take no new clients (listeners close, ports are free at once); open ones go on."""
        if self.goodbye is not None:
            return
        self.goodbye = reason
        self._shared.forget_name(self)
        accepting = {s.accepting for s in self.services.values() if s.accepting is not None}
        for task in accepting:
            task.cancel()
        if accepting:
            await asyncio.wait(accepting)
        self.release()

    def release(self) -> None:
        """Free the ports, leave the groups, close the listeners and the pool; safe to call
        twice."""
        self._shared.free_ports(self, self.agent)
        for service in self.services.values():
            if service.group is None:
                service.listener.close()
        self._leave_groups()
        self.pool.discard()

    def _leave_groups(self) -> None:
        """Take this session's services out of their groups (safe to call twice); the last
        member out closes a group's port."""
        shared = self._shared
        for service in self.services.values():
            group, member = service.group, service.member
            if group is None or member not in group.members:
                continue
            group.members.remove(member)
            if not group.members:
                group.close()
                if shared.groups.by_name.get(group.name) is group:
                    del shared.groups.by_name[group.name]
                shared.free_ports(group, group.owner)
            self.log.info(
                "service %s left group %s (%d member(s) left)",
                service.name,
                group.name,
                len(group.members),
            )

    def add_data_channel(self, channel: Channel) -> None:
        if self.goodbye is not None:  # draining: the agent stops opening them too
            channel.abort()
            return
        channel.conversation.accept_data_channel()
        self.record.data_channels += 1
        self.pool.add(channel, self._config().max_pool_size)

    async def _control_loop(self) -> str:
        """Serve the agent's control messages until it leaves; return why."""
        channel = self.channel
        while True:
            timeout = self._config().heartbeat_timeout
            message = await receive_control(channel, timeout, lambda: self.goodbye, self.clients)
            if isinstance(message, str):
                return message
            if isinstance(message, wire.Register):
                results = [await self._register(request) for request in message.services]
                await channel.send_message(wire.Registered(results))
            elif isinstance(message, wire.Pong):
                if self._ping is not None and self._ping[0] == message.seq:
                    self.record.heartbeat_rtt = time.monotonic() - self._ping[1]
            elif isinstance(message, wire.PoolRelease):
                self.pool.release(message.count)
            elif isinstance(message, wire.Health):
                self._health(message)
            elif isinstance(message, wire.Bye):
                reason = f"{AGENT_GOODBYE}{message.reason}"
                await self.drain(reason)
                if not self.clients:
                    return reason
                self.log.info("%s; %d client connection(s) finishing", reason, len(self.clients))
                assert self._group is not None
                self._group.create_task(end_when_drained(self.clients, reason))

    def _health(self, message: wire.Health) -> None:
        """The agent's health check of a grouped service: a failing one gets no new clients."""
        service = self.services.get(message.service)
        if service is None or service.group is None or service.healthy == message.healthy:
            return
        service.healthy = message.healthy
        group = service.group.name
        if message.healthy:
            self.log.info("service %s is healthy again: back in group %s", service.name, group)
        else:
            self.log.warning(
                "service %s is unhealthy (%s): out of group %s until it passes again",
                service.name,
                message.reason or "no reason given",
                group,
            )

    async def _ping_agent(self) -> None:
        """A Ping every heartbeat interval, whose Pong measures the agent's round trip."""
        for seq in itertools.count(1):
            await asyncio.sleep(self._config().heartbeat_interval)
            if self.goodbye is not None:
                return
            self._ping = (seq, time.monotonic())
            await self.channel.send_message(wire.Ping(seq))

    def services_outside(self, policy: AgentPolicy) -> str | None:
        """Why this session's services do not fit ``policy`` (after a reload), or None."""
        if len(self.services) > policy.max_services:
            return f"it has {len(self.services)} services; its policy allows {policy.max_services}"
        config = self._config()
        binds = allowed_binds(config, policy)
        for service in self.services.values():
            if not policy.allows_port(service.address.port) or service.bind not in binds:
                return f"its policy no longer allows service {service.name} on {service.address}"
            if (group := service.group) is None:
                continue
            settings = config.groups.get(group.name)
            if settings is None or not policy.allows_group(group.name):
                return f"its policy no longer allows group {group.name}"
            if service.group_key not in stored_keys(settings):
                return f"the secret it joined group {group.name} with was revoked"
        return None

    async def _register(self, request: wire.ServiceRequest) -> wire.ServiceResult:
        """:meth:`_expose`; a service whose lease cannot be asked for now is refused with the
        reason and asked for again later, its result sent when it comes."""
        try:
            return await self._expose(request)
        except _LeaseUnavailable as exc:
            error = f"{exc}; the gateway tries again"
            self.log.warning("service %s not exposed yet: %s", request.name, error)
            if request.name not in self._later:  # one retry per name: the last request's
                assert self._group is not None
                self._group.create_task(self._register_later(request.name))
            self._later[request.name] = request
            return wire.ServiceResult(request.name, False, error=error)

    async def _register_later(self, name: str) -> None:
        """Ask again for service ``name`` (as the agent last asked for it), refused for want of
        a lease, with backoff, until it is exposed, refused for good, or the session ends; the
        agent gets the result then."""
        delays = backoff(RETRY_FIRST, RETRY_LAST)
        next(delays)
        try:
            while True:
                delay, attempt = delays.send(0.0)
                await asyncio.sleep(delay)
                if self.goodbye is not None or name in self.services:
                    return
                if name in self._exposing:  # the agent asked again meanwhile: its answer
                    continue
                try:
                    result = await self._expose(self._later[name])
                except _LeaseUnavailable as exc:
                    self.log.debug("service %s: attempt %d: %s", name, attempt, exc)
                    continue
                await self.channel.send_message(wire.Registered([result]))
                return
        finally:
            del self._later[name]

    async def _expose(self, request: wire.ServiceRequest) -> wire.ServiceResult:
        """:meth:`_expose_now`, one at a time per name (a retry and the agent's own request
        may meet)."""
        if request.name in self._exposing:
            self.log.warning("service %s refused: asked for twice at once", request.name)
            return wire.ServiceResult(request.name, False, error="asked for twice at once")
        self._exposing.add(request.name)
        try:
            return await self._expose_now(request)
        finally:
            self._exposing.discard(request.name)

    async def _expose_now(self, request: wire.ServiceRequest) -> wire.ServiceResult:
        """Open the public listener for one service, if the policy allows it and no other
        agent holds the port (in this process, or on another worker: the leases)."""
        config, policy, name, port = self._config(), self.policy, request.name, request.port
        bind = request.bind or config.default_bind
        binds = allowed_binds(config, policy)
        ports = self._shared.ports

        def refuse(error: str) -> wire.ServiceResult:
            self.log.warning("service %s refused: %s", name, error)
            return wire.ServiceResult(name, False, error=error)

        if self.goodbye is not None:
            return refuse("the session is ending")
        if name in self.services:
            return refuse(f"service name {name!r} used twice")
        if len(self.services) >= policy.max_services:
            return refuse(f"this agent may expose at most {policy.max_services} services")
        if bind not in binds:
            return refuse(f"bind address {bind} is not allowed (allowed: {', '.join(binds)})")
        if port and not policy.allows_port(port):
            return refuse(f"port {port} is not allowed for this agent")
        gates = self._shared.gates.gates_for(config, policy, name)
        if request.group:
            outcome = await self._join(request, bind)
            if isinstance(outcome, str):
                return refuse(outcome)
            joined, key = outcome
            assert joined.listener is not None
            service = _Service(name, joined.address, joined.listener, bind, gates, group=joined)
            service.group_key = key
            service.member = _Member(self, service)
            joined.members.append(service.member)
            self.services[name] = service
            address = joined.address
            self.log.info(
                "service %s joined group %s on %s (%d member(s))",
                name,
                joined.name,
                address,
                len(joined.members),
            )
        else:
            if port and (bind, port) in ports.holders:
                return refuse(f"port {port} is held by another agent")
            if isinstance(listener := await self._take_port(bind, port, self, self.agent), str):
                return refuse(listener)
            address = listener.address
            self.services[name] = service = _Service(name, address, listener, bind, gates)
            assert self._group is not None
            service.accepting = self._group.create_task(self._accept_clients(service))
            self.log.info("service %s exposed on %s", name, address)
        self.record.service(name)  # counted from now on, at zero
        self._events.add(time.time(), "service_up", self.agent, name, str(address))
        return wire.ServiceResult(
            name, True, bind=address.host, port=address.port, group=request.group
        )

    async def _join(self, request: wire.ServiceRequest, bind: str) -> tuple[Group, bytes] | str:
        """The group ``request`` asks to join, its port open (the first member opens it), if
        the gateway has it, the policy allows it and the proof of its secret holds; else why
        not; with the stored key of the secret proved. The caller adds the member."""
        config, policy, name = self._config(), self.policy, request.group
        if not policy.allows_group(name):  # first: who may join none learns which exist
            return f"this agent may not join group {name!r} (allow_groups)"
        settings = config.groups.get(name)
        if settings is None:
            return f"the gateway has no agent group {name!r}"
        matched = await proved_key(settings, request.group_proof, self.nonce, self.agent)
        if matched is None:
            self._refusals.warning(
                self.log,
                time.monotonic(),
                "refusing to let service %s join group %s: wrong secret",
                request.name,
                name,
            )
            return f"wrong secret for group {name!r}"
        groups = self._shared.groups
        async with groups.joining:  # one first member opens the port
            if self.goodbye is not None or (tasks := groups.tasks) is None:
                return "the session is ending"
            if (group := groups.by_name.get(name)) is not None:
                held_bind, held_port = group.key
                if bind != held_bind or request.port not in (0, held_port):
                    return (
                        f"group {name} listens on {group.address}: ask for port {held_port} "
                        f"(or 0) on {held_bind}"
                    )
                if not policy.allows_port(held_port):
                    return f"group {name}'s port {held_port} is not allowed for this agent"
                return group, matched
            if request.port and (bind, request.port) in self._shared.ports.holders:
                return f"port {request.port} is held by another agent"
            group = Group(name, settings.balance)
            taken = await self._take_port(bind, request.port, group, group.owner)
            if isinstance(taken, str):
                return taken
            group.listener, group.key = taken, (bind, taken.address.port)
            try:
                group.start(
                    tasks,
                    lambda listener, handle: accept(listener, handle, logger, f"group {name}"),
                )
            except RuntimeError:  # the gateway's task group is ending: so is the gateway
                group.close()
                self._shared.free_ports(group, group.owner)
                return "the gateway is stopping"
            groups.by_name[name] = group
            return group, matched

    async def _take_port(self, bind: str, port: int, holder: object, owner: str) -> Listener | str:
        """A listener on ``(bind, port)`` (any port the policy allows, if 0), held by
        ``holder`` (this session, or its group) and leased to ``owner`` (its agent, or the
        group); else why not. Raises _LeaseUnavailable."""
        ports, leases, error = self._shared.ports, self._shared.leases, ""
        for _ in range(FREE_PORT_CLAIMS if not port else 1):
            listener = None if port else ports.listen_on_free_port(bind, self.policy)
            if listener is None and not port:
                return "no free port among the ports allowed for this agent"
            key = (bind, listener.address.port if listener is not None else port)
            ports.holders[key] = holder  # before the claim's wait: nobody else here takes it
            granted: bool | None = None  # None: not known (cancelled while claiming)
            taken = False
            try:
                try:
                    leased_to = await leases.claim(*key, owner)
                except TransportError as exc:  # who grants leases cannot be asked now
                    raise _LeaseUnavailable(str(exc)) from None
                granted = leased_to is None
                if not granted:  # for any port: one a worker shares with another agent
                    # The agent is not told who (another tenant's name); the log says.
                    self.log.info("port %d is leased to %s", key[1], leased_to)
                    error = f"port {key[1]} is held by another agent"
                    continue
                if self.goodbye is not None or ports.holders.get(key) is not holder:
                    return "the session is ending"
                listener = listener or ports.open(*key)
                taken = True
                return listener
            except TransportError as exc:  # the port itself (in use by another process)
                return str(exc)
            finally:
                if not taken:
                    if listener is not None:
                        listener.close()
                    if ports.holders.get(key) is holder:  # else whoever took it released it
                        del ports.holders[key]
                        if granted is not False:
                            leases.release(*key, owner)
        return error

    def update_gates(self) -> None:
        """After a reload: every service's access rules as the config now says."""
        for service in self.services.values():
            service.gates = self._shared.gates.gates_for(self._config(), self.policy, service.name)

    async def _accept_clients(self, service: _Service) -> None:
        def handle(stream: SocketStream, client: str) -> None:
            if not self.take_client(service, stream, client):
                stream.abort()

        await accept(service.listener, handle, self.log, f"service {service.name}")

    def take_client(
        self, service: _Service, stream: ClientStream, client: str, server: str = ""
    ) -> bool:
        """Take a client of ``service`` (from its listener, its group's, or another gateway
        of the fleet, which says the ``server`` address it reached): within this agent's
        limits and the service's access rules, it waits for a data channel. False if refused
        (counted and logged here; the caller resets it, or a group tries another member)."""
        if (group := self._group) is None or self.goodbye is not None:  # not running, or ending
            return False
        now = time.monotonic()
        limit = self.policy.max_connections or self._config().max_connections
        if len(self.clients) >= limit:
            self._refusals.warning(
                self.log,
                now,
                "refusing client %s on service %s: the agent has %d open connections "
                "(max_connections)",
                client,
                service.name,
                len(self.clients),
            )
            self.record.service(service.name).failed("limit")
            return False
        gates, ip = service.gates, None  # the gates admitted through are the ones released
        if gates:
            refusal: Refusal | None = Refusal(gates[0].rule.where, "address not understood")
            if (ip := client_ip(host_of(client))) is not None:
                refusal = admit(gates, ip, now)
            if refusal is not None:
                self._shared.gates.warn_refused(self.log, now, service.name, client, refusal)
                self.record.service(service.name).failed("access_denied")
                return False
        stream.reset_unless_closed_cleanly()
        record = _Client(next(self._shared.conn_ids), client, service.name, gates, ip, server)
        task = spawn(group, stream, self._serve_client(service, stream, record))
        if task is None:
            record.release()
        else:
            service.active += 1
            self.clients.add(task)
            self._by_task[task] = record
            task.add_done_callback(self._client_done)
        return True

    def close_client(self, conn: int) -> bool:
        for task, record in self._by_task.items():
            if record.conn == conn:
                self.log.warning("closing client %s (conn %d) on request", record.client, conn)
                task.cancel()
                return True
        return False

    def _client_done(self, task: asyncio.Task[None]) -> None:
        self.clients.discard(task)
        record = self._by_task.pop(task)
        record.release()
        if (service := self.services.get(record.service)) is not None:
            service.active -= 1
        if (r := record.result) is not None:  # counted here, as it leaves the live records
            totals = self.record.service(record.service)
            totals.ended(r.sent, r.received, r.duration)
            if r.received == 0 and r.how.startswith(f"aborted by peer: {wire.AGENT_REACH_FAILURE}"):
                totals.failed("service_refused")

    async def _serve_client(self, service: _Service, stream: ClientStream, record: _Client) -> None:
        """Root of one client connection's task."""
        client, config = record.client, self._config()
        log = self.log.bind(conn=record.conn, service=service.name)
        channel: Channel | None = None
        totals = self.record.service(service.name)
        try:
            taken = await self.pool.take(
                stream,
                client,
                log,
                max_pending=config.max_pending_clients,
                pending_timeout=config.pending_timeout,
                refusals=self._refusals,
            )
            if isinstance(taken, str):  # logged by take
                if taken != "left":
                    totals.failed(taken)
                return
            channel = taken
            try:
                first = _first_bytes(stream)
            except TransportError as exc:  # reset before its first byte: the channel stays idle
                self.pool.add(channel, config.max_pool_size, reused=True)
                channel = None
                duration = time.monotonic() - record.started
                log_closed(log, client, 0, 0, duration, f"client {exc.reason}", normal=False)
                return
            server = record.server or service.public or stream.local_address()
            start = wire.Start(record.conn, service.name, client, server)
            await channel.send_message(start, then=first)
            sent, first = max(0, len(first) - wire.HEADER_SIZE), b""  # not kept while it runs
            totals.started(time.monotonic() - record.started)
            log.debug("client %s started on a data channel", client)
            record.result = RelayResult(sent=sent)  # filled in even if cancelled
            await relay(stream, channel, "client", record.result, keep_channel=self.reuse)
        except TransportError as exc:
            log.warning("client %s: data channel failed before relaying: %s", client, exc)
        except asyncio.CancelledError:
            if record.result is None:  # the session ended while the client waited
                totals.failed("no_agent")
            raise
        except Exception:
            log.exception("unexpected error relaying client %s", client)
        finally:
            if (r := record.result) is not None:  # the relay closed both ends, however it ended
                log_closed(log, client, r.sent, r.received, r.duration, r.how, normal=r.normal)
            else:  # never relayed: neither end may look clean
                stream.abort()
                if channel is not None:
                    channel.abort()
        if record.result is not None and record.result.channel_kept:
            assert channel is not None and self._group is not None
            # Its own task: the client is gone, its slot and access counts free at once.
            spawn(self._group, channel.stream, self._reuse(channel, record.conn, log))

    async def _reuse(self, channel: Channel, conn: int, log: ContextLogger) -> None:
        """After a clean end, the end handshake; then the channel waits for the next client."""
        try:
            async with asyncio.timeout(FINISH_TIMEOUT):
                await channel.finish(conn)
        except (TransportError, ProtocolError, ConnectionClosed, TimeoutError) as exc:
            log.debug("data channel not reused: %s", exc or "no Finished in time")
            channel.close()  # gently: the agent may still be handing its service the last bytes
            return
        except Exception:  # a bug: this channel only, never its session
            log.exception("unexpected error finishing a data channel")
            channel.abort()
            return
        except BaseException:
            channel.abort()
            raise
        if self.goodbye is None and channel.is_idle_and_open():
            self.record.channel_reuses += 1
            self.pool.add(channel, self._config().max_pool_size, reused=True)
        else:  # the session drains, or the agent closed it or sent more than its Finished
            channel.close()


def sessions_of(holder: object) -> list[GatewaySession]:
    """The sessions serving a port's holder (``Ports.holders``): a session, or a group's
    members'."""
    if isinstance(holder, GatewaySession):
        return [holder]
    if isinstance(holder, Group):
        return [m.session for m in holder.members if isinstance(m, _Member)]
    return []


def _first_bytes(stream: ClientStream) -> bytes | memoryview:
    """What the client sent already, as a DATA frame the Start carries in the same write
    (most clients speak first: one write and one wakeup less on each side); empty if
    nothing came yet, or its EOF, which the relay then reads again. Raises TransportError
    (a reset, which a read reports once: the relay would take what follows for an EOF)."""
    frame = bytearray(wire.HEADER_SIZE + FIRST_READ)
    try:
        n = stream.try_receive_into(memoryview(frame)[wire.HEADER_SIZE :])
    except WouldBlock:
        return b""
    if n == 0:
        return b""
    wire.pack_data_header(frame, n)
    return memoryview(frame)[: wire.HEADER_SIZE + n]


async def accept(
    listener: Listener,
    handle: Callable[[SocketStream, str], None],
    log: logging.Logger | logging.LoggerAdapter[Any],
    where: str,
) -> None:
    """Pass every connection to ``handle`` until cancelled; errors logged, throttled."""
    errors = Throttle(WARNING_INTERVAL)

    def on_error(exc: TransportError) -> None:
        errors.log(log, logging.ERROR, time.monotonic(), "accept failed on %s: %s", where, exc)

    await listener.accept_forever(handle, on_error)


def spawn(
    group: asyncio.TaskGroup, stream: Stream, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Start a connection's task, or reset the connection if its owner is ending (a task
    cancelled before its first step never runs its own cleanup, so reset it then)."""
    try:
        task = group.create_task(coro)
    except RuntimeError:  # the task group is shutting down
        coro.close()
        stream.abort()
        return None
    task.add_done_callback(lambda t: stream.abort() if t.cancelled() else None)
    return task
