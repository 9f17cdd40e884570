"""One authenticated agent on the gateway: a :class:`GatewaySession`.

A session owns its control channel and everything the agent has on the
gateway: its services (public listeners), its pool of idle data channels, and
the task of every client connection it carries. It runs the control loop
(registration, heartbeats, pool requests, goodbye), admits and serves
clients, and drains. When it ends, all of it ends with it: listeners close,
ports are free, pooled channels are aborted and clients see a reset.

What the session shares with the rest of the gateway (the configuration, the
public ports, the access rules, connection ids) it is handed when made; it
knows nothing of the other sessions.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from tunnelgate.access import Gate, Refusal, admit, client_ip
from tunnelgate.address import Address
from tunnelgate.channel import Channel
from tunnelgate.config import AgentPolicy, GatewayConfig
from tunnelgate.control import end_when_drained, receive_control
from tunnelgate.errors import (
    ConnectionClosed,
    ProtocolError,
    SessionOver,
    TransportError,
)
from tunnelgate.gateway.admission import WARNING_INTERVAL, ClientGates, allowed_binds
from tunnelgate.gateway.pool import ChannelPool, PoolStatistics
from tunnelgate.gateway.ports import Ports
from tunnelgate.logs import ContextLogger, Throttle, log_closed
from tunnelgate.protocol.wire import (
    Bye,
    PoolRelease,
    Register,
    Registered,
    ServiceRequest,
    ServiceResult,
    Start,
    Welcome,
)
from tunnelgate.relay import RelayResult, relay
from tunnelgate.transport import Listener, SocketStream, Stream, open_listener

logger = logging.getLogger(__package__)

KILL_TIMEOUT: Final = 2.0  # for a replaced session's own cleanup (no network waits in it)


@dataclass
class _Service:
    name: str
    address: Address
    listener: Listener
    bind: str  # as the agent asked for it (its policy's allow_bind lists names like this)
    gates: list[Gate] = field(default_factory=list)  # access rules a client must pass
    accepting: asyncio.Task[None] | None = None

    @functools.cached_property
    def public(self) -> str:
        """The address clients reach, if the listener's own says it (not a wildcard)."""
        wildcard = ipaddress.ip_address(self.address.host).is_unspecified
        return "" if wildcard else str(self.address)


@dataclass
class _Client:
    """One client connection the session carries."""

    conn: int
    client: str
    service: str
    started: float = field(default_factory=time.monotonic)
    result: RelayResult | None = None  # once relaying: its counts move while it runs


@dataclass(frozen=True)
class ClientStatistics:
    conn: int
    client: str
    service: str
    duration: float
    relaying: bool
    up: int  # bytes from the client so far
    down: int  # bytes to the client so far


@dataclass(frozen=True)
class ServiceStatistics:
    name: str
    address: Address
    clients: int


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


