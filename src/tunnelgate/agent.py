"""The agent: dials the gateway, exposes local services, relays their clients.

:meth:`Agent.run` is the reconnect loop: connect, run one session until it
ends, wait a backoff with full jitter, repeat. An authentication or gateway
verification failure ends the loop instead (it would fail the same way again).

A session is the control channel (registration, heartbeats with a reply
deadline, pool requests) plus a pool of pre-opened data channels, kept at
``pool_size`` idle ones, more while clients arrive faster than channels open
(see :class:`_Pool`), plus whatever the gateway asked for. A pooled channel
that receives :class:`~tunnelgate.protocol.Start` connects to the service and
becomes a relay; a replacement is opened at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

from tunnelgate import credentials, proxy_protocol, tls
from tunnelgate.channel import Channel
from tunnelgate.config import (
    Address,
    AgentConfig,
    ServiceConfig,
    format_address,
    load_agent_config,
)
from tunnelgate.errors import (
    AuthenticationError,
    ConnectionClosed,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
)
from tunnelgate.logs import ContextLogger
from tunnelgate.protocol import (
    PROTOCOL_VERSION,
    Bye,
    Challenge,
    Hello,
    Ping,
    Pong,
    PoolDiscarded,
    PoolRelease,
    PoolRequest,
    Refused,
    Register,
    Registered,
    ServiceRequest,
    Start,
    Welcome,
    check_allowed,
)
from tunnelgate.relay import RelayResult, abort_channel, relay, wait_relays
from tunnelgate.transport import (
    SocketStream,
    Stream,
    TLSContext,
    TLSSession,
    TLSStream,
    connect,
)

logger = logging.getLogger(__name__)

STABLE_SESSION: Final = 30.0  # a session this long resets the reconnect backoff
OPEN_RETRY_DELAY: Final = 1.0  # pause after a data channel failed to open
MAX_EXTRA_CHANNELS: Final = 1024
DEMAND_WINDOW: Final = 1.0  # seconds over which the rate of new clients is averaged
DEMAND_HEADROOM: Final = 2.0  # idle channels kept per channel in use while one opens
CLOSE_RETRY_INTERVAL: Final = 0.1
BYE_TIMEOUT: Final = 0.5  # for telling the gateway the agent is going away


class _SessionOver(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ExposedService:
    """A service as the gateway exposes it."""

    name: str
    address: Address  # the gateway's bind address and port
    local: Address


class Agent:
    """The private side. Use as ``async with Agent(...) as agent:``.

    Pass an :class:`AgentConfig`, or the keys of the agent's TOML file as
    keyword arguments (``Agent(gateway="gw:8080", token="…", expose=["0:localhost:80"])``).
    """

    def __init__(self, config: AgentConfig | None = None, **options: Any) -> None:
        if config is None:
            config, _ = load_agent_config(None, options)
        self.config = config
        self.services: dict[str, ExposedService] = {}
        self._tls_session: TLSSession | None = None  # the control channel's, for data channels
        self._credential: credentials.Credential | None = None  # derived from the token once
        self.session_id: str | None = None
        self._by_name: dict[str, ServiceConfig] = {s.name: s for s in config.services}
        # Ports the gateway chose for services asking for any port (0): asked
        # for again after a reconnect, so a service keeps its public address.
        self._chosen_ports: dict[str, int] = {}
        self._context: TLSContext | None = (
            tls.client_context(config.ca, config.fingerprint, config.cert, config.key)
            if config.tls
            else None
        )
        self._main: asyncio.Task[None] | None = None
        self._control: Channel | None = None  # while a session is up
        self._pool: _Pool | None = None  # while a session is up
        self._said_bye = False
        self._closing = False
        self._ready = asyncio.Event()
        self._log = ContextLogger(logger, agent=config.name)

    async def __aenter__(self) -> Agent:
        if not self.config.tls:
            self._log.warning(
                "TLS is OFF (--no-tls): relayed bytes cross the network in clear, "
                "and nothing proves the gateway is the one you meant"
            )
        self._main = asyncio.create_task(self.run(), name="agent")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop gracefully: tell the gateway (it takes no new clients for this
        agent and frees its ports), let open connections finish for up to
        ``drain_timeout`` seconds (default: the config's ``drain_timeout``),
        then close; connections still open at the deadline are reset."""
        if self._main is None:
            return
        if drain_timeout is None:
            drain_timeout = self.config.drain_timeout
        self._closing = True
        await self._say_bye()
        pool = self._pool
        if pool is not None:
            pool.stop()
            if pool.serving and drain_timeout > 0:
                self._log.info(
                    "draining: waiting up to %g s for %d connection(s) to finish",
                    drain_timeout,
                    len(pool.serving),
                )
                left = await wait_relays(pool.serving, drain_timeout)
                if left:
                    self._log.warning("drain deadline reached: resetting %d connection(s)", left)
                else:
                    self._log.info("drained: every connection finished")
        await self.aclose()

    async def _say_bye(self) -> None:
        if self._control is not None and not self._said_bye:
            self._said_bye = True
            with contextlib.suppress(TransportError, TimeoutError):
                async with asyncio.timeout(BYE_TIMEOUT):
                    await self._control.send_message(Bye("agent shutting down"))

    async def aclose(self) -> None:
        """Stop at once: end the session (open connections are reset) and stop reconnecting."""
        await self._say_bye()
        self._closing = True
        if self._main is not None:
            # A cancellation can be absorbed by a session's task group that is
            # already unwinding an error; ``_closing`` stops the loop then, and
            # cancelling again until the task is done covers the rest.
            while not self._main.done():
                self._main.cancel()
                await asyncio.wait({self._main}, timeout=CLOSE_RETRY_INTERVAL)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                self._main.result()
            self._main = None

    async def run_until_stopped(self) -> None:
        """Wait while the agent runs; raise its fatal error if it gives up.

        Cancelling this wait leaves the agent running, so that ``aclose()``
        can still say goodbye to the gateway."""
        assert self._main is not None, "use 'async with Agent(...)' first"
        await asyncio.shield(self._main)

    async def wait_ready(self, timeout: float | None = None) -> dict[str, ExposedService]:
        """Wait until services are registered; raise the fatal error if the agent gave up."""
        assert self._main is not None, "use 'async with Agent(...)' first"
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({ready, self._main}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            self._main.result()  # raises the fatal error
            raise ConnectionClosed("closed", "agent stopped")
        return dict(self.services)

    # --- the reconnect loop -------------------------------------------------

    async def run(self) -> None:
        """Keep a session up until cancelled. Raises AuthenticationError when refused."""
        config = self.config
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                reason = await self._session()
                level = logging.INFO
            except AuthenticationError:
                raise  # fatal: the caller reports it (the CLI logs it and exits 1)
            except TimeoutError:
                reason, level = "no heartbeat reply within the deadline", logging.WARNING
            except (TransportError, ProtocolError, ConnectionClosed) as exc:
                reason, level = str(exc), logging.WARNING
            finally:
                self._ready.clear()
                self.services.clear()
                self.session_id = None
            if self._closing:
                raise asyncio.CancelledError
            if time.monotonic() - started >= STABLE_SESSION:
                attempt = 0
            delay = random.uniform(0, min(config.reconnect_max, config.reconnect_min * 2**attempt))
            attempt += 1
            self._log.log(
                level,
                "%s; reconnecting to %s in %.1f s (attempt %d)",
                reason,
                config.gateway,
                delay,
                attempt,
            )
            await asyncio.sleep(delay)

    # --- connections --------------------------------------------------------

    async def _open(self, role: str, session: str = "") -> Channel:
        """Connect, secure, and prove the token: a control or data channel."""
        config = self.config
        tcp = await connect(config.gateway, config.connect_timeout)
        stream: Stream = tcp  # TLS goes on it; resetting either resets the connection
        try:
            async with asyncio.timeout(config.handshake_timeout):
                if self._context is not None:
                    hostname = None if config.fingerprint else config.gateway.host
                    resume = self._tls_session if role == "data" else None
                    tls_stream = stream = TLSStream(
                        tcp,
                        self._context,
                        server_side=False,
                        server_hostname=hostname,
                        session=resume,
                    )
                    await tls_stream.handshake()
                    if resume is not None:
                        reused = tls_stream.session_reused
                        self._log.debug(
                            "data channel: TLS session %s", "resumed" if reused else "new"
                        )
                    if config.fingerprint:
                        tls.check_fingerprint(tls_stream.peer_certificate(), config.fingerprint)
                channel = Channel(stream)
                challenge = check_allowed("agent_awaits_challenge", await channel.receive())
                if role == "control" and isinstance(stream, TLSStream):
                    # The ticket came before the Challenge: data channels resume it.
                    self._tls_session = stream.session
                if isinstance(challenge, Refused):
                    raise _refusal(challenge)
                assert isinstance(challenge, Challenge)
                proof = await self._proof(challenge.nonce, role, session)
                hello = Hello(PROTOCOL_VERSION, role, config.name, proof, session)  # type: ignore[arg-type]
                await channel.send_message(hello)
                return channel
        except TimeoutError:
            stream.abort()
            hint = " (does the gateway use TLS? this agent runs with --no-tls)"
            raise TransportError(
                f"handshake with {config.gateway} timed out" + ("" if config.tls else hint)
            ) from None
        except BaseException:
            stream.abort()
            raise

    async def _proof(self, nonce: bytes, role: str, session: str) -> bytes:
        """The Hello's proof; empty without a token (a certificate-only agent)."""
        if not self.config.token:
            return b""
        if self._credential is None:  # slow (scrypt), so once, and off the event loop
            self._credential = await asyncio.to_thread(
                credentials.derive, self.config.token, self.config.name
            )
        return credentials.make_proof(self._credential, nonce, role, self.config.name, session)

    async def _session(self) -> str:
        """One session, from connect to its end; returns why it ended."""
        config = self.config
        channel = await self._open("control")
        try:
            async with asyncio.timeout(config.handshake_timeout):
                welcome = check_allowed("agent_awaits_welcome", await channel.receive())
            if isinstance(welcome, Refused):
                raise _refusal(welcome)
            assert isinstance(welcome, Welcome)
            self.session_id = welcome.session
            self._control = channel
            log = self._log.bind(session=welcome.session)
            log.info("connected to gateway %s", config.gateway)
            await channel.send_message(
                Register(
                    [
                        ServiceRequest(s.name, s.bind, s.port or self._chosen_ports.get(s.name, 0))
                        for s in config.services
                    ]
                )
            )
            async with asyncio.TaskGroup() as group:
                pool = self._pool = _Pool(self, group, welcome, channel, log)
                group.create_task(self._heartbeat(channel, welcome.heartbeat_interval))
                group.create_task(pool.run())
                reason = await self._control_loop(channel, welcome, pool, log)
                raise _SessionOver(reason)
        except* _SessionOver as caught:
            reason = str(caught.exceptions[0])
        except* Exception as caught:
            # One session-ending error is enough; a second one is its echo.
            raise caught.exceptions[0] from None
        finally:
            self._control = None
            self._pool = None
            channel.abort()
        return reason

    async def _heartbeat(self, channel: Channel, interval: float) -> None:
        for seq in range(2**62):
            await asyncio.sleep(interval)
            await channel.send_message(Ping(seq))

    async def _control_loop(
        self, channel: Channel, welcome: Welcome, pool: _Pool, log: ContextLogger
    ) -> str:
        phase: Any = "agent_register_reply"
        goodbye: str | None = None  # the gateway's Bye: open connections finish first
        while True:
            try:
                async with asyncio.timeout(welcome.heartbeat_timeout):
                    event = await channel.receive()
            except (ConnectionClosed, TransportError) as exc:
                if goodbye is None and not self._said_bye:
                    raise
                # Draining: the relays run on their own data channels; let them end.
                await wait_relays(pool.serving)
                return f"{goodbye or 'said goodbye'}; then {exc}"
            message = check_allowed(phase, event)
            if isinstance(message, Ping):
                await channel.send_message(Pong(message.seq))
            elif isinstance(message, Registered):
                phase = "agent_control"
                retry = self._registered(message, log)
                if retry:
                    await channel.send_message(Register(retry))
            elif isinstance(message, PoolRequest):
                pool.request(message.count)
            elif isinstance(message, PoolDiscarded):
                pool.discarded(message.count)
            elif isinstance(message, Bye):
                goodbye = f"gateway said goodbye: {message.reason}"
                pool.stop()
                if not pool.serving:
                    return goodbye
                log.info("%s; %d connection(s) finishing", goodbye, len(pool.serving))
                pool.group.create_task(pool.end_when_drained(goodbye))

    def _registered(self, message: Registered, log: ContextLogger) -> list[ServiceRequest]:
        """Record the gateway's answers; return the services to ask for again.

        A service that asked for any port and lost the one it had before (now
        taken) is asked for again with any port.
        """
        retry = []
        for result in message.results:
            service = self._by_name.get(result.name)
            if service is None:
                raise RemoteProtocolError(
                    f"registration result for unknown service {result.name!r}"
                )
            if not result.ok and service.port == 0 and result.name in self._chosen_ports:
                lost = self._chosen_ports.pop(result.name)
                log.warning(
                    "service %s cannot have its former port %d again (%s); asking for any port",
                    result.name,
                    lost,
                    result.error,
                )
                retry.append(ServiceRequest(service.name, service.bind, 0))
            elif result.ok:
                if service.port == 0:
                    self._chosen_ports[result.name] = result.port
                address = Address(result.bind, result.port)
                self.services[result.name] = ExposedService(result.name, address, service.local)
                log.info(
                    "service %s exposed at gateway port %d (%s) -> %s",
                    result.name,
                    result.port,
                    address,
                    service.local,
                )
            else:
                log.error("service %s not exposed: %s", result.name, result.error)
        if not retry:
            self._ready.set()
        return retry

    async def _serve(self, channel: Channel, start: Start, log: ContextLogger) -> None:
        """Carry one client connection to its service. Root of the relay's task."""
        log = log.bind(conn=start.conn, service=start.service)
        service = self._by_name.get(start.service)
        if service is None:
            log.warning("gateway started unknown service %r", start.service)
            await abort_channel(channel, f"unknown service {start.service!r}")
            return
        try:
            stream = await self._reach(service, start, log)
        except TransportError as exc:
            log.warning("client %s: %s", start.client, exc)
            await abort_channel(channel, f"agent {exc}")
            return
        result = RelayResult()  # filled in even if the relay is cancelled
        try:
            await relay(stream, channel, "service", result)
        finally:
            log.log(
                logging.INFO if result.normal else logging.WARNING,
                "closed client=%s up=%d down=%d duration=%.3fs end=%s",
                start.client,
                result.received,
                result.sent,
                result.duration,
                result.how,
            )

    async def _reach(
        self, service: ServiceConfig, start: Start, log: ContextLogger
    ) -> SocketStream:
        """The connection to ``service``, set to reset unless closed cleanly, with
        its PROXY protocol header sent if it wants one: before any client byte,
        and outside the relay's counts. TransportError (connection reset) if not."""
        timeout = self.config.connect_timeout
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
            raise TransportError(
                f"cannot send the PROXY protocol header to {service.local}: {why}"
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


class _Pool:
    """Keeps idle data channels open, never more than the gateway's limit.

    The target is ``pool_size``, or more when clients arrive faster: the rate
    of Starts (averaged over ``DEMAND_WINDOW``) times the time a channel takes
    to open, times ``DEMAND_HEADROOM``, so a steady stream of new clients finds
    a channel ready. Channels the gateway asked for come on top.
    """

    def __init__(
        self,
        agent: Agent,
        group: asyncio.TaskGroup,
        welcome: Welcome,
        control: Channel,
        log: ContextLogger,
    ) -> None:
        self.agent = agent
        self.group = group
        self.control = control
        self.session = welcome.session
        self.limit = welcome.max_pool_size
        self.log = log
        self.idle = 0
        self.opening = 0
        self.extra = 0
        self.changed = asyncio.Event()
        self.rate = 0.0  # Starts per second, decaying
        self.rate_at = time.monotonic()
        self.open_time = 0.0  # seconds to open a channel, averaged
        self.releasing = 0  # idle channels the gateway was asked to close
        self.lost = 0  # idle channels the gateway discarded (a dead path): not ready
        self.serving: set[asyncio.Task[None]] = set()  # channels relaying a client
        self.stopped = False  # draining: open no more channels

    def stop(self) -> None:
        """Open no more data channels (the session is draining)."""
        self.stopped = True
        self.changed.set()

    async def end_when_drained(self, reason: str) -> None:
        """End the session once the last relayed connection has ended."""
        await wait_relays(self.serving)
        raise _SessionOver(reason)

    def request(self, count: int) -> None:
        self.extra = min(MAX_EXTRA_CHANNELS, self.extra + count)
        self.changed.set()

    def discarded(self, count: int) -> None:
        """The gateway closed ``count`` pooled channels whose path went silent.
        Which of ours they were cannot be told: count that many idle ones as
        lost until channels end unused, and open replacements now."""
        self.lost = min(self.idle, self.lost + count)
        self.log.info("the gateway found %d pooled data channel(s) dead; opening new ones", count)
        self.changed.set()

    @property
    def ready(self) -> int:
        """Idle channels that should still reach the gateway."""
        return max(0, self.idle - self.lost)

    def rate_now(self, now: float) -> float:
        """Starts per second, decayed since the last one."""
        return self.rate * math.exp((self.rate_at - now) / DEMAND_WINDOW)

    def started(self) -> None:
        """Count one client for the demand estimate."""
        now = time.monotonic()
        self.rate = self.rate_now(now) + 1 / DEMAND_WINDOW
        self.rate_at = now

    def target(self) -> int:
        rate = self.rate_now(time.monotonic())
        demand = round(rate * self.open_time * DEMAND_HEADROOM)  # 0 once demand has faded
        return min(self.limit, max(self.agent.config.pool_size, demand) + self.extra)

    async def run(self) -> None:
        """Open channels up to the target at once; release the surplus once
        demand has stayed below it for a while."""
        while not self.stopped:
            target = self.target()
            while self.ready + self.opening < target:
                self.opening += 1
                self.group.create_task(self._channel())
            surplus = self.ready - self.releasing - target
            if surplus > 0 and self.rate_at < time.monotonic() - DEMAND_WINDOW:
                self.releasing += surplus
                await self.control.send_message(PoolRelease(surplus))
            try:
                # Above pool_size, look again as the rate decays.
                above = self.ready > self.agent.config.pool_size
                async with asyncio.timeout(DEMAND_WINDOW if above else None):
                    await self.changed.wait()
            except TimeoutError:
                # The gateway closes only channels still idle on its side:
                # count afresh rather than wait for the rest. Channels it asked
                # for are moot too: with idle ones pooled there, no client
                # waits (those it asked for left or timed out).
                self.releasing = 0
                self.extra = 0
            self.changed.clear()

    async def _channel(self) -> None:
        """Root of one data channel's task: open, wait in the pool, serve one client."""
        began = time.monotonic()
        try:
            channel = await self.agent._open("data", self.session)
        except (TransportError, ProtocolError, ConnectionClosed) as exc:
            self.log.warning("cannot open a data channel: %s", exc)
            await asyncio.sleep(OPEN_RETRY_DELAY)  # no retry storm against a failing gateway
            self.opening -= 1
            self.changed.set()
            return
        except BaseException:
            self.opening -= 1
            raise
        self.opening -= 1
        self.open_time += (time.monotonic() - began - self.open_time) / 4
        self.extra = max(0, self.extra - 1)
        self.idle += 1
        self.changed.set()  # there may be a surplus to release now
        try:
            start = await self._wait_for_start(channel)
        finally:
            self.idle -= 1
            self.changed.set()
        if start is None:
            return
        self.started()
        self.changed.set()  # the target may have grown
        task = asyncio.current_task()
        assert task is not None
        self.serving.add(task)
        try:
            await self.agent._serve(channel, start, self.log)
        except (TransportError, ProtocolError, ConnectionClosed) as exc:
            self.log.warning("conn %d: %s", start.conn, exc)
            channel.abort()
        except Exception:
            self.log.exception("unexpected error serving conn %d", start.conn)
            channel.abort()
        finally:
            self.serving.discard(task)

    async def _wait_for_start(self, channel: Channel) -> Start | None:
        """The Start that puts a pooled channel to use; None if it ended unused.

        A pooled channel the gateway closes unused is released only after a
        pause, so that a gateway refusing channels meets no retry storm.
        """
        try:
            # The gateway checks a channel that has been idle a while with a Ping.
            while isinstance(
                message := check_allowed("agent_pooled", await channel.receive()), Ping
            ):
                await channel.send_message(Pong(message.seq))
        except (TransportError, ProtocolError, ConnectionClosed) as exc:
            channel.abort()
            if self.releasing and isinstance(exc, ConnectionClosed):
                self.releasing -= 1  # closed as asked with PoolRelease (a clean close)
                return None
            if self.lost:
                self.lost -= 1  # one the gateway discarded: its path comes back with a reset
                return None
            self.log.debug("pooled data channel ended unused: %s", exc)
            await asyncio.sleep(OPEN_RETRY_DELAY)
            return None
        except BaseException:
            channel.abort()
            raise
        if isinstance(message, Start):
            return message
        if isinstance(message, Refused):
            self.log.warning("data channel refused by the gateway: %s", message.reason)
            await asyncio.sleep(OPEN_RETRY_DELAY)
        channel.abort()
        return None


def _refusal(message: Refused) -> Exception:
    if message.code in ("auth", "version"):
        return AuthenticationError(message.reason)
    return ConnectionClosed("closed", f"gateway refused: {message.reason}")


@contextlib.asynccontextmanager
async def expose(
    local_port: int,
    *,
    gateway: str,
    token: str,
    local_host: str = "127.0.0.1",
    remote_port: int = 0,
    timeout: float = 30.0,
    **options: Any,
) -> AsyncIterator[Address]:
    """Expose ``local_host:local_port`` through a gateway; yield its public address.

    ``options`` are further agent settings (``fingerprint``, ``ca``, ``tls``,
    ``name``…), as in the agent's TOML file.
    """
    spec = f"{remote_port}:{format_address(local_host, local_port)}"
    async with Agent(gateway=gateway, token=token, expose=[spec], **options) as agent:
        services = await agent.wait_ready(timeout)
        if not services:
            raise TransportError("the gateway did not expose the service (see the log)")
        (service,) = services.values()
        host = service.address.host
        if host in ("0.0.0.0", "::", ""):
            host = agent.config.gateway.host
        yield Address(host, service.address.port)
