"""One connection of the agent to one gateway: an :class:`AgentSession` opens the control
channel, registers the services, sends heartbeats (ending when replies stop), keeps the pool of
data channels, serves each client a Start names, and drains on goodbye; a reconnect is a new
session. The :class:`Dialer` opens and authenticates channels to one gateway and keeps what
outlives a session (the derived credential, the TLS session that data channels resume). A session
counts into the agent's :class:`~tunnelgate.stats.AgentTotals` as connections start and end (its
gateway's record, each service's totals), and times its heartbeats' round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from tunnelgate import __version__, credentials, proxy_protocol, tls
from tunnelgate.address import Address, parse_address
from tunnelgate.agent import health
from tunnelgate.agent.pool import DataChannels, Demand, PoolStatistics
from tunnelgate.channel import Channel
from tunnelgate.config import AgentConfig, GatewayTarget, ServiceConfig
from tunnelgate.control import end_when_drained, receive_control
from tunnelgate.errors import (
    AuthenticationError,
    ConnectionClosed,
    RemoteProtocolError,
    SessionOver,
    TransportError,
)
from tunnelgate.logs import ContextLogger, log_closed
from tunnelgate.protocol.session import Side
from tunnelgate.protocol.wire import (
    AGENT_REACH_FAILURE,
    PROTOCOL_VERSION,
    Bye,
    Challenge,
    Health,
    Hello,
    Ping,
    Pong,
    PoolDiscarded,
    PoolRequest,
    Refused,
    Register,
    Registered,
    ServiceRequest,
    Start,
    Welcome,
)
from tunnelgate.relay import RelayResult, abort_channel, relay
from tunnelgate.stats import AgentTotals
from tunnelgate.transport import SocketStream, Stream, TLSSession, TLSStream, connect

BYE_TIMEOUT: Final = 0.5  # for telling the gateway the agent is going away
SOFTWARE: Final = f"tunnelgate {__version__}"  # said in every Hello
MAX_PINGS_AWAITED: Final = 16  # heartbeats whose Pong may still come, for the round trip
CLOSED_ON_REQUEST: Final = "reset: closed on request"
MAX_HEALTH_REASON: Final = 512  # characters of a failed health check's reason sent
# Errors of a connect that mean no route to the host, for the "unreachable" reason.
UNREACHABLE: Final = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)


@dataclass(frozen=True)
class ExposedService:
    name: str
    address: Address  # the gateway's bind address and port
    local: Address


@dataclass(frozen=True)
class ConnectionStatistics:
    conn: int  # the gateway's id for it
    client: str
    service: str
    duration: float
    relaying: bool  # False while the service is being dialed
    up: int  # bytes from the client so far
    down: int  # bytes to the client so far


@dataclass(eq=False)
class _Connection:
    conn: int
    client: str
    service: str
    started: float = field(default_factory=time.monotonic)
    result: RelayResult | None = None  # once relaying: its counts move while it runs
    closing: bool = False  # reset on request

    def statistics(self, now: float) -> ConnectionStatistics:
        r, duration = self.result, now - self.started
        # The agent's local stream is the service: what it received came from the client.
        up, down, relaying = (r.received, r.sent, True) if r is not None else (0, 0, False)
        return ConnectionStatistics(
            self.conn, self.client, self.service, duration, relaying, up, down
        )


@dataclass(frozen=True)
class SessionStatistics:
    id: str
    gateway: Address  # the gateway's, or the own address of its worker this session is with
    duration: float
    services: tuple[ExposedService, ...]
    pool: PoolStatistics | None  # None until the session runs
    connected_at: float  # wall-clock seconds when the gateway welcomed it; 0: not yet
    rtt: float | None  # seconds, the last heartbeat's round trip; None: none yet
    connections: tuple[ConnectionStatistics, ...]  # the client connections open now
    worker: int | None = None  # the gateway's worker this session is with, if it has several


class Dialer:
    """Opens channels to one gateway (``target``; at ``address``, its own or, for a gateway of
    several workers, a worker's): connect, TLS checked as the target says, and the token's
    proof."""

    def __init__(
        self,
        config: AgentConfig,
        target: GatewayTarget,
        log: ContextLogger,
        proofs: Proofs | None = None,
    ) -> None:
        self.config = config
        self.target = target
        self.log = log
        self.address = target.address
        tls_args = (target.ca, target.fingerprint, config.cert, config.key)
        self._context = tls.client_context(*tls_args) if config.tls else None
        self._tls_session: TLSSession | None = None  # the control channel's, for data
        self.proofs = proofs or Proofs(config)  # the agent's, shared by its gateways

    def to(self, address: Address, log: ContextLogger) -> Dialer:
        """A dialer of the same gateway at another address (a worker's own), sharing the
        derived credential and, for data channels, the TLS session to resume."""
        other = copy.copy(self)
        other.address, other.log = address, log
        return other

    async def open(self, role: str, session: str = "") -> Channel:
        """Connect, secure, and prove the token: a control or data channel."""
        config = self.config
        tcp = await connect(self.address, config.connect_timeout)
        stream: Stream = tcp  # TLS goes on it; resetting either resets the connection
        try:
            async with asyncio.timeout(config.handshake_timeout):
                stream = await self.secure(tcp, role)
                channel = Channel(stream, Side.AGENT)
                await self.introduce(channel, role, session)
                return channel
        except TimeoutError:
            stream.abort()
            raise TransportError(self.timed_out()) from None
        except BaseException:
            stream.abort()
            raise

    def timed_out(self) -> str:
        """What a handshake that timed out says, with a hint if TLS may be the cause."""
        hint = " (does the gateway use TLS? this agent runs with --no-tls)"
        return f"handshake with {self.address} timed out" + ("" if self.config.tls else hint)

    async def secure(self, tcp: SocketStream, role: str) -> Stream:
        """``tcp`` with TLS on it and the gateway's certificate checked (``tcp`` itself
        with --no-tls). Raises PeerVerificationError, TransportError; the caller resets
        the connection on any error, and bounds the time."""
        target = self.target
        if (context := self._context) is None:
            return tcp
        hostname = None if target.fingerprint else target.address.host
        resume = self._tls_session if role == "data" else None
        stream = TLSStream(
            tcp, context, server_side=False, server_hostname=hostname, session=resume
        )
        await stream.handshake()
        if resume is not None:
            self.log.debug(
                "data channel: TLS session %s", "resumed" if stream.session_reused else "new"
            )
        if target.fingerprint:
            tls.check_fingerprint(stream.peer_certificate(), target.fingerprint)
        return stream

    async def introduce(self, channel: Channel, role: str, session: str = "") -> None:
        """Receive the gateway's Challenge and send the Hello with the token's proof."""
        challenge = await channel.receive()
        if role == "control" and isinstance(channel.stream, TLSStream):
            # The ticket came before the Challenge: data channels resume it.
            self._tls_session = channel.stream.session
        if isinstance(challenge, Refused):
            raise refusal(challenge)
        assert isinstance(challenge, Challenge)
        channel.nonce = challenge.nonce  # later proofs on the channel are bound to it too
        proof = await self.proofs.make(challenge.nonce, role, session)
        # A control channel: this agent takes data channels back after a clean end (reuse), and
        # holds a session with each worker of a gateway that has several (workers).
        control = role == "control"
        version, name, software = PROTOCOL_VERSION, self.config.name, SOFTWARE
        hello = Hello(version, role, name, proof, session, software, control, control)  # type: ignore[arg-type]
        await channel.send_message(hello)


class Proofs:
    """The proofs of the agent's token and of its group secrets, each from a credential
    derived once for all its gateways and sessions (scrypt: slow, and 16 MiB while it runs)."""

    def __init__(self, config: AgentConfig) -> None:
        self._token, self._name = config.token, config.name
        self._credentials: dict[tuple[bytes, str], asyncio.Future[credentials.Credential]] = {}

    async def make(
        self, nonce: bytes, role: str, session: str, secret: tuple[bytes, str] | None = None
    ) -> bytes:
        """A proof for this channel (``nonce``) and ``role``: of the token (a Hello's, empty
        without a token: a certificate-only agent), or of ``secret`` (a group's secret and
        name, whose credential is salted with the group's name)."""
        key = secret or (self._token, self._name)
        if not key[0]:
            return b""
        future = self._credentials.get(key)
        if future is None or (future.done() and (future.cancelled() or future.exception())):
            derive = asyncio.to_thread(credentials.derive, *key)
            future = self._credentials[key] = asyncio.ensure_future(derive)
        credential = await asyncio.shield(future)
        return credentials.make_proof(credential, nonce, role, self._name, session)


class AgentSession:
    """One session with the dialer's gateway, from its control channel to its end; ``on_ready``
    is called once the registration is answered, ``chosen_ports`` (the agent's) outlives it.
    ``on_welcome`` sees the session once welcomed, and may end it by raising. ``fixed_ports``:
    an any-port service asks only for the port another session got (one of several workers)."""

    def __init__(
        self,
        dialer: Dialer,
        chosen_ports: dict[str, int],
        on_ready: Callable[[], None],
        totals: AgentTotals,
        on_welcome: Callable[[AgentSession], None] | None = None,
        fixed_ports: bool = False,
    ) -> None:
        self.config = config = dialer.config
        self.dialer = dialer
        self.log = dialer.log
        self.id: str | None = None  # once welcomed
        self.address = dialer.address  # the gateway's; its worker's own, once welcomed by one
        # A gateway of several workers: every worker's own control address, and this one's.
        self.workers: tuple[str, ...] = ()
        self.worker: int | None = None
        self.services: dict[str, ExposedService] = {}
        self.serving: set[asyncio.Future[None]] = set()  # one per client connection carried
        self.started = time.monotonic()
        self.connected_at = 0.0  # wall clock, once welcomed
        self.rtt: float | None = None
        self._totals = totals  # the agent's, across its sessions
        self.record = totals.gateway(str(dialer.target.address))
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        self._pings: dict[int, float] = {}  # seq → when sent, until its Pong
        self._on_ready = on_ready
        self._on_welcome = on_welcome
        self._fixed_ports = fixed_ports
        self._chosen_ports = chosen_ports
        self._by_name = {s.name: s for s in config.services}
        self._group_proofs: dict[str, bytes] = {}  # by service name, for this session
        self._checking: set[str] = set()  # grouped services whose health is being checked
        self._control: Channel | None = None
        self._channels: DataChannels | None = None
        self._said_bye = False
        self._goodbye: str | None = None  # the gateway's Bye: open connections finish first

    def statistics(self) -> SessionStatistics:
        pool = None if self._channels is None else self._channels.statistics()
        now = time.monotonic()
        return SessionStatistics(
            self.id or "",
            self.address,
            now - self.started,
            tuple(self.services.values()),
            pool,
            self.connected_at,
            self.rtt,
            tuple(c.statistics(now) for c in self._connections.values()),
            self.worker,
        )

    def close_connection(self, conn: int) -> bool:
        """Reset one client connection, by its id; False if this session has none such."""
        for task, record in self._connections.items():
            if record.conn == conn:
                self.log.warning("closing client %s (conn %d) on request", record.client, conn)
                record.closing = True
                task.cancel()
                return True
        return False

    async def run(self) -> str:
        """Run the session to its end; return why it ended. Raises AuthenticationError (refused),
        TimeoutError (silent gateway), TransportError, ProtocolError or ConnectionClosed."""
        config = self.config
        channel = await self.dialer.open("control")
        try:
            async with asyncio.timeout(config.handshake_timeout):
                welcome = await channel.receive()
            if isinstance(welcome, Refused):
                raise refusal(welcome)
            assert isinstance(welcome, Welcome)
            self.id = welcome.session
            self.connected_at = time.time()
            self.record.connected(self.connected_at)
            self._control = channel
            data_dialer, of = self.dialer, ""
            if welcome.workers:  # data channels go to this session's worker, at its own port
                if welcome.worker >= len(welcome.workers):
                    count = len(welcome.workers)
                    raise RemoteProtocolError(f"welcome names worker {welcome.worker} of {count}")
                self.workers, self.worker = tuple(welcome.workers), welcome.worker
                self.address = worker_address(self.dialer.address, self.workers[self.worker])
                self.log = self.log.bind(worker=self.worker)
                of = f" (worker {self.worker} of {len(self.workers)}, at {self.address})"
            self.log = self.log.bind(session=welcome.session)
            if self.workers:
                data_dialer = self.dialer.to(self.address, self.log)
            if self._on_welcome is not None:
                self._on_welcome(self)
            self.log.info("connected to gateway %s%s", self.dialer.address, of)
            await self._prove_groups(channel.nonce)
            requests = [
                self._request(s, s.port or self._chosen_ports.get(s.name, 0))
                for s in config.services
            ]
            await channel.send_message(Register(requests))
            async with asyncio.TaskGroup() as group:
                channels = self._channels = DataChannels(
                    demand=Demand(config.pool_size, welcome.max_pool_size, time.monotonic()),
                    group=group,
                    control=channel,
                    open_channel=lambda: data_dialer.open("data", welcome.session),
                    serve=self._serve,
                    reuse=welcome.reuse,
                    serving=self.serving,
                    log=self.log,
                )
                group.create_task(self._heartbeat(channel, welcome.heartbeat_interval))
                group.create_task(channels.run())
                raise SessionOver(await self._control_loop(channel, welcome, channels))
        except* SessionOver as caught:
            reason = str(caught.exceptions[0])
        except* Exception as caught:
            # One session-ending error is enough; a second one is its echo.
            raise caught.exceptions[0] from None
        finally:
            self._control = None
            channel.abort()
            if self.id is not None:
                self.record.disconnected(time.time())
        return reason

    async def say_bye(self) -> None:
        """Tell the gateway the agent is going away (no new clients, ports freed)."""
        if self._control is not None and not self._said_bye:
            self._said_bye = True
            with contextlib.suppress(TransportError, TimeoutError):
                async with asyncio.timeout(BYE_TIMEOUT):
                    await self._control.send_message(Bye("agent shutting down"))

    def stop_opening(self) -> None:
        if self._channels is not None:
            self._channels.stop()

    def _draining(self) -> str | None:  # why, if either side said goodbye
        return self._goodbye or ("said goodbye" if self._said_bye else None)

    async def _heartbeat(self, channel: Channel, interval: float) -> None:
        for seq in range(2**62):
            await asyncio.sleep(interval)
            self._pings[seq] = time.monotonic()
            self._pings.pop(seq - MAX_PINGS_AWAITED, None)  # its Pong is not coming
            await channel.send_message(Ping(seq))

    def _answered(self, pong: Pong) -> None:
        sent = self._pings.pop(pong.seq, None)
        if sent is not None:
            self.rtt = time.monotonic() - sent
            self.record.answered(self.rtt)

    async def _control_loop(self, channel: Channel, welcome: Welcome, pool: DataChannels) -> str:
        while True:
            message = await receive_control(
                channel, welcome.heartbeat_timeout, self._draining, pool.serving
            )
            if isinstance(message, str):
                return message
            if isinstance(message, Registered):
                if retry := self._registered(message):
                    await channel.send_message(Register(retry))
                for service in self._to_check(message):
                    pool.group.create_task(self._check_health(channel, service))
            elif isinstance(message, Pong):
                self._answered(message)
            elif isinstance(message, PoolRequest):
                pool.request(message.count)
            elif isinstance(message, PoolDiscarded):
                pool.discarded(message.count)
            elif isinstance(message, Bye):
                goodbye = self._goodbye = f"gateway said goodbye: {message.reason}"
                pool.stop()
                if not pool.serving:
                    return goodbye
                self.log.info("%s; %d connection(s) finishing", goodbye, len(pool.serving))
                pool.group.create_task(end_when_drained(pool.serving, goodbye))

    def _registered(self, message: Registered) -> list[ServiceRequest]:
        """Record the gateway's answers; return the any-port services whose former port is taken."""
        retry = []
        for result in message.results:
            name = result.name
            if (service := self._by_name.get(name)) is None:
                raise RemoteProtocolError(f"registration result for unknown service {name!r}")
            moving = not self._fixed_ports  # else other workers' sessions hold the port
            if not result.ok and service.port == 0 and name in self._chosen_ports and moving:
                lost = self._chosen_ports.pop(name)
                self.log.warning(
                    "service %s cannot have its former port %d again (%s); asking for any port",
                    name,
                    lost,
                    result.error,
                )
                retry.append(self._request(service, 0))
            elif result.ok:
                if service.group and not result.group:
                    self.log.error(
                        "service %s: the gateway %s does not know agent groups; it exposes the "
                        "service on a port of its own, outside group %s",
                        name,
                        self.dialer.address,
                        service.group,
                    )
                if service.port == 0:
                    self._chosen_ports[name] = result.port
                address = Address(result.bind, result.port)
                self.services[name] = ExposedService(name, address, service.local)
                self.log.info(
                    "service %s exposed at gateway port %d (%s) -> %s",
                    name,
                    result.port,
                    address,
                    service.local,
                )
            else:
                self.log.error("service %s not exposed: %s", name, result.error)
        if not retry:
            self._on_ready()
        return retry

    def _to_check(self, message: Registered) -> list[ServiceConfig]:
        """The services that joined a group just now (the gateway knows groups: it says which):
        their health is checked from now on, unless they say "none"."""
        joined = [self._by_name[r.name] for r in message.results if r.ok and r.group]
        fresh = [s for s in joined if s.health_check != "none" and s.name not in self._checking]
        self._checking.update(s.name for s in fresh)
        return fresh

    def _request(self, service: ServiceConfig, port: int) -> ServiceRequest:
        """What the Register asks for ``service`` (into its group, with the proof)."""
        proof = self._group_proofs.get(service.name, b"")
        return ServiceRequest(service.name, service.bind, port, service.group, proof)

    async def _prove_groups(self, nonce: bytes) -> None:
        """The proofs of the group secret, one per grouped service, bound to the control
        channel's Challenge (``nonce``) and the agent's name."""
        for service in self.config.services:
            if service.group:
                self._group_proofs[service.name] = await self.dialer.proofs.make(
                    nonce, "group", service.group, (service.group_secret, service.group)
                )

    async def _check_health(self, channel: Channel, service: ServiceConfig) -> None:
        """Check a grouped service every ``health_interval``; tell the gateway each change (it
        takes a member healthy until told otherwise)."""
        healthy = True
        while True:
            why = await health.check(service, self.config.connect_timeout)
            if (why is None) != healthy:
                healthy = why is None
                if healthy:
                    self.log.info("service %s is healthy again", service.name)
                else:
                    self.log.warning("service %s failed its health check: %s", service.name, why)
                reason = (why or "")[:MAX_HEALTH_REASON]
                await channel.send_message(Health(service.name, healthy, reason))
            await asyncio.sleep(service.health_interval)

    async def _serve(self, channel: Channel, start: Start, reuse: bool) -> bool:
        """Carry one client connection to its service; True if it ended cleanly and ``reuse``
        kept the channel open for its end handshake."""
        log = self.log.bind(conn=start.conn, service=start.service)
        service = self._by_name.get(start.service)
        if service is None:
            log.warning("gateway started unknown service %r", start.service)
            await abort_channel(channel, f"unknown service {start.service!r}")
            return False
        task = asyncio.current_task()
        assert task is not None
        record = self._connections[task] = _Connection(start.conn, start.client, service.name)
        totals = self._totals.service(service.name)
        try:
            try:
                stream = await reach(service, start, self.config.connect_timeout, log)
            except TransportError as exc:
                totals.failed(dial_error_reason(exc))
                log.warning("client %s: %s", start.client, exc)
                await abort_channel(channel, f"{AGENT_REACH_FAILURE}{exc}")
                return False
            totals.started(time.monotonic() - record.started)
            r = record.result = RelayResult()  # filled in even if the relay is cancelled
            try:
                await relay(stream, channel, "service", r, keep_channel=reuse)
            finally:
                if record.closing:
                    r.how = CLOSED_ON_REQUEST
                log_closed(
                    log, start.client, r.received, r.sent, r.duration, r.how, normal=r.normal
                )
        finally:  # its bytes move from the open connections to the totals in one step
            del self._connections[task]
            if (result := record.result) is not None:
                totals.ended(result.received, result.sent)
        return record.result is not None and record.result.channel_kept


async def reach(
    service: ServiceConfig, start: Start, timeout: float, log: ContextLogger
) -> SocketStream:
    """The connection to ``service``, set to reset unless closed cleanly, with its PROXY protocol
    header sent if it wants one (before any client byte, outside the relay's counts)."""
    stream = await connect(service.local, timeout)
    stream.reset_unless_closed_cleanly()
    if not service.proxy_protocol:
        return stream
    header = proxy_protocol.header(service.proxy_protocol, start.client, start.server)
    try:
        async with asyncio.timeout(timeout):
            await stream.send(header)
    except (TransportError, TimeoutError) as exc:
        stream.abort()
        why = str(exc) or f"timed out after {timeout:g} s"
        code = exc.errno if isinstance(exc, TransportError) else errno.ETIMEDOUT
        raise TransportError(
            f"cannot send the PROXY protocol header to {service.local}: {why}", code
        ) from None
    except BaseException:
        stream.abort()
        raise
    log.debug(
        "PROXY protocol v%d header sent to %s: client=%s server=%s",
        service.proxy_protocol,
        service.local,
        start.client,
        start.server or "?",
    )
    return stream


def worker_address(gateway: Address, announced: str) -> Address:
    """Where to reach a worker the gateway announced as ``host:port``: at the worker's own port,
    on the host this agent reaches the gateway at. That host is the one the gateway's certificate
    was checked for and the one the network routes here; the worker's may be a wildcard, or a
    private address behind a NAT. Raises RemoteProtocolError if ``announced`` has no port."""
    try:
        port = parse_address(announced).port
    except ValueError as exc:
        raise RemoteProtocolError(f"welcome names worker address {announced!r}: {exc}") from None
    return Address(gateway.host, port)


def dial_error_reason(exc: TransportError) -> str:
    """Why a connect failed, as one of :data:`~tunnelgate.stats.DIAL_ERROR_REASONS`."""
    if exc.errno == errno.ECONNREFUSED:
        return "refused"
    if exc.errno == errno.ETIMEDOUT:
        return "timeout"
    return "unreachable" if exc.errno in UNREACHABLE else "other"


def refusal(message: Refused) -> Exception:
    if message.code in ("auth", "version"):
        return AuthenticationError(message.reason)
    return ConnectionClosed("closed", f"gateway refused: {message.reason}")