class GatewaySession:
    """One agent's session: its control loop, services, clients, pool and drain."""

    def __init__(
        self,
        *,
        agent: str,
        peer: str,
        policy: AgentPolicy,
        key: bytes,
        channel: Channel,
        config: Callable[[], GatewayConfig],
        ports: Ports,
        gates: ClientGates,
        conn_ids: Iterator[int],
        session_id: str,
        on_drain: Callable[[GatewaySession], None],
    ) -> None:
        self.id = session_id
        self.agent = agent
        self.peer = peer
        self.policy = policy
        self.key = key  # the stored key its proof matched (b"": its certificate alone)
        self.channel = channel
        self.log = ContextLogger(logger, session=session_id, agent=agent)
        self.services: dict[str, _Service] = {}
        self.pool = ChannelPool(channel, self.log)
        self.clients: set[asyncio.Task[None]] = set()  # being served (wait_relays waits on it)
        self.goodbye: str | None = None  # why it is draining: no new clients, open ones finish
        self.told_bye = False  # the gateway said Bye to the agent
        self.started = time.monotonic()
        self._config = config
        self._ports = ports
        self._gates = gates
        self._conn_ids = conn_ids
        self._on_drain = on_drain  # the agent's name is free again for a new session
        self._by_task: dict[asyncio.Task[None], _Client] = {}
        self._refusals = Throttle(WARNING_INTERVAL)
        self._task: asyncio.Task[Any] | None = None
        self._group: asyncio.TaskGroup | None = None

    @property
    def config(self) -> GatewayConfig:
        return self._config()

    @property
    def running(self) -> bool:
        """True once the session accepts data channels (its task group runs)."""
        return self._group is not None

    def statistics(self) -> SessionStatistics:
        now = time.monotonic()
        by_service: dict[str, int] = {}
        clients = []
        for record in self._by_task.values():
            by_service[record.service] = by_service.get(record.service, 0) + 1
            result = record.result
            clients.append(
                ClientStatistics(
                    record.conn,
                    record.client,
                    record.service,
                    now - record.started,
                    result is not None,
                    result.sent if result is not None else 0,
                    result.received if result is not None else 0,
                )
            )
        return SessionStatistics(
            self.id,
            self.agent,
            self.peer,
            now - self.started,
            self.goodbye is not None,
            tuple(
                ServiceStatistics(s.name, s.address, by_service.get(s.name, 0))
                for s in self.services.values()
            ),
            self.pool.statistics(),
            tuple(clients),
        )

    # --- life cycle ---------------------------------------------------------

    async def run(self) -> tuple[str, int]:
        """Welcome the agent and serve it until the session ends; return why
        and the level to log it at. Raises CancelledError when killed."""
        self._task = asyncio.current_task()
        config = self.config
        welcome = Welcome(
            self.id, config.heartbeat_interval, config.heartbeat_timeout, config.max_pool_size
        )
        reason, level = "ended", logging.INFO
        try:
            await self.channel.send_message(welcome)
            self.log.info("session started from %s", self.peer)
            async with asyncio.TaskGroup() as group:
                self._group = group
                raise SessionOver(await self._control_loop())
        except* SessionOver as caught:
            reason = str(caught.exceptions[0])
        except* (ProtocolError, TransportError, ConnectionClosed) as caught:
            reason, level = str(caught.exceptions[0]), logging.WARNING
        except* TimeoutError:
            reason, level = "no heartbeat within the deadline", logging.WARNING
        return reason, level

    async def kill(self) -> None:
        """End the session now without waiting on its peer.

        Only this process's own cleanup is awaited (sockets are aborted, not
        drained), so a half-dead peer cannot delay it; afterwards its ports
        are free for whoever takes over.
        """
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=KILL_TIMEOUT)

    async def drain(self, reason: str) -> None:
        """Take no new clients: the listeners close and the ports are free
        again at once; open client connections go on."""
        if self.goodbye is not None:
            return
        self.goodbye = reason
        self._on_drain(self)
        accepting = {s.accepting for s in self.services.values() if s.accepting is not None}
        for task in accepting:
            task.cancel()
        if accepting:
            await asyncio.wait(accepting)
        self.release()

    def release(self) -> None:
        """Free the ports, close the listeners and the pool; safe to call twice."""
        self._ports.release(self)
        for service in self.services.values():
            service.listener.close()
        self.pool.discard()

    def add_data_channel(self, channel: Channel) -> None:
        """A data channel the agent opened for this session."""
        if self.goodbye is not None:  # draining: the agent stops opening them too
            channel.abort()
            return
        channel.conversation.accept_data_channel()
        self.pool.add(channel, self.config.max_pool_size)

    # --- the control channel ------------------------------------------------

    async def _control_loop(self) -> str:
        """Serve the agent's control messages until it leaves; return why."""
        channel = self.channel
        while True:
            timeout = self.config.heartbeat_timeout
            message = await receive_control(channel, timeout, lambda: self.goodbye, self.clients)
            if isinstance(message, str):
                return message
            if isinstance(message, Register):
                results = [self._expose(request) for request in message.services]
                await channel.send_message(Registered(results))
            elif isinstance(message, PoolRelease):
                self.pool.release(message.count)
            elif isinstance(message, Bye):
                reason = f"agent said goodbye: {message.reason}"
                await self.drain(reason)
                if not self.clients:
                    return reason
                self.log.info("%s; %d client connection(s) finishing", reason, len(self.clients))
                assert self._group is not None
                self._group.create_task(end_when_drained(self.clients, reason))

    # --- services -----------------------------------------------------------

    def services_outside(self, policy: AgentPolicy) -> str | None:
        """Why the services this session holds do not fit ``policy`` (after a
        reload), or None."""
        if len(self.services) > policy.max_services:
            return f"it has {len(self.services)} services; its policy allows {policy.max_services}"
        binds = allowed_binds(self.config, policy)
        for service in self.services.values():
            if not policy.allows_port(service.address.port) or service.bind not in binds:
                return f"its policy no longer allows service {service.name} on {service.address}"
        return None

    def _expose(self, request: ServiceRequest) -> ServiceResult:
        """Open the public listener for one service, if the policy allows it."""
        config = self.config
        policy = self.policy
        bind = request.bind or config.default_bind
        binds = allowed_binds(config, policy)

        def refuse(error: str) -> ServiceResult:
            self.log.warning("service %s refused: %s", request.name, error)
            return ServiceResult(request.name, False, error=error)

        if self.goodbye is not None:
            return refuse("the session is ending")
        if request.name in self.services:
            return refuse(f"service name {request.name!r} used twice")
        if len(self.services) >= policy.max_services:
            return refuse(f"this agent may expose at most {policy.max_services} services")
        if bind not in binds:
            return refuse(f"bind address {bind} is not allowed (allowed: {', '.join(binds)})")
        if request.port and not policy.allows_port(request.port):
            return refuse(f"port {request.port} is not allowed for this agent")
        if request.port and self._ports.holder(bind, request.port) is not None:
            return refuse(f"port {request.port} is held by another agent")
        if request.port:
            try:
                listener = open_listener(bind, request.port)
            except TransportError as exc:
                return refuse(str(exc))
        else:
            found = self._ports.listen_on_free_port(bind, policy)
            if found is None:
                return refuse("no free port among the ports allowed for this agent")
            listener = found
        address = listener.address
        service = _Service(
            request.name,
            address,
            listener,
            bind,
            self._gates.gates_for(config, policy, request.name),
        )
        self.services[request.name] = service
        self._ports.claim(bind, address.port, self)
        assert self._group is not None
        service.accepting = self._group.create_task(self._accept_clients(service))
        self.log.info("service %s exposed on %s", request.name, address)
        return ServiceResult(request.name, True, bind=address.host, port=address.port)

    def update_gates(self) -> None:
        """After a reload: every service's access rules as the config now says."""
        for service in self.services.values():
            service.gates = self._gates.gates_for(self.config, self.policy, service.name)

    # --- clients ------------------------------------------------------------

    async def _accept_clients(self, service: _Service) -> None:
        group = self._group
        assert group is not None

        def handle(stream: SocketStream, client: str) -> None:
            limit = self.policy.max_connections or self.config.max_connections
            if len(self.clients) >= limit:
                self._refusals.warning(
                    self.log,
                    time.monotonic(),
                    "refusing client %s on service %s: the agent has %d open connections "
                    "(max_connections)",
                    client,
                    service.name,
                    len(self.clients),
                )
                stream.abort()
                return
            gates = service.gates  # the ones admitted through are the ones released
            ip = client_ip(host_of(client)) if gates else None
            if gates:
                refusal = (
                    admit(gates, ip, time.monotonic())
                    if ip is not None
                    else Refusal(gates[0].rule.where, "address not understood")
                )
                if refusal is not None:
                    self._gates.warn_refused(
                        self.log, time.monotonic(), service.name, client, refusal
                    )
                    stream.abort()
                    return
            stream.reset_unless_closed_cleanly()
            record = _Client(next(self._conn_ids), client, service.name)
            task = spawn(group, stream, self._serve_client(service, stream, record))
            if task is not None:
                self.clients.add(task)
                self._by_task[task] = record
                task.add_done_callback(self._client_done)
            if ip is not None:
                if task is None:
                    _release(gates, ip)
                else:
                    task.add_done_callback(lambda _: _release(gates, ip))

        accept_errors = Throttle(WARNING_INTERVAL)

        def on_error(exc: TransportError) -> None:
            message = "accept failed on service %s: %s"
            accept_errors.log(self.log, logging.ERROR, time.monotonic(), message, service.name, exc)

        await service.listener.accept_forever(handle, on_error)

    def _client_done(self, task: asyncio.Task[None]) -> None:
        self.clients.discard(task)
        self._by_task.pop(task, None)

    async def _serve_client(self, service: _Service, stream: SocketStream, record: _Client) -> None:
        """Root of one client connection's task."""
        client = record.client
        log = self.log.bind(conn=record.conn, service=service.name)
        channel: Channel | None = None
        result: RelayResult | None = None  # once relaying; filled in even if cancelled
        config = self.config
        try:
            channel = await self.pool.take(
                stream,
                client,
                log,
                max_pending=config.max_pending_clients,
                pending_timeout=config.pending_timeout,
                refusals=self._refusals,
            )
            if channel is None:
                return  # logged by take
            server = service.public or stream.local_address()
            await channel.send_message(Start(record.conn, service.name, client, server))
            log.debug("client %s started on a data channel", client)
            result = record.result = RelayResult()
            await relay(stream, channel, "client", result)
        except TransportError as exc:
            log.warning("client %s: data channel failed before relaying: %s", client, exc)
        except Exception:
            log.exception("unexpected error relaying client %s", client)
        finally:
            if result is None:  # never relayed: neither end may look clean
                stream.abort()
                if channel is not None:
                    channel.abort()
            else:  # the relay closed both ends, however it ended
                log_closed(
                    log,
                    client,
                    result.sent,
                    result.received,
                    result.duration,
                    result.how,
                    normal=result.normal,
                )


def spawn(
    group: asyncio.TaskGroup, stream: Stream, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Start a connection's task, or reset the connection if its owner is ending.

    A task cancelled before its first step never runs its own cleanup, so the
    connection is reset here then; a task cancelled later has reset it already.
    """
    try:
        task = group.create_task(coro)
    except RuntimeError:  # the task group is shutting down
        coro.close()
        stream.abort()
        return None
    task.add_done_callback(lambda t: stream.abort() if t.cancelled() else None)
    return task


def host_of(address: str) -> str:
    """The host of a ``host:port`` (IPv6 without its brackets)."""
    return address.rpartition(":")[0].strip("[]")


def _release(gates: list[Gate], ip: Any) -> None:
    for gate in gates:
        gate.release(ip)
