"""The gateway: accepts agents on the control port and clients on service ports.

Every connection to the control port is handshaken in its own task, under a
deadline, never in the accept loop. A control channel becomes a
:class:`_Session`, which owns the service listeners, the pool of idle data
channels and every relay of that agent: when the session ends, all of them
end with it (clients see a reset). A data channel joins its session's pool.

A client on a service port takes a pooled data channel (checked to be still
open), is announced with :class:`~tunnelgate.protocol.Start`, and relayed at
once: the agent answers only if the service cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import itertools
import logging
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tunnelgate import credentials, tls
from tunnelgate.access import Gate, Refusal, admit, client_ip
from tunnelgate.channel import Channel
from tunnelgate.config import (
    Address,
    AgentPolicy,
    GatewayConfig,
    default_state_dir,
    load_gateway_config,
)
from tunnelgate.errors import (
    AuthenticationError,
    ConnectionClosed,
    ProtocolError,
    TransportError,
    VersionMismatchError,
)
from tunnelgate.logs import ContextLogger, Throttle
from tunnelgate.protocol import (
    NONCE_SIZE,
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
    ServiceResult,
    Start,
    Welcome,
    check_allowed,
)
from tunnelgate.relay import RelayResult, relay, wait_relays
from tunnelgate.transport import (
    Listener,
    SocketStream,
    Stream,
    TLSContext,
    TLSStream,
    open_listener,
)

logger = logging.getLogger(__name__)

FREE_PORT_TRIES: Final = 64  # allowed ports tried for a service asking for any port
KILL_TIMEOUT: Final = 2.0  # for a replaced session's own cleanup (no network waits in it)
BYE_TIMEOUT: Final = 0.5  # for telling agents the gateway is going away
WARNING_INTERVAL: Final = 5.0  # a warning repeated under abuse is logged once per interval
POOL_CHECK_AGE: Final = 5.0  # a pooled data channel idle this long is checked before use
POOL_CHECK_TIMEOUT: Final = 1.0  # for the agent's Pong to that check
AUTH_DELAY_FIRST: Final = 0.1  # a failed authentication is answered this late, doubling
AUTH_DELAY_MAX: Final = 10.0  # with each failure from the same address, up to this
AUTH_FORGET: Final = 300.0  # an address's failures are forgotten after this long without one
AUTH_SUSPECT: Final = 3  # failures after which an address gets few handshakes at once:
AUTH_SUSPECT_HANDSHAKES: Final = 4  # this many
AUTH_TRACKED: Final = 65536  # addresses whose failures are remembered (oldest forgotten first)
DERIVED_KEYS: Final = 4096  # stored keys derived from clear tokens, kept per (token, agent)


class _SessionOver(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


class _AuthFailures:
    """Failed authentications per source address, and the growing delay each costs.

    A failure is answered after ``AUTH_DELAY_FIRST`` seconds, doubling with
    each failure from the same address up to ``AUTH_DELAY_MAX``, so guessing
    tokens one after another is slow; an address with ``AUTH_SUSPECT``
    failures gets at most ``AUTH_SUSPECT_HANDSHAKES`` handshakes at once, so
    guessing in parallel is too. A success does not clear the count (a
    guesser behind the same NAT as a real agent gains nothing from it); time
    does, after ``AUTH_FORGET``.
    """

    def __init__(self) -> None:
        self._by_host: dict[str, tuple[int, float]] = {}  # oldest first

    def count(self, host: str, now: float) -> int:
        failures, last = self._by_host.get(host, (0, 0.0))
        return failures if now - last < AUTH_FORGET else 0

    def failed(self, host: str, now: float) -> tuple[int, float]:
        """Count one failure; return the count and the delay to answer it with."""
        failures = self.count(host, now) + 1
        self._by_host.pop(host, None)
        self._by_host[host] = (failures, now)
        if len(self._by_host) > AUTH_TRACKED:
            del self._by_host[next(iter(self._by_host))]
        return failures, min(AUTH_DELAY_MAX, AUTH_DELAY_FIRST * 2 ** (failures - 1))


@dataclass(eq=False)
class _Pooled:
    """An idle data channel, and when it was last known to reach the agent."""

    channel: Channel
    alive_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Session:
    """One authenticated agent: its control channel and everything it owns."""

    id: str
    agent: str
    peer: str
    policy: AgentPolicy
    key: bytes  # the stored key its proof matched (b"": its certificate alone)
    channel: Channel
    log: ContextLogger
    task: asyncio.Task[Any]
    group: asyncio.TaskGroup | None = None
    services: dict[str, _Service] = field(default_factory=dict)
    pool: deque[_Pooled] = field(default_factory=deque)  # oldest first
    waiters: deque[asyncio.Future[Channel]] = field(default_factory=deque)
    requested: int = 0  # data channels asked for and not yet arrived
    started: float = field(default_factory=time.monotonic)
    clients: set[asyncio.Task[None]] = field(default_factory=set)  # being served
    goodbye: str | None = None  # why it is draining: no new clients, open ones finish
    told_bye: bool = False  # the gateway said Bye to the agent
    refusals: Throttle = field(default_factory=lambda: Throttle(WARNING_INTERVAL))

    async def kill(self) -> None:
        """End the session now without waiting on its peer.

        Only this process's own cleanup is awaited (sockets are aborted, not
        drained), so a half-dead peer cannot delay it; afterwards its ports
        are free for whoever takes over.
        """
        self.task.cancel()
        await asyncio.wait({self.task}, timeout=KILL_TIMEOUT)

    def close_listeners(self) -> None:
        for service in self.services.values():
            service.listener.close()

    def abort_pooled(self) -> None:
        while self.pool:
            self.pool.popleft().channel.abort()

    def discard_pool(self) -> None:
        self.abort_pooled()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.cancel()


class Gateway:
    """The public side. Use as ``async with Gateway(...) as gateway:``.

    Pass a :class:`GatewayConfig`, or the keys of the gateway's TOML file as
    keyword arguments (``Gateway(listen="127.0.0.1:0", token="…", tls=False)``).
    """

    def __init__(self, config: GatewayConfig | None = None, **options: Any) -> None:
        if config is None:
            config, _ = load_gateway_config(None, options)
        self.config = config
        self.address: Address | None = None
        self.fingerprint: str | None = None
        self.cert_created = False
        self._context: TLSContext | None = None
        self._identity: tuple[Path, Path] | None = None  # certificate and key, with TLS
        self._client_ca_pem: bytes | None = None  # as loaded into the context
        self._listener: Listener | None = None
        self._main: asyncio.Task[None] | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._sessions: dict[str, _Session] = {}  # by agent name
        self._by_id: dict[str, _Session] = {}
        self._ports: dict[tuple[str, int], _Session] = {}
        self._stopping = False
        self._handshaking = 0
        self._handshakes_by_host: Counter[str] = Counter()
        self._auth_failures = _AuthFailures()
        self._auth_warnings = Throttle(WARNING_INTERVAL)
        self._suspect_drops = Throttle(WARNING_INTERVAL)
        self._derived: dict[tuple[bytes, str], bytes] = {}  # (token, agent) -> stored key
        self._gates: dict[str, Gate] = {}  # by the rule's place in the config
        self._refusal_warnings: dict[str, Throttle] = {}
        self._reloading = asyncio.Lock()
        self._handshake_refusals = Throttle(WARNING_INTERVAL)
        self._conn_ids = itertools.count(1)
        self._ready = asyncio.Event()

    # --- life cycle ---------------------------------------------------------

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Load the TLS identity, bind the control port and start serving."""
        config = self.config
        if config.tls:
            cert, key = config.cert, config.key
            if cert is None or key is None:
                state_dir = config.state_dir or default_state_dir()
                cert, key, self.cert_created = tls.ensure_self_signed(
                    state_dir, [config.listen.host]
                )
            self._identity = (cert, key)
            self._client_ca_pem = _contents(config.client_ca)
            self._context = tls.server_context(cert, key, config.client_ca)
            self.fingerprint = tls.certificate_fingerprint(cert)
        else:
            logger.warning(
                "TLS is OFF (--no-tls): tokens are safe, but relayed bytes cross the "
                "network in clear and anyone on the path can read or change them"
            )
        self._listener = open_listener(config.listen.host, config.listen.port)
        self.address = self._listener.address
        self._main = asyncio.create_task(self._run(self._listener), name="gateway")
        await self._ready.wait()
        logger.info("gateway listening on %s (%s)", self.address, "TLS" if config.tls else "no TLS")

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop gracefully: accept no more agents or clients, tell every agent,
        let open client connections finish for up to ``drain_timeout`` seconds
        (default: the config's ``drain_timeout``), then close; connections
        still open at the deadline are reset."""
        if self._main is None:
            return
        if drain_timeout is None:
            drain_timeout = self.config.drain_timeout
        await self._stop_accepting_agents()
        sessions = list(self._by_id.values())
        for session in sessions:
            await self._drain(session, "gateway shutting down")
        await self._say_bye(sessions)
        open_clients = sum(len(s.clients) for s in sessions)
        if open_clients and drain_timeout > 0:
            logger.info(
                "draining: waiting up to %g s for %d client connection(s) to finish",
                drain_timeout,
                open_clients,
            )
            deadline = asyncio.get_running_loop().time() + drain_timeout
            left = 0
            for session in sessions:
                remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                left += await wait_relays(session.clients, remaining)
            if left:
                logger.warning("drain deadline reached: resetting %d client connection(s)", left)
            else:
                logger.info("drained: every client connection finished")
        await self.aclose()

    async def aclose(self) -> None:
        """Stop at once: end every session (their open client connections are reset)."""
        await self._say_bye(list(self._by_id.values()))
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None
            logger.info("gateway stopped")
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def reload(self, config: GatewayConfig) -> None:
        """Apply a new configuration (SIGHUP in the CLI) without a restart.

        Agents removed from it, or whose token (or hash) is no longer listed,
        are disconnected; so is one whose services its new policy no longer
        allows (it reconnects and registers again under the new policy).
        Every other session stays untouched, and new limits and access rules
        apply to new connections. The control port's address, TLS and the
        gateway's certificate only change with a restart. A ``client_ca``
        that cannot be loaded raises :class:`ConfigError` and nothing changes.
        """
        async with self._reloading:
            old = self.config
            fixed = [
                key
                for key in ("listen", "tls", "cert", "key", "state_dir")
                if getattr(old, key) != getattr(config, key)
            ]
            if fixed:
                logger.warning(
                    "reload: %s cannot change while running; restart to apply",
                    ", ".join(fixed),
                )
                config = dataclasses.replace(config, **{k: getattr(old, k) for k in fixed})
            ca_pem = _contents(config.client_ca)
            if self._identity is not None and (
                config.client_ca != old.client_ca or ca_pem != self._client_ca_pem
            ):
                # A new context has new ticket keys: agents' data channels stop
                # resuming until they reconnect, so only when the CA changed.
                self._context = tls.server_context(*self._identity, config.client_ca)
                self._client_ca_pem = ca_pem
            self.config = config
            kept = 0
            for session in list(self._sessions.values()):
                reason = await self._still_allowed(session)
                if reason is None:
                    kept += 1
                    for service in session.services.values():
                        service.gates = self._gates_for(session.policy, service.name)
                    continue
                session.log.warning("disconnecting the agent: %s", reason)
                await session.kill()
            logger.info(
                "configuration reloaded: %d agent policies; %d session(s) kept",
                len(config.agents),
                kept,
            )

    async def _still_allowed(self, session: _Session) -> str | None:
        """None if ``session`` may go on under the current config (its policy
        is then updated), else why not."""
        named = [p for p in self.config.agents if p.name == session.agent]
        unnamed = [p for p in self.config.agents if not p.name]
        policy = next(iter(named or unnamed), None)
        if policy is None:
            return "it was removed from the configuration"
        if session.key:
            keys = await self._keys_of(policy, session.agent)
            if not any(hmac.compare_digest(session.key, key) for key in keys):
                return "its token was revoked"
        elif policy.tokens or policy.stored_keys:
            return "its policy now requires a token"
        allowed_binds = policy.allow_bind or self.config.allow_bind or (self.config.default_bind,)
        if len(session.services) > policy.max_services:
            return (
                f"it has {len(session.services)} services; its policy allows {policy.max_services}"
            )
        for service in session.services.values():
            if not policy.allows_port(service.address.port) or service.bind not in allowed_binds:
                return f"its policy no longer allows service {service.name} on {service.address}"
        session.policy = policy
        return None

    async def serve_forever(self) -> None:
        """Wait until the gateway stops. Cancelling this wait leaves the gateway
        running, so that ``aclose()`` can still say goodbye to the agents."""
        assert self._main is not None, "start() first"
        await asyncio.shield(self._main)

    def sessions(self) -> dict[str, list[Address]]:
        """A snapshot: agent name → the public addresses of its services."""
        return {
            name: [service.address for service in session.services.values()]
            for name, session in self._sessions.items()
        }

    async def _run(self, listener: Listener) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._accepting = group.create_task(self._accept_agents(listener, group))
            self._ready.set()

    async def _stop_accepting_agents(self) -> None:
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait({self._accepting})
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _say_bye(self, sessions: list[_Session]) -> None:
        """Tell each agent not told yet that the gateway is going away (within BYE_TIMEOUT)."""
        untold = [s for s in sessions if not s.told_bye]
        for session in untold:
            session.told_bye = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BYE_TIMEOUT):
                await asyncio.gather(
                    *(_send_bye(s.channel, "gateway shutting down") for s in untold)
                )

    async def _drain(self, session: _Session, reason: str) -> None:
        """Take no new clients for ``session``: its listeners close and its ports
        are free again at once; its open client connections go on."""
        if session.goodbye is not None:
            return
        session.goodbye = reason
        if self._sessions.get(session.agent) is session:
            del self._sessions[session.agent]  # the agent may connect again meanwhile
        accepting = {s.accepting for s in session.services.values() if s.accepting is not None}
        for task in accepting:
            task.cancel()
        if accepting:
            await asyncio.wait(accepting)
        self._release_ports(session)
        session.close_listeners()
        session.discard_pool()

    def _release_ports(self, session: _Session) -> None:
        for key in [k for k, owner in self._ports.items() if owner is session]:
            del self._ports[key]

    # --- the control port ---------------------------------------------------

    async def _accept_agents(self, listener: Listener, group: asyncio.TaskGroup) -> None:
        def handle(stream: SocketStream, peer: str) -> None:
            host = _host_of(peer)
            if (
                self._handshakes_by_host[host] >= AUTH_SUSPECT_HANDSHAKES
                and self._auth_failures.count(host, time.monotonic()) >= AUTH_SUSPECT
            ):
                self._suspect_drops.warning(
                    logger,
                    time.monotonic(),
                    "dropping connection from %s: it failed to authenticate repeatedly and "
                    "has %d handshakes open",
                    peer,
                    self._handshakes_by_host[host],
                )
                stream.abort()
                return
            if self._handshaking >= self.config.max_handshakes:
                self._handshake_refusals.warning(
                    logger,
                    time.monotonic(),
                    "dropping connection from %s: %d connections are in handshake (max_handshakes)",
                    peer,
                    self._handshaking,
                )
                stream.abort()
                return
            _spawn(group, stream, self._guard_connection(stream, peer))

        def on_error(exc: TransportError, repeats: int) -> None:
            logger.error("accept failed on the control port: %s%s", exc, _more(repeats))

        await listener.accept_forever(handle, on_error)

    async def _guard_connection(self, stream: SocketStream, peer: str) -> None:
        """Root of a control-port connection's task: every error ends here, logged once."""
        owned = False  # True once a session (or its pool) closes the connection
        channel: Channel | None = None
        host = _host_of(peer)
        try:
            self._handshaking += 1
            self._handshakes_by_host[host] += 1
            try:
                async with asyncio.timeout(self.config.handshake_timeout):
                    channel = await self._secure(stream)
                    hello, policy, key = await self._handshake(channel, peer)
            finally:
                self._handshaking -= 1
                self._handshakes_by_host[host] -= 1
                if not self._handshakes_by_host[host]:
                    del self._handshakes_by_host[host]
            if hello.role == "control" and self._stopping:
                # Authenticated while the control port was closing: come back later.
                await channel.send_message(Refused("shutdown", "the gateway is shutting down"))
            elif hello.role == "control":
                owned = True
                await self._run_session(channel, hello, policy, key, peer)
            else:
                await self._add_data_channel(channel, hello)
                owned = True
        except TimeoutError:
            # Counted like a failed authentication: an address that keeps
            # handshakes open until the deadline soon gets few at once.
            self._auth_failures.failed(host, time.monotonic())
            logger.warning("closing connection from %s: handshake timed out", peer)
        except AuthenticationError:
            pass  # logged where it was found, with the agent's name
        except (ProtocolError, TransportError, ConnectionClosed) as exc:
            logger.warning("closing connection from %s: %s", peer, exc)
        except Exception:
            logger.exception("unexpected error on connection from %s", peer)
        finally:
            if not owned:
                (channel or stream).abort()

    async def _secure(self, stream: SocketStream) -> Channel:
        """The framed channel over ``stream``, after the TLS handshake if TLS is on."""
        if self._context is None:
            return Channel(stream)
        tls_stream = TLSStream(stream, self._context, server_side=True)
        await tls_stream.handshake()  # resets the connection if it fails
        return Channel(tls_stream)

    async def _handshake(self, channel: Channel, peer: str) -> tuple[Hello, AgentPolicy, bytes]:
        """Challenge, Hello, and the policy and stored key the agent proved."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        await channel.send_message(Challenge(PROTOCOL_VERSION, nonce))
        try:
            hello = check_allowed("gateway_awaits_hello", await channel.receive())
        except VersionMismatchError as exc:
            await channel.send_message(Refused("version", exc.reason))
            raise
        assert isinstance(hello, Hello)
        found, why = await self._authenticate(channel, hello, nonce)
        if found is None:
            failures, delay = self._auth_failures.failed(_host_of(peer), time.monotonic())
            delay = min(delay, self.config.handshake_timeout / 2)  # the answer must still come
            self._auth_warnings.warning(
                logger,
                time.monotonic(),
                "authentication failed for agent %r from %s (%s channel): %s; failure %d "
                "from this address, answered in %.1f s",
                hello.agent,
                peer,
                hello.role,
                why,
                failures,
                delay,
            )
            await asyncio.sleep(delay)
            await channel.send_message(
                Refused(
                    "auth",
                    f"the gateway does not accept this {why.split()[0]} for agent {hello.agent!r}",
                )
            )
            raise AuthenticationError("logged above")
        return hello, *found

    async def _authenticate(
        self, channel: Channel, hello: Hello, nonce: bytes
    ) -> tuple[tuple[AgentPolicy, bytes] | None, str]:
        """The policy and stored key that made the proof, or None and why not.

        With ``client_ca``, the certificate (verified by TLS) must name the
        agent; a policy without tokens then accepts the certificate alone.
        Every key of every matching policy is checked, each in constant time.
        """
        if self.config.client_ca is not None:
            names = channel.stream.peer_certificate_names()
            if hello.agent not in names:
                shown = ", ".join(sorted(names)) or "no name"
                return None, f"certificate is for {shown}, not this agent"
        found: tuple[AgentPolicy, bytes] | None = None
        for policy in self.config.agents:
            if policy.name and policy.name != hello.agent:
                continue
            if not policy.tokens and not policy.stored_keys:  # certificate alone (checked above)
                found = found or (policy, b"")
                continue
            for key in await self._keys_of(policy, hello.agent):
                if credentials.check_proof(
                    key, hello.proof, nonce, hello.role, hello.agent, hello.session
                ):
                    found = found or (policy, key)
        return found, "token is wrong"

    async def _keys_of(self, policy: AgentPolicy, agent: str) -> list[bytes]:
        """The stored keys of a policy for one agent name; clear tokens are
        derived once (slowly, off the event loop), then remembered."""
        keys = list(policy.stored_keys)
        for token in policy.tokens:
            key = self._derived.get((token, agent))
            if key is None:
                key = (await asyncio.to_thread(credentials.derive, token, agent)).stored_key
                if len(self._derived) >= DERIVED_KEYS:
                    del self._derived[next(iter(self._derived))]
                self._derived[(token, agent)] = key
            keys.append(key)
        return keys

    async def _add_data_channel(self, channel: Channel, hello: Hello) -> None:
        session = self._by_id.get(hello.session)
        if session is None or session.agent != hello.agent or session.group is None:
            reason = f"data channel for unknown session {hello.session!r}"
            await channel.send_message(Refused("session", reason))
            raise ConnectionClosed("closed", reason)
        if session.goodbye is not None:  # draining: the agent stops opening them too
            channel.abort()
            return
        session.requested = max(0, session.requested - 1)
        while session.waiters:
            waiter = session.waiters.popleft()
            if not waiter.done():
                waiter.set_result(channel)
                return
        # No client waits: whatever was asked for and is still on its way is moot
        # (the clients it was for left or timed out); ask afresh when one waits.
        session.requested = 0
        if len(session.pool) >= self.config.max_pool_size:
            session.log.debug("pool full (%d); closing an extra data channel", len(session.pool))
            channel.abort()
            return
        session.pool.append(_Pooled(channel))

    # --- sessions -----------------------------------------------------------

    async def _run_session(
        self, channel: Channel, hello: Hello, policy: AgentPolicy, key: bytes, peer: str
    ) -> None:
        session_id = secrets.token_hex(4)
        task = asyncio.current_task()
        assert task is not None
        session = _Session(
            id=session_id,
            agent=hello.agent,
            peer=peer,
            policy=policy,
            key=key,
            channel=channel,
            task=task,
            log=ContextLogger(logger, session=session_id, agent=hello.agent),
        )
        old = self._sessions.get(hello.agent)
        if old is not None:
            session.log.info("agent reconnected; replacing its session %s at once", old.id)
            await old.kill()
        self._sessions[hello.agent] = session
        self._by_id[session_id] = session
        reason, level = "ended", logging.INFO
        try:
            await channel.send_message(
                Welcome(
                    session_id,
                    self.config.heartbeat_interval,
                    self.config.heartbeat_timeout,
                    self.config.max_pool_size,
                )
            )
            session.log.info("session started from %s", peer)
            async with asyncio.TaskGroup() as group:
                session.group = group
                reason = await self._control_loop(session)
                raise _SessionOver(reason)
        except* _SessionOver as caught:
            reason = str(caught.exceptions[0])
        except* (ProtocolError, TransportError, ConnectionClosed) as caught:
            reason, level = str(caught.exceptions[0]), logging.WARNING
        except* TimeoutError:
            reason, level = "no heartbeat within the deadline", logging.WARNING
        finally:
            self._end_session(session)
            session.channel.abort()
            duration = time.monotonic() - session.started
            names = ", ".join(session.services) or "none"
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                session.log.log(
                    level, "session ended after %.1f s: %s (services: %s)", duration, reason, names
                )
            else:
                session.log.info("session closed after %.1f s (services: %s)", duration, names)

    def _end_session(self, session: _Session) -> None:
        """Release everything the session holds; safe to call twice."""
        if self._sessions.get(session.agent) is session:
            del self._sessions[session.agent]
        self._by_id.pop(session.id, None)
        self._release_ports(session)
        session.close_listeners()
        session.discard_pool()

    async def _control_loop(self, session: _Session) -> str:
        """Serve the agent's control messages until it leaves; return why."""
        channel = session.channel
        while True:
            try:
                async with asyncio.timeout(self.config.heartbeat_timeout):
                    event = await channel.receive()
            except (ConnectionClosed, TransportError) as exc:
                if session.goodbye is None:
                    raise
                # Draining: the relays run on their own data channels; let them end.
                await wait_relays(session.clients)
                return f"{session.goodbye}; then {exc}"
            message = check_allowed("gateway_control", event)
            if isinstance(message, Ping):
                await channel.send_message(Pong(message.seq))
            elif isinstance(message, Pong):
                pass
            elif isinstance(message, Register):
                results = [self._expose(session, request) for request in message.services]
                await channel.send_message(Registered(results))
            elif isinstance(message, PoolRelease):
                for _ in range(min(message.count, len(session.pool))):
                    session.pool.popleft().channel.close()
            elif isinstance(message, Bye):
                reason = f"agent said goodbye: {message.reason}"
                await self._drain(session, reason)
                if not session.clients:
                    return reason
                session.log.info(
                    "%s; %d client connection(s) finishing", reason, len(session.clients)
                )
                assert session.group is not None
                session.group.create_task(self._end_when_drained(session, reason))

    async def _end_when_drained(self, session: _Session, reason: str) -> None:
        """End a draining session once its last client connection has ended."""
        await wait_relays(session.clients)
        raise _SessionOver(reason)

    def _expose(self, session: _Session, request: ServiceRequest) -> ServiceResult:
        """Open the public listener for one service, if the policy allows it."""
        config = self.config
        policy = session.policy
        bind = request.bind or config.default_bind
        allowed_binds = policy.allow_bind or config.allow_bind or (config.default_bind,)

        def refuse(error: str) -> ServiceResult:
            session.log.warning("service %s refused: %s", request.name, error)
            return ServiceResult(request.name, False, error=error)

        if session.goodbye is not None:
            return refuse("the session is ending")
        if request.name in session.services:
            return refuse(f"service name {request.name!r} used twice")
        if len(session.services) >= policy.max_services:
            return refuse(f"this agent may expose at most {policy.max_services} services")
        if bind not in allowed_binds:
            return refuse(
                f"bind address {bind} is not allowed (allowed: {', '.join(allowed_binds)})"
            )
        if request.port and not session.policy.allows_port(request.port):
            return refuse(f"port {request.port} is not allowed for this agent")
        holder = self._ports.get((bind, request.port)) if request.port else None
        if holder is not None:
            return refuse(f"port {request.port} is held by another agent")
        if request.port:
            try:
                listener = open_listener(bind, request.port)
            except TransportError as exc:
                return refuse(str(exc))
        else:
            found = self._listen_on_free_port(bind, session.policy)
            if found is None:
                return refuse("no free port among the ports allowed for this agent")
            listener = found
        address = listener.address
        service = _Service(
            request.name, address, listener, bind, self._gates_for(session.policy, request.name)
        )
        session.services[request.name] = service
        self._ports[(bind, address.port)] = session
        assert session.group is not None
        service.accepting = session.group.create_task(self._accept_clients(session, service))
        session.log.info("service %s exposed on %s", request.name, address)
        return ServiceResult(request.name, True, bind=address.host, port=address.port)

    def _gates_for(self, policy: AgentPolicy, service: str) -> list[Gate]:
        """The access rules a client of ``service`` must pass, broadest first.

        A rule's counters are shared by everything it covers (``[access]`` by
        every service), so one gate per rule; a reload gives a gate its new
        rule and keeps the counts of the connections it admitted.
        """
        config = self.config
        rules = (
            config.access,
            config.service_access.get(service),
            policy.access,
            policy.service_access.get(service),
        )
        gates = []
        for rule in rules:
            if rule is None:
                continue
            gate = self._gates.get(rule.where)
            if gate is None:
                gate = self._gates[rule.where] = Gate(rule)
            gate.rule = rule
            gates.append(gate)
        return gates

    def _refused(self, session: _Session, service: _Service, client: str, refusal: Refusal) -> None:
        """Log a refused client with the rule that refused it; under a flood,
        once per ``WARNING_INTERVAL`` and rule, with a count of the others."""
        key = str(refusal)
        throttle = self._refusal_warnings.get(key)
        if throttle is None:
            throttle = self._refusal_warnings[key] = Throttle(WARNING_INTERVAL)
        throttle.warning(
            session.log,
            time.monotonic(),
            "refused client %s on service %s: %s",
            client,
            service.name,
            refusal,
        )

    def _listen_on_free_port(self, bind: str, policy: AgentPolicy) -> Listener | None:
        """A listener on a free port the policy allows: the kernel's pick if it
        is allowed, else a random sample of the allowed ports."""
        with contextlib.suppress(TransportError):
            listener = open_listener(bind, 0)
            if policy.allows_port(listener.address.port):
                return listener
            listener.close()
        ports = [p for r in policy.allow_ports for p in r] if policy.allow_ports else []
        for port in random.sample(ports, min(len(ports), FREE_PORT_TRIES)):
            if (bind, port) in self._ports:
                continue
            with contextlib.suppress(TransportError):
                return open_listener(bind, port)
        return None

    # --- clients ------------------------------------------------------------

    async def _accept_clients(self, session: _Session, service: _Service) -> None:
        group = session.group
        assert group is not None

        def handle(stream: SocketStream, client: str) -> None:
            limit = session.policy.max_connections or self.config.max_connections
            if len(session.clients) >= limit:
                session.refusals.warning(
                    session.log,
                    time.monotonic(),
                    "refusing client %s on service %s: the agent has %d open connections "
                    "(max_connections)",
                    client,
                    service.name,
                    len(session.clients),
                )
                stream.abort()
                return
            gates = service.gates  # the ones admitted through are the ones released
            ip = client_ip(_host_of(client)) if gates else None
            if gates:
                refusal = (
                    admit(gates, ip, time.monotonic())
                    if ip is not None
                    else Refusal(gates[0].rule.where, "address not understood")
                )
                if refusal is not None:
                    self._refused(session, service, client, refusal)
                    stream.abort()
                    return
            stream.reset_unless_closed_cleanly()
            conn = next(self._conn_ids)
            log = session.log.bind(conn=conn, service=service.name)
            task = _spawn(
                group, stream, self._serve_client(session, service, stream, client, conn, log)
            )
            if task is not None:
                session.clients.add(task)
                task.add_done_callback(session.clients.discard)
            if ip is not None:
                if task is None:
                    _release(gates, ip)
                else:
                    task.add_done_callback(lambda _: _release(gates, ip))

        def on_error(exc: TransportError, repeats: int) -> None:
            session.log.error(
                "accept failed on service %s: %s%s",
                service.name,
                exc,
                _more(repeats),
            )

        await service.listener.accept_forever(handle, on_error)

    async def _serve_client(
        self,
        session: _Session,
        service: _Service,
        stream: SocketStream,
        client: str,
        conn: int,
        log: ContextLogger,
    ) -> None:
        """Root of one client connection's task."""
        channel: Channel | None = None
        result: RelayResult | None = None  # once relaying; filled in even if cancelled
        try:
            channel = await self._take_channel(session, stream, client, log)
            if channel is None:
                return  # logged by _take_channel
            server = service.public or stream.local_address()
            await channel.send_message(Start(conn, service.name, client, server))
            log.debug("client %s started on a data channel", client)
            result = RelayResult()
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
                log.log(
                    logging.INFO if result.normal else logging.WARNING,
                    "closed client=%s up=%d down=%d duration=%.3fs end=%s",
                    client,
                    result.sent,
                    result.received,
                    result.duration,
                    result.how,
                )

    async def _take_channel(
        self, session: _Session, stream: SocketStream, client: str, log: ContextLogger
    ) -> Channel | None:
        """An open pooled data channel, or one the agent opens within the deadline;
        None (logged) if none comes, too many clients wait, or the client leaves.

        The newest pooled channel is taken: it is the least likely to have
        gone stale. One closed or reset by the network is seen at once
        (:meth:`Channel.is_idle_and_open`); one idle longer than
        ``POOL_CHECK_AGE`` is first checked with a Ping, because a path that
        went silent (a NAT mapping dropped without a word) looks open. If that
        check fails, the older ones are no better: the pool is discarded and
        the client waits for a fresh channel instead of failing.

        A client that leaves while it waits gives up its place at once, so a
        flood of abandoned connections (or a load balancer's health checks)
        neither fills the queue nor costs the agent a channel each: one that
        resets, or closes without having sent a byte. One that sent bytes and
        then half-closed still wants its answer, and waits on.
        """
        while session.pool:
            pooled = session.pool.pop()
            channel = pooled.channel
            if not channel.is_idle_and_open():
                session.log.debug("discarding a stale pooled data channel")
                channel.abort()
                continue
            if time.monotonic() - pooled.alive_at <= POOL_CHECK_AGE:
                return channel
            if await _answers_ping(channel):
                return channel
            channel.abort()
            session.log.debug(
                "a pooled data channel idle for %.0f s did not answer; discarding %d more",
                time.monotonic() - pooled.alive_at,
                len(session.pool),
            )
            discarded = 1 + len(session.pool)
            session.abort_pooled()
            await session.channel.send_message(PoolDiscarded(discarded))
        if len(session.waiters) >= self.config.max_pending_clients:
            session.refusals.warning(
                log,
                time.monotonic(),
                "refusing client %s: %d clients already wait for a data channel "
                "(max_pending_clients)",
                client,
                len(session.waiters),
            )
            return None
        waiter: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        waited_from = time.monotonic()
        session.waiters.append(waiter)
        missing = len(session.waiters) - session.requested
        if missing > 0:
            session.requested += missing
            await session.channel.send_message(PoolRequest(missing))
        try:
            async with asyncio.timeout(self.config.pending_timeout):
                taken = await _unless_left(waiter, stream)
            if taken is None:  # its one closing line, as for every client
                log.info(
                    "closed client=%s up=0 down=0 duration=%.3fs end=left before a data "
                    "channel came",
                    client,
                    time.monotonic() - waited_from,
                )
                if waiter.done() and not waiter.cancelled():  # came in the same instant
                    session.pool.append(_Pooled(waiter.result()))
            return taken
        except TimeoutError:
            log.warning(
                "no data channel from the agent for client %s within %g s "
                "(%d clients waiting); closing it",
                client,
                self.config.pending_timeout,
                len(session.waiters),
            )
            return None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                session.waiters.remove(waiter)


def _spawn(
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


def _contents(path: Path | None) -> bytes | None:
    """A file's bytes (None without one, or if it cannot be read: loading it reports why)."""
    try:
        return path.read_bytes() if path is not None else None
    except OSError:
        return None


def _release(gates: list[Gate], ip: Any) -> None:
    for gate in gates:
        gate.release(ip)


def _host_of(address: str) -> str:
    """The host of a ``host:port`` (IPv6 without its brackets)."""
    return address.rpartition(":")[0].strip("[]")


def _more(repeats: int) -> str:
    """The tail of an error logged once for several."""
    return f" (and {repeats} more times since the last report)" if repeats else ""


async def _unless_left(waiter: asyncio.Future[Channel], stream: Stream) -> Channel | None:
    """The channel ``waiter`` gets, or None if the client leaves first: it
    resets ``stream``, or closes it without having sent anything."""
    with stream.watch_peer_close() as closed:
        either: set[asyncio.Future[Any]] = {waiter, closed}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done() and (
            stream.pending_error() is not None or not stream.has_unread_bytes()
        ):
            return None
    return await waiter  # got it, or a half-close after a request: it wants the answer


async def _answers_ping(channel: Channel) -> bool:
    """True if the agent answers a Ping on this pooled channel within POOL_CHECK_TIMEOUT."""
    try:
        async with asyncio.timeout(POOL_CHECK_TIMEOUT):
            await channel.send_message(Ping(0))
            return isinstance(await channel.receive(), Pong)
    except (TimeoutError, TransportError, ProtocolError, ConnectionClosed):
        return False
    except BaseException:
        channel.abort()  # cancelled: the channel is in neither the pool nor a relay
        raise


async def _send_bye(channel: Channel, reason: str) -> None:
    with contextlib.suppress(TransportError):
        await channel.send_message(Bye(reason))
